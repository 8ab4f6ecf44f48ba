#!/usr/bin/env bash
# The Zhongjing pipeline, five stages, each training a LoRA on the previous stage's merged model:
# continued pre-training → SFT on multi-turn dialogue → reward model → PPO against it (the paper's
# method), and DPO on the same pairs as the alternative to PPO.
#
#   scripts/zhongjing.sh TEXT.jsonl SFT.jsonl PAIRS.jsonl WORK_DIR [group.key=value ...]
#
# Inputs are data_prep outputs (text, cmtmedqa, preference); PPO's prompts are the SFT conversations.
# The recipes are recipes/zhongjing_{pt,sft,rm,ppo,dpo}.yaml; extra arguments override all of them
# (e.g. model.base=... for stage 1). Set LAUNCH to change how training starts (default: accelerate
# launch). Every step can be re-run: training resumes or reports the finished run, merges are skipped
# when up to date.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,13p' "$0"; exit 2; fi
text=$1; sft=$2; pairs=$3; work=$4; shift 4
launch=${LAUNCH:-accelerate launch}
recipes="$(cd "$(dirname "$0")/.." && pwd)/recipes"  # works from any directory
train() {  # train RECIPE BASE DATA NAME [overrides...]
  local recipe=$1 base=$2 data=$3 name=$4; shift 4
  # the stage's own base comes last, so an override meant for stage 1 never replaces it
  $launch -m medtune.train "$recipe" "data.train_files=[$data]" data.eval_files=[] \
    "output.dir=$work/$name" train.resume=true "$@" ${base:+"model.base=$base"}
}
train "$recipes"/zhongjing_pt.yaml "" "$text" pt "$@"
medtune merge "$work/pt" --out "$work/pt-merged"
train "$recipes"/zhongjing_sft.yaml "$work/pt-merged" "$sft" sft "$@" data.eval_ratio=0.02
medtune merge "$work/sft" --out "$work/sft-merged"
train "$recipes"/zhongjing_rm.yaml "$work/sft-merged" "$pairs" rm "$@" data.eval_ratio=0.02
medtune reward "$work/rm" --data "$pairs" --out "$work/rm-scores.jsonl" --overwrite
# the RM was trained on the same SFT base: PPO holds it as a second adapter on the policy's network
train "$recipes"/zhongjing_ppo.yaml "$work/sft-merged" "$sft" ppo "$@" "rl.reward_model=$work/rm"
medtune merge "$work/ppo" --out "$work/zhongjing"
train "$recipes"/zhongjing_dpo.yaml "$work/sft-merged" "$pairs" dpo "$@" data.eval_ratio=0.02
medtune merge "$work/dpo" --out "$work/zhongjing-dpo"
echo "reward model: $work/rm; final model (PPO): $work/zhongjing; the DPO alternative: $work/zhongjing-dpo"
