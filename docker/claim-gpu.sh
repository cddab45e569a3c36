#!/usr/bin/env bash
# The worker image's entry point: claim one GPU of this machine for this container, then run
# the command (`aligndiff worker`) with only that GPU visible to it.
#
# NOTE: a compose GPU reservation of `count: N` gives every container devices 0..N-1, so with
# `count: 1` all the replicas of `docker compose up --scale worker=N` would share GPU 0. The
# worker service reserves every GPU instead, and each replica takes the first GPU no other
# replica holds: an exclusive lock per GPU, in a volume the replicas on one machine share. The
# worker inherits the lock's descriptor through `exec`, so it holds the GPU exactly as long as
# it lives, and a dead replica's GPU goes to the next replica that starts.
#
# The candidates are CUDA_VISIBLE_DEVICES when it is set (e.g. "2,3" leaves the other GPUs
# alone), else every GPU nvidia-smi lists. Unless ALIGNDIFF_DEVICE is exactly "cuda" (a CPU
# worker, or an explicit "cuda:N"), the command runs as it is, with nothing claimed.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "claim-gpu: no command to run" >&2
  exit 2
fi
if [[ "${ALIGNDIFF_DEVICE:-cpu}" != "cuda" ]]; then
  exec "$@"
fi

lock_dir="${GPU_LOCK_DIR:-/var/lib/aligndiff/gpu-locks}"
mkdir -p "$lock_dir"

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=',' read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  if ! command -v nvidia-smi > /dev/null; then
    echo "claim-gpu: nvidia-smi is missing: is the container started with a GPU reservation?" >&2
    exit 1
  fi
  mapfile -t gpus < <(nvidia-smi --query-gpu=uuid --format=csv,noheader)
fi

for gpu in "${gpus[@]}"; do
  gpu="${gpu//[[:space:]]/}"
  [[ -n "$gpu" ]] || continue
  exec {lock_fd}>> "$lock_dir/gpu-${gpu//[^A-Za-z0-9._-]/_}.lock"
  if flock --nonblock "$lock_fd"; then
    echo "claim-gpu: this worker runs on GPU $gpu" >&2
    export CUDA_VISIBLE_DEVICES="$gpu"
    exec "$@"
  fi
  exec {lock_fd}>&-
done

echo "claim-gpu: no free GPU among [${gpus[*]}]: every one has a worker on this machine" \
  "(run at most one worker per GPU)" >&2
exit 1
