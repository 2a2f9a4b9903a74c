#!/usr/bin/env bash
# On a Linux NVIDIA machine prepared by scripts/gpu/install.sh (or any machine with mlx[cuda13] and this
# project installed): the GPU evidence in one command. Results go to ${OUT:-/tmp/vllm-metal-gpu}.
#   scripts/gpu/run.sh tests     # greedy parity on MLX's CUDA device (HF fp32, mlx-lm, batching, chunking,
#                                # preemption, prefix cache, MLX-managed path, 4-bit)
#   scripts/gpu/run.sh paged     # paged vs MLX-managed KV path, concurrency 1/8/32, 100 prompts
#   scripts/gpu/run.sh compare   # the benchmark suite's sweep: vllm-metal vs mlx_lm.server, 1..64 clients
#   scripts/gpu/run.sh decode    # single-stream decode vs the bandwidth limit, plugin vs mlx_lm.generate
#   scripts/gpu/run.sh steps     # a served c=1 step's host time split (VLLM_METAL_DEBUG), paged vs MLX-managed
#   scripts/gpu/run.sh sizes     # 1B/8B bf16 and 8B 4-bit random-weight Llamas at 1-64 clients, one step ahead
#                                # on and off, against mlx-lm's own loop (--mlx-lm-server 1 8: also mlx_lm.server)
#   scripts/gpu/run.sh profile   # a single stream's host time under cProfile, vLLM's engine and the plugin in one
#                                # process (llama-1b bf16, one step ahead on; --checkpoint, --one-step-ahead 0)
#   scripts/gpu/run.sh ngram     # one stream on a code-editing workload, plain vs n-gram speculative decoding
#                                # (bundled model in bf16; --model DIR for another)
#   scripts/gpu/run.sh qmm       # an 8B Llama's layer products at 1-512 rows: 4-bit quantized_matmul vs the 4-bit
#                                # kernel vs bf16 vs dequantize then bf16 (--row-tiles 1 2 4: each kernel layout too)
#   scripts/gpu/run.sh qkernel   # the 4-bit kernel's tests (vs float64 NumPy and MLX's op; runner greedy vs mlx-lm),
#                                # then the qmm products
#   scripts/gpu/run.sh tp        # tensor parallelism on 2 GPUs over NCCL: TP=2 parity tests, then llama-8b bf16
#                                # TP=1 vs TP=2 at 1 and 32 clients (needs a machine with 2 GPUs)
#   scripts/gpu/run.sh kernel    # the paged attention kernel: its tests (vs NumPy float64 and the MLX-op path),
#                                # then one layer's attention, kernel vs MLX ops, for batched decode at ~2k/~8k
#                                # contexts and prefill chunks (llama-1b and llama-8b geometries)
#   scripts/gpu/run.sh context   # 16 and 32 clients with ~2k and ~8k-token prompts on a random 1B Llama: the
#                                # plugin with the kernel on and off, and mlx_lm.server (TPOT, tok/s, TTFT)
#   scripts/gpu/run.sh long      # long concurrent prompts (default 16 x 6000 tokens) on a random-weight
#                                # Llama-3.2-1B-shaped bf16 checkpoint: statuses, peak GPU memory, health after;
#                                # e.g. long --scenario 16x6000@8192 --scenario 4x30000@32768 [--shape llama-8b]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
[ -f /tmp/gpu-env.sh ] && . /tmp/gpu-env.sh
export VLLM_MLX_DEVICE=gpu PYTHONUNBUFFERED=1
out=${OUT:-/tmp/vllm-metal-gpu}
mkdir -p "$out"
python3 -c "import mlx.core as mx; assert mx.cuda.is_available(), 'MLX sees no CUDA GPU'"
case "${1:-tests}" in
  tests)   python3 -m pytest -q -p no:cacheprovider tests/test_parity.py 2>&1 | tee "$out/tests.log" | tail -15 ;;
  paged)   python3 -m benchmarks.investigations.paged_vs_mlx_cache --device gpu --out "$out/paged_vs_mlx_cache.json" "${@:2}" ;;
  compare) python3 -m benchmarks.compare --device gpu --no-protocol --sweep --systems vllm-metal mlx-lm \
             --concurrency 1 2 4 8 16 32 64 --out "$out/compare.json" "${@:2}" ;;
  decode)  python3 -m benchmarks.investigations.decode_roofline --out "$out/decode.json" "${@:2}" ;;
  steps)   python3 -m benchmarks.investigations.served_steps --device gpu --out "$out/served_steps.json" "${@:2}" ;;
  sizes)   python3 -m benchmarks.investigations.decode_sizes --out "$out/decode_sizes.json" "${@:2}" ;;
  profile) python3 -m benchmarks.investigations.host_profile --out "$out/host_profile.json" "${@:2}" ;;
  ngram)   python3 -m benchmarks.investigations.ngram_drafts --device gpu --dtype bfloat16 --out "$out/ngram_drafts.json" "${@:2}" ;;
  qmm)     python3 -m benchmarks.investigations.quantized_matmul --out "$out/quantized_matmul.json" "${@:2}" ;;
  qkernel) python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernel.py tests/test_quantized.py \
             -k "kernel or bf16" 2>&1 | tee "$out/qkernel-tests.log" | tail -15
           python3 -m benchmarks.investigations.quantized_matmul --out "$out/quantized_matmul.json" "${@:2}" ;;
  kernel)  python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernel.py 2>&1 | tee "$out/kernel-tests.log" | tail -15
           python3 -m benchmarks.investigations.paged_kernel --out "$out/paged_kernel.json" "${@:2}" ;;
  context) python3 -m benchmarks.investigations.long_context --out "$out/long_context.json" "${@:2}" ;;
  long)    python3 -m benchmarks.investigations.long_prompts --out "$out/long_prompts.json" "${@:2}" ;;
  tp)      export NCCL_NVLS_ENABLE=0
           python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py -k matches 2>&1 | tee "$out/tp-tests.log" | tail -15
           python3 -m benchmarks.investigations.decode_sizes --checkpoints llama-8b --concurrency 1 32 \
             --one-step-ahead 1 --tensor-parallel-size 1 2 --out "$out/tensor_parallel.json" "${@:2}" ;;
  *) echo "usage: $0 tests|qkernel|kernel|context|paged|compare|decode|steps|sizes|profile|ngram|qmm|long|tp [args]"; exit 2 ;;
esac
