#!/usr/bin/env bash
# The report of the demo run, as docs/report.png shows it: train the demo, evaluate it on the exam
# fixtures (loglik and generate) and on eight of its own training dialogues (memorised: a demo of the
# page, not of a model), write report.html, and screenshot it with headless Chromium when installed.
#
#   scripts/demo_report.sh [WORK_DIR]      (default: runs/demo-report)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mkdir -p "${1:-runs/demo-report}" && cd "${1:-runs/demo-report}" && pwd)"
fixtures="$repo/tests/fixtures/exams"
cd "$repo"
medtune train recipes/demo.yaml "output.dir=$work/run"
cd "$work"
python -m data_prep cmb "$fixtures/cmb_val.json" --out cmb.jsonl --quiet
python -m data_prep cmexam "$fixtures/cmexam_test.csv" --out cmexam.jsonl --quiet
python -m data_prep ceval "$fixtures/ceval/clinical_medicine_val.csv" --out ceval.jsonl --quiet
cat cmb.jsonl cmexam.jsonl ceval.jsonl > exams.jsonl
medtune eval exam run --data exams.jsonl --out evals/exam-loglik
medtune eval exam run --data exams.jsonl --out evals/exam-generate --mode generate --max-new-tokens 24
head -8 "$repo/recipes/data/demo_medical.jsonl" > dialogues.jsonl
medtune eval dialogue run --data dialogues.jsonl --out evals/dialogue-demo-train --max-new-tokens 96
medtune report run --eval evals/exam-loglik --eval evals/exam-generate --eval evals/dialogue-demo-train \
    --out report.html
if command -v chromium > /dev/null; then
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$work/.chromium" \
    --window-size=1200,4400 --screenshot="$work/report.png" "file://$work/report.html" 2> /dev/null
  echo "screenshot: $work/report.png"
fi
