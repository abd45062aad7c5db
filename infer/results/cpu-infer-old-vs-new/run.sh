#!/usr/bin/env bash
# python -m duojax.infer on the CPU: commit a0bbd73 (before the NNX house) vs this checkout,
# alternating, 3 timed runs each after one warm-up (which converts into its own DUOJAX_HOME and
# fills the compile cache). Prints one JSON line per run.
#   git worktree add /tmp/old a0bbd73 && OLD=/tmp/old bash infer/results/cpu-infer-old-vs-new/run.sh OUT
set -u
OLD=${OLD:?set OLD to a worktree of the old commit}; NEW=${NEW:-$(pwd)}
OUT=${1:-/tmp/cpu_old_new}; mkdir -p $OUT
P="Explain in a paragraph why the sky is blue."
run() {  # name dir home
  ( cd $2 && /usr/bin/time -f "%e" -o $OUT/$1.time env DUOJAX_HOME=$3 python3 -m duojax.infer --json --chat \
      --prompt "$P" --max-new-tokens 64 > $OUT/$1.json 2> $OUT/$1.err )
  python3 - "$1" "$OUT" <<'PY'
import json, sys
n, out = sys.argv[1], sys.argv[2]
d = json.loads(open(f"{out}/{n}.json").read().strip().splitlines()[-1])
keep = {k: d[k] for k in d if any(s in k for s in ("second", "tokens", "attention"))}
print(json.dumps({"run": n, "wall_s": float(open(f"{out}/{n}.time").read().split()[-1]), **keep}))
PY
}
run old-warm "$OLD" /tmp/home_old
run new-warm "$NEW" /tmp/home_new
for i in ${REPS:-1 2 3}; do run old-$i "$OLD" /tmp/home_old; run new-$i "$NEW" /tmp/home_new; done
