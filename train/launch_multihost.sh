#!/usr/bin/env bash
# Starts train/train_gates.py as one JAX process per host (multi-host gate training).
#
#   HOSTS="host0 host1 host2 host3" train/launch_multihost.sh --config configs/llama3_8b_duo.yaml \
#       --haystack /data/paul_graham_essays --out /shared/runs/llama3-8b
#       ssh to each host (passwordless), rank i on the i-th; host0 is the coordinator
#   LOCAL_PROCESSES=2 train/launch_multihost.sh --config ...   # N processes on this machine
#       (a check of the wiring; each process gets its share of the CPU devices)
#   srun train/launch_multihost.sh --config ...                # SLURM, Open MPI, Cloud TPU:
#       with neither variable set it runs here with --distributed and JAX finds the cluster
#
# Every host needs the repository at the same path ($REPO, default: this checkout) with
# duojax installed, the checkpoint and the haystack, and --out on a shared file system
# (process 0 writes the pattern; every process restores the checkpoints on --resume).
# PORT (default 12355) is the coordinator's port; PYTHON (default python) the interpreter.
set -euo pipefail

REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python}"
SCRIPT="$REPO/train/train_gates.py"

quote() { printf '%q ' "$@"; }

if [[ -n "${HOSTS:-}" ]]; then
  read -r -a hosts <<<"$HOSTS"
  n=${#hosts[@]}
  coord="${hosts[0]}:$PORT"
  pids=()
  for i in "${!hosts[@]}"; do
    cmd="cd $(quote "$REPO") && $(quote "$PYTHON" "$SCRIPT" --distributed --coordinator "$coord" \
      --num-processes "$n" --process-id "$i" "$@")"
    ssh -o BatchMode=yes "${hosts[$i]}" "$cmd" 2>&1 | sed "s/^/[${hosts[$i]}:$i] /" &
    pids+=($!)
  done
elif [[ -n "${LOCAL_PROCESSES:-}" ]]; then
  n="$LOCAL_PROCESSES"
  pids=()
  for ((i = 0; i < n; i++)); do
    "$PYTHON" "$SCRIPT" --distributed --coordinator "localhost:$PORT" --num-processes "$n" \
      --process-id "$i" "$@" 2>&1 | sed "s/^/[$i] /" &
    pids+=($!)
  done
else
  exec "$PYTHON" "$SCRIPT" --distributed "$@"
fi

status=0
for p in "${pids[@]}"; do
  wait "$p" || status=$?
done
exit "$status"
