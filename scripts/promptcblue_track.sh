#!/usr/bin/env bash
# The PromptCBLUE open-source track in one command:
#   prep → train → merge → predict dev and test → score dev → write the test submission.
#
#   scripts/promptcblue_track.sh RECIPE PROMPTCBLUE_DIR WORK_DIR [group.key=value ...]
#
# PROMPTCBLUE_DIR holds train.json, dev.json and test.json. WORK_DIR receives data/, run/,
# merged/, dev_predictions.json, dev_scores.json, test_predictions.json and results.json.
# Extra arguments are recipe overrides. Set LAUNCH to change how training starts
# (default: accelerate launch). Every step can be re-run: training resumes, prediction skips
# what is done.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,12p' "$0"; exit 2; fi
recipe=$1; src=$2; work=$3; shift 3
launch=${LAUNCH:-accelerate launch}
max_new_tokens=${MAX_NEW_TOKENS:-512}
mkdir -p "$work/data"

for split in train dev test; do
  python -m data_prep promptcblue "$src/$split.json" --out "$work/data/$split.jsonl" --strip-answer-cue --quiet
done
$launch -m medtune.train "$recipe" "data.train_files=[$work/data/train.jsonl]" \
  "data.eval_files=[$work/data/dev.jsonl]" data.eval_ratio=0 "output.dir=$work/run" train.resume=true "$@"
medtune merge "$work/run" --out "$work/merged"
for split in dev test; do
  medtune predict "$work/merged" --data "$work/data/$split.jsonl" --out "$work/${split}_predictions.json" \
    --max-new-tokens "$max_new_tokens"
done
medtune score promptcblue --pred "$work/dev_predictions.json" --gold "$src/dev.json" --json "$work/dev_scores.json"
medtune score promptcblue --pred "$work/test_predictions.json" --results "$work/results.json"
echo "submission: $work/test_predictions.json and $work/results.json; dev scores: $work/dev_scores.json"
