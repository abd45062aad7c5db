#!/usr/bin/env bash
# Issue 17's measurements on a machine with N GPUs, one stage per call (each under the
# device's 10-minute limit; run them back to back while the machine is warm):
#
#   infer/multi_gpu_job.sh STAGE N OUT_DIR
#
# STAGE: decode    Llama-3-8B shape, full vs duo 0.5, 256K / 1M / 2M, one GPU (plain) against
#                  N (--mesh sequence=N: the retrieval heads' cache split over sequence, the
#                  weights' MLP and heads split as the inference rules split them)
#        prefill1  chunked prefill at 256K and 1M on one GPU
#        prefillN  the same on the N-GPU mesh (context parallel)
#        train     one gate-training step at 32K tokens on one GPU and on sequence=N
#        tests     pytest -k gpu
# Results land in OUT_DIR/<stage>/ (JSON, markdown, PNG and the log). What it does not
# give: the cross-GPU merge's share of a decode step (needs a profile of the mesh path).
set -euo pipefail
if [ "$#" -ne 3 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
STAGE=$1 N=$2 OUT=$3
case "$N" in ''|*[!0-9]*) echo "multi_gpu_job.sh: N must be a number of GPUs, got $N" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
mkdir -p "$OUT/$STAGE"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
log="$OUT/$STAGE/run.log"
case "$STAGE" in
  decode)
    python -m infer.bench_decode --out "$OUT/$STAGE" --no-hf --models llama3-8b \
      --contexts 256K,1M,2M --batches 1 --sparsities 0.5 --configs full,duo-0.5 \
      --paths plain,mesh --mesh "sequence=$N" > "$log" 2>&1 ;;
  prefill1)
    python -m infer.bench_prefill --out "$OUT/$STAGE" --contexts 256K,1M --configs full,duo \
      > "$log" 2>&1 ;;
  prefillN)
    python -m infer.bench_prefill --out "$OUT/$STAGE" --contexts 256K,1M --configs full,duo \
      --mesh "sequence=$N" > "$log" 2>&1 ;;
  train)
    python -m infer.bench_train_step --out "$OUT/$STAGE" --tokens 32K --mesh none \
      --mesh "sequence=$N" > "$log" 2>&1 ;;
  tests)
    python -m pytest -q -n 8 -p no:cacheprovider -k gpu tests > "$log" 2>&1 ;;
  *)
    echo "multi_gpu_job.sh: unknown stage $STAGE (decode, prefill1, prefillN, train, tests)" >&2
    exit 2 ;;
esac
tail -25 "$log"
