#!/usr/bin/env bash
# Run a fa_jax command on every host of a Cloud TPU pod slice: one process per host, joined by
# `fa-jax ... --distributed` (jax.distributed.initialize finds the other hosts on TPU VMs by itself).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash scripts/launch_tpu_pod.sh \
#       pretrain --config configs/pretrain_llama31_8b_to_llama32_1b.py data.train=gs-fuse/corpus/*.jsonl
#
# Every host needs the repository at the same path (REPO, default ~/fa_jax) and the same data and model paths
# (a shared or copied disk; a checkpoint directory every host can write for orbax). The first run creates .venv on
# each host with fa_jax and jax[tpu] (not scripts/setup_env.sh: its pinned CPU torch and test tools are for the
# development machines). For a multi-GPU host no launcher is needed: one process sees all its GPUs.
# For other clusters set FA_JAX_COORDINATOR=host:port, FA_JAX_NUM_PROCESSES and FA_JAX_PROCESS_ID on each process.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the name of the pod slice}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-~/fa_jax}"
[ "$#" -ge 1 ] || { echo "usage: TPU_NAME=... ZONE=... $0 pretrain|sft --config FILE [key=value ...]" >&2; exit 2; }
COMMAND="$1"; shift
case "$COMMAND" in pretrain|sft) ;; *) echo "$0: only pretrain and sft run on a pod slice, got '$COMMAND'" >&2; exit 2;; esac
ARGS="$(printf ' %q' "$@")"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && { [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'; }; } \
   && .venv/bin/python -m fa_jax $COMMAND --distributed$ARGS"
