#!/usr/bin/env bash
# The SciFact recipe sweep on a CUDA machine (how benchmarks/results/scifact.json was made):
# every recipe of benchmarks/scifact_sweep.json trains on 80% of the train queries and is
# scored on the other 20%; the 3 best by that dev nDCG@10 train on all train qrels and are
# scored on the test qrels (the best on dev is the headline). fp32, as on a CPU.
#
#   bash benchmarks/run_gpu_scifact.sh OUTDIR [MODEL_DIR] [DATA_DIR] [DEADLINE_MIN]
#
# MODEL_DIR: the bundled all-MiniLM-L6-v2 (default: the installed package's copy);
# DATA_DIR: the folder holding beir_scifact/ (default ../shared/data).
set -uo pipefail
OUT=${1:?usage: run_gpu_scifact.sh OUTDIR [MODEL_DIR] [DATA_DIR] [DEADLINE_MIN]}
MODEL=${2:-bundled}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${3:-$HERE/../../shared/data}
DL=${4:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 "$HERE/bench_encoder.py" scifact --device "${DEVICE:-cuda}" --model "$MODEL" --data "$DATA" \
    --max-train-pairs 0 --max-length 0 --sweep "$HERE/scifact_sweep.json" --final-top 3 \
    --deadline-min "$DL" --name scifact --model-out /tmp/nbce_bench/scifact_model 2>&1 \
    | grep --line-buffered -v 'it/s\]\|s/it\]\|step/s\]\|s/step\]' | tee "$OUT/scifact.log"
cp "$HERE/results/scifact.json" "$OUT/" 2>/dev/null
