#!/usr/bin/env bash
# Everything this project measures on a CUDA machine, in one go (how the GPU numbers in the
# README were made):
#   1. the GPU tests (tests/test_cuda.py, the bundled model included),
#   2. the speed benchmark on CUDA (bf16, the GPU default),
#   3. the quality benchmark on pre-built items, sharded over several processes sharing the
#      GPU, stopped after QUALITY_MIN minutes (fp32, so it is comparable with CPU runs).
#
#   bash benchmarks/run_gpu.sh OUTDIR [QUALITY_MIN] [ITEMS] [SHARDS]
#
# ITEMS comes from: python benchmarks/bench_quality.py --export-items items.json.gz
# QUALITY_ARGS (environment) adds options to every quality worker, e.g. the unscored-passages
# study of the README: QUALITY_ARGS="--methods relevance --ns 5,10,20,50"
# Needs nbce_rag importable and the bundled model installed (or NBCE_RAG_CACHE pre-filled).
set -uo pipefail
OUT=${1:?usage: run_gpu.sh OUTDIR [QUALITY_MIN] [ITEMS] [SHARDS]}
QMIN=${2:-4}
ITEMS=${3:-}
SHARDS=${4:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

t0=$(date +%s)
echo "== convert/load the bundled model once"
python3 -c "from nbce_rag import NBCEDecoder; d = NBCEDecoder.from_pretrained(device='cuda'); print(d.name, d.device)" || exit 1

echo "== GPU tests ($(($(date +%s) - t0)) s)"
python3 -m pytest -q -p no:cacheprovider "$HERE/../tests/test_cuda.py" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== speed ($(($(date +%s) - t0)) s)"
python3 "$HERE/bench_speed.py" --device cuda --max-new-tokens 32 --naive-max-n 32 \
    --out "$OUT/speed_cuda.json" 2>&1 | cut -c1-220

echo "== passage KV cache: cold vs warm, and the GPU cache tests ($(($(date +%s) - t0)) s)"
python3 -m pytest -q -p no:cacheprovider "$HERE/../tests/test_kvcache.py" -m gpu 2>&1 | tail -3
python3 "$HERE/bench_speed.py" --device cuda --methods nbce_kv --ns 1,8,32,64 --max-new-tokens 32 --warm-repeats 3 \
    --out "$OUT/speed_cuda_kv.json" 2>&1 | cut -c1-220

if [ -n "$ITEMS" ]; then
    echo "== quality, $SHARDS shards, $QMIN min ($(($(date +%s) - t0)) s)"
    W="$OUT/quality_work"
    mkdir -p "$W"
    for i in $(seq 0 $((SHARDS - 1))); do
        OMP_NUM_THREADS=1 python3 "$HERE/bench_quality.py" --items "$ITEMS" --device cuda --dtype float32 \
            --shard "$i/$SHARDS" --deadline-min "$QMIN" --work "$W" ${QUALITY_ARGS:-} >"$W/log$i.txt" 2>&1 &
    done
    wait
    tail -n 2 "$W"/log*.txt
    python3 "$HERE/bench_quality.py" --summary-only --work "$W" --out "$OUT/quality_cuda.json"
fi
echo "== done ($(($(date +%s) - t0)) s)"
