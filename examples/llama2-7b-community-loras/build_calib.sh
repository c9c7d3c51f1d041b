#!/usr/bin/env bash
# calib.jsonl for the Llama-2 pool: 100 rows each of CNN/DailyMail, CodeAlpaca-20k and
# PubMedQA (the paper's three generative tasks), in one `mergekit-fw calibration` line.
#
#   bash build_calib.sh [more mergekit-fw calibration options]
#
# Reads the hub (or its local cache with HF_DATASETS_OFFLINE=1); not run in CI. Each
# source can be pointed at a local copy (a save_to_disk folder, a parquet file) through
# CNN_DAILYMAIL, CODE_ALPACA and PUBMEDQA, given as DATASET[:CONFIG];
# tests/test_examples.py runs this line on local stand-ins.
set -euo pipefail
cd "$(dirname "$0")"
mergekit-fw calibration "${OUT:-calib.jsonl}" --samples-per-task "${PER_TASK:-100}" --seed "${SEED:-0}" "$@" \
  --task "cnn_dailymail=${CNN_DAILYMAIL:-abisee/cnn_dailymail:3.0.0}:train" \
  --task "code_alpaca=${CODE_ALPACA:-sahil2801/CodeAlpaca-20k}:train" \
  --task "pubmedqa=${PUBMEDQA:-qiaojin/PubMedQA:pqa_labeled}:train" \
  --prompt-template $'cnn_dailymail=Summarize the following article.\n\n{{ article }}\n\nSummary:' \
  --completion-template 'cnn_dailymail= {{ highlights }}' \
  --prompt-template $'code_alpaca=Instruction:\n{{ instruction }}{% if input %}\n\nInput:\n{{ input }}{% endif %}\n\nResponse:\n' \
  --completion-field 'code_alpaca=output' \
  --prompt-template $'pubmedqa=Context: {{ context.contexts | join(" ") }}\nQuestion: {{ question }}\nAnswer (yes, no or maybe):' \
  --completion-template 'pubmedqa= {{ final_decision }}'
