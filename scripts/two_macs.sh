#!/usr/bin/env bash
# Serve one model from two machines (two Macs on Ethernet or Thunderbolt): tensor parallelism
# over MLX's ring backend, one rank per machine, vLLM's multiprocessing executor spanning both.
#
#   on the first machine:   scripts/two_macs.sh head   FIRST_IP SECOND_IP MODEL [vllm serve args...]
#   on the second machine:  scripts/two_macs.sh worker FIRST_IP SECOND_IP MODEL [vllm serve args...]
#
# Both run the same model path (copy the checkpoint to both), the same vllm-metal install and the
# same extra arguments. The head serves the API (add --host/--port as usual); the worker is
# headless. Rank 0 listens for the ring on FIRST_IP:RING_PORT, rank 1 on SECOND_IP:RING_PORT+1,
# and vLLM's control plane uses FIRST_IP:MASTER_PORT: open those ports between the machines.
#
# Settings: RING_PORT (default 5500), MASTER_PORT (29500), VLLM_CMD (default `vllm`),
# VLLM_METAL_HOSTFILE (where the ring hostfile is written; default under ~/.cache/vllm-metal).
set -euo pipefail
if [ $# -lt 4 ] || { [ "$1" != head ] && [ "$1" != worker ]; }; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
role=$1 first=$2 second=$3 model=$4
shift 4
ring_port=${RING_PORT:-5500}
master_port=${MASTER_PORT:-29500}
hostfile=${VLLM_METAL_HOSTFILE:-$HOME/.cache/vllm-metal/ring-hosts.json}
mkdir -p "$(dirname "$hostfile")"
printf '[["%s:%s"], ["%s:%s"]]\n' "$first" "$ring_port" "$second" "$((ring_port + 1))" > "$hostfile"
export VLLM_METAL_HOSTFILE=$hostfile

args=(--tensor-parallel-size 2 --nnodes 2 --master-addr "$first" --master-port "$master_port")
if [ "$role" = head ]; then
  args+=(--node-rank 0)
else
  args+=(--node-rank 1 --headless)
fi
# shellcheck disable=SC2086  # VLLM_CMD may be a command with arguments
exec ${VLLM_CMD:-vllm} serve "$model" "${args[@]}" "$@"
