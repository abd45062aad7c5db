#!/usr/bin/env bash
# The Qwen2.5-Coder-0.5B accuracy grid of issue 15, in one process (the model loads
# once; every method's prefill and decode compile once, in parallel, for all tasks).
#
#   infer/eval_qwen.sh PATTERN_DIR RAZOR_DIR RSCORE_DIR OUT_DIR HELDOUT_TEXT
#
# PATTERN_DIR: the gate-trained duo pattern; RAZOR_DIR / RSCORE_DIR: RazorAttention and
# retrieval-score patterns (python -m duojax.identify razor / retrieval-score);
# HELDOUT_TEXT: text the gates were not trained on (a .txt, .jsonl or folder) for
# perplexity: the Paul Graham essays are the gate-training data, so they are the
# retrieval haystack only. Writes OUT_DIR/{niah,mkniah,passkey,ppl}.{json,png},
# OUT_DIR/table.md (also printed: the README table) and OUT_DIR/table.json;
# `python -m infer.eval_table --render OUT_DIR` prints the table again.
#
# Tasks at 4K, 8K, 16K and 32K tokens (32k = 32000: + 32 new tokens fits the 32768
# context): NIAH, multi-key NIAH (4 same-kind needles, one asked, exact match),
# numeric passkey, perplexity at the longest length (bands at the others).
# Methods: full, duo / random / razor / rscore at 0.25, 0.5, 0.75, streaming (14);
# perplexity for full, streaming and each pattern at 0.5 (random adds nothing there).
# ATTENTION / PPL_ATTENTION / SPARSITIES choose fewer; KV_DTYPE=int8|int4|k8v4 quantises the
# cache of every method, e.g. the KV-quantisation grid:
#   KV_DTYPE=int4 ATTENTION=full,duo PPL_ATTENTION=full,duo@0.5 SPARSITIES=0.5 infer/eval_qwen.sh ...
#
# Cost on one H200 with the defaults (DEPTHS=4, SAMPLES=1: 16 cells a task and method):
# 28 programs compiled in parallel (~1-2 min of ~10-20 s compiles on 16 cores) plus 5
# perplexity programs (~1 min), then ~2-3 s of prefill a method and task (3 tasks x 14
# methods: ~2 min) and ~5 s of perplexity: about 5-6 min, and ~1-2 min more the first
# time the checkpoint is converted. Raise DEPTHS or SAMPLES when there is more time:
# the run time grows linearly with them, the compile time does not.
set -euo pipefail

if [ "$#" -lt 5 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
PATTERN=$1 RAZOR=$2 RSCORE=$3 OUT=$4 HELDOUT=$5
for d in "$PATTERN" "$RAZOR" "$RSCORE"; do
  [ -e "$d" ] || { echo "eval_qwen.sh: no pattern at $d" >&2; exit 2; }
done
[ -e "$HELDOUT" ] || { echo "eval_qwen.sh: no held-out text at $HELDOUT" >&2; exit 2; }

LENGTHS=${LENGTHS:-4k,8k,16k,32k}
DEPTHS=${DEPTHS:-4}
SAMPLES=${SAMPLES:-1}
SPARSITIES=${SPARSITIES:-0.25,0.5,0.75}
BACKEND=${BACKEND:-auto}
ATTENTION=${ATTENTION:-full,duo,streaming,random,razor,rscore}
PPL_ATTENTION=${PPL_ATTENTION:-full,streaming,duo@0.5,razor@0.5,rscore@0.5}
EXTRA_ARGS=()
[ -n "${HAYSTACK:-}" ] && EXTRA_ARGS=(--haystack "$HAYSTACK")
# KV_DTYPE=int8 / int4 / k8v4: every method's cache quantised (issue 18's accuracy grid)
[ -n "${KV_DTYPE:-}" ] && EXTRA_ARGS+=(--kv-dtype "$KV_DTYPE")

cd "$(dirname "$0")/.."
python -m infer.eval_table \
  --ckpt qwen2.5-coder-0.5b --pattern "$PATTERN" \
  --patterns "razor=$RAZOR,rscore=$RSCORE" \
  --attention "$ATTENTION" --sparsities "$SPARSITIES" \
  --ppl-attention "$PPL_ATTENTION" \
  --tasks niah,mkniah,passkey,ppl --keys 4 \
  --lengths "$LENGTHS" --depths "$DEPTHS" --samples "$SAMPLES" \
  --max-new-tokens 32 --batch-size "$((${DEPTHS} * ${SAMPLES}))" --prefill-chunk 1024 \
  "${EXTRA_ARGS[@]}" --ppl-haystack "$HELDOUT" --ppl-samples 1 \
  --backend "$BACKEND" --no-progress --out "$OUT"
