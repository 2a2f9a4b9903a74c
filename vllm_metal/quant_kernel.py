"""A 4-bit quantized linear layer's product on tensor cores, for the row counts of a decode step (CUDA).

MLX CUDA's ``quantized_matmul`` reads a 4-bit weight at a fraction of the device's bandwidth and
slows down as rows are added (docs/benchmarks.md), so a 4-bit model served to a few clients ran
below the same model in bf16. This kernel reads each weight word once per 32 tokens and does the
arithmetic on the tensor cores (``mma.sync`` m16n8k16, fp32 accumulation).

The product, exactly as MLX's affine quantization defines the weight (``w = scale * q + bias``
per group of ``GS`` columns): for each group of 64 columns,

    y[t, n] += scale[n] * sum_k x[t, k] * q[n, k]  +  bias[n] * sum_k x[t, k]

The 4-bit ``q`` are exact in bf16/fp16, so the tensor cores see the checkpoint's integers, and a
second tensor-core product with a ones matrix gives the group sums of ``x`` in the accumulator's
own layout. Only the activations' rounding (they are bf16/fp16 already) enters; the scales and
biases are applied in fp32.

Layout of one launch: a threadgroup of 4 warps; each warp owns 16 weight rows (output columns)
and ``8 * NT`` tokens, and walks its K range 64 columns (one word pair per row and lane) at a
time, with the words of the next ``PF`` chunks in flight while one computes. Inside a 64-column
chunk the columns are mapped onto the instruction's k positions so that each lane's share of both
operands is contiguous in memory: lane ``(g, t)`` takes columns ``16t .. 16t+15`` of its rows (two
uint32 words) and of its token (32 bytes); the sum over k does not depend on the order. A
threadgroup's 4 warps are ``WR`` row tiles times ``4 / WR`` K ranges: row tiles share the
activations through L1, K ranges (summed in shared memory) give a layer with few output columns
enough warps to keep the weight reads in flight.

The MLX op (``mx.quantized_matmul``) stays the reference and the path everywhere else (Metal, the
CPU, 2/3/5/6/8-bit weights, group size 32, fp32 activations); tests compare the two and float64
NumPy on an NVIDIA GPU (``scripts/gpu/run.sh qkernel``). The kernel has not been run on a GPU yet
(only compiled for sm_90 with nvcc, and its lane-to-element mapping checked against the PTX
fragment layout), so ``VLLM_METAL_QUANTIZED_KERNEL`` is ``off`` by default.
"""

from __future__ import annotations

import functools

import mlx.core as mx

WARPS = 4
TARGET_WARPS = 1024  # warps a launch keeps (about 8 per SM of an H100 / H200) when row tiles share K
PREFETCH = 2  # 64-column chunks of weight words a warp has in flight
MAX_TOKEN_TILES = 4  # 32 tokens per launch row (more would spill registers)
GROUP_SIZES = (64, 128)
DTYPES = (mx.bfloat16, mx.float16)


class QuantizedKernelUnsupported(ValueError):
    """The layer or activations are outside what the kernel takes; MLX's op serves them."""


_HEADER = """
// Two 4-bit values (nibbles s and s+4 of a word) as a bf16x2 / f16x2 pair, exactly.
template <typename T> __device__ __forceinline__ uint32_t vm_q_pair(uint32_t w, int s);
template <> __device__ __forceinline__ uint32_t vm_q_pair<__nv_bfloat16>(uint32_t w, int s) {
  // 0x4300 is 128.0 in bf16 and its mantissa's last 4 bits count ones: 0x430q = 128 + q.
  uint32_t v = ((w >> (4 * s)) & 0x000F000Fu) | 0x43004300u, r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(0xC300C300u));
  return r;
}
template <> __device__ __forceinline__ uint32_t vm_q_pair<__half>(uint32_t w, int s) {
  // 0x6400 is 1024.0 in fp16, whose last mantissa bits count ones: 0x640q = 1024 + q.
  uint32_t v = ((w >> (4 * s)) & 0x000F000Fu) | 0x64006400u, r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3C003C00u), "r"(0xE400E400u));
  return r;
}
template <typename T> __device__ __forceinline__ uint32_t vm_ones();
template <> __device__ __forceinline__ uint32_t vm_ones<__nv_bfloat16>() { return 0x3F803F80u; }
template <> __device__ __forceinline__ uint32_t vm_ones<__half>() { return 0x3C003C00u; }

// d += a (16x16, row) * b (16x8, col), fp32 accumulation.
template <typename T> __device__ __forceinline__ void vm_mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void vm_mma<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void vm_mma<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void vm_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void vm_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ float vm_to_float(float v) { return v; }
__device__ __forceinline__ float vm_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float vm_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
"""

# Inputs: x (M, K) T; w (N, K/8) uint32; scales, biases (N, K/GS) S. Output: y (M, N) T.
# Threadgroup: WR x WK warps (WR row tiles of 16, each K range split over WK warps and summed in
# shared memory). Grid: (ceil(N / (16 WR)) * 32 WR WK, 1, ceil(M / (8 NT))).
_BODY = """
  constexpr int WK = WARPS / WR;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wr = warp % WR, wk = warp / WR;
  const int g = lane >> 2, t = lane & 3;
  const int M = x_shape[0], K = x_shape[1], N = w_shape[0];
  const int KW = K / 8, NG = K / GS;
  const int row0 = (blockIdx.x * WR + wr) * 16;
  const bool live = row0 < N;  // N % 16 == 0: a warp's 16 rows are all real or all past the end
  const int tok0 = blockIdx.z * (8 * NT);
  const int chunks = K / 64, per = (chunks + WK - 1) / WK;
  const int c_begin = wk * per, c_end = live ? min(chunks, c_begin + per) : c_begin;

  // This lane's weight rows (row0 + g, row0 + g + 8), from its word pair 2t, 2t + 1 of a chunk.
  const int r0 = live ? row0 + g : 0;
  const uint32_t* w0 = w + (size_t)r0 * KW + 2 * t;
  const uint32_t* w1 = w0 + (size_t)8 * KW;
  const S* s0p = scales + (size_t)r0 * NG;
  const S* s1p = s0p + (size_t)8 * NG;
  const S* z0p = biases + (size_t)r0 * NG;
  const S* z1p = z0p + (size_t)8 * NG;
  // This lane's tokens of the B operand (tok0 + 8n + g), columns 16t .. 16t + 15 of a chunk.
  const T* xp[NT];
  bool xlive[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int tk = tok0 + 8 * n + g;
    xlive[n] = tk < M;
    xp[n] = x + (size_t)min(tk, M - 1) * K + 16 * t;
  }

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
  const uint32_t ones[4] = {vm_ones<T>(), vm_ones<T>(), vm_ones<T>(), vm_ones<T>()};

  // The weight words of the next PF chunks are in flight while a chunk computes.
  uint2 wb0[PF], wb1[PF];
#pragma unroll
  for (int j = 0; j < PF; ++j) {
    if (c_begin + j < c_end) {
      wb0[j] = *reinterpret_cast<const uint2*>(w0 + (c_begin + j) * 8);
      wb1[j] = *reinterpret_cast<const uint2*>(w1 + (c_begin + j) * 8);
    }
  }
#pragma unroll 1
  for (int c0 = c_begin; c0 < c_end; c0 += PF) {
#pragma unroll
  for (int j = 0; j < PF; ++j) {
    const int c = c0 + j;
    if (c >= c_end) break;
    const uint2 wv0 = wb0[j], wv1 = wb1[j];
    if (c + PF < c_end) {
      wb0[j] = *reinterpret_cast<const uint2*>(w0 + (c + PF) * 8);
      wb1[j] = *reinterpret_cast<const uint2*>(w1 + (c + PF) * 8);
    }
    uint4 xv[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      if (xlive[n]) {
        xv[n][0] = *reinterpret_cast<const uint4*>(xp[n] + c * 64);
        xv[n][1] = *reinterpret_cast<const uint4*>(xp[n] + c * 64 + 8);
      } else {
        xv[n][0] = make_uint4(0, 0, 0, 0);
        xv[n][1] = make_uint4(0, 0, 0, 0);
      }
    }
    float qs[NT][4], xs[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) qs[n][i] = xs[n][i] = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      // k positions (2t, 2t+1 | 2t+8, 2t+9) of step s are columns 16t + (s, s+4 | s+8, s+12).
      const uint32_t a[4] = {vm_q_pair<T>(wv0.x, s), vm_q_pair<T>(wv1.x, s), vm_q_pair<T>(wv0.y, s),
                             vm_q_pair<T>(wv1.y, s)};
      const uint32_t sel = (s & 1) ? 0x7632u : 0x5410u;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[n][0]);  // columns 16t + 2i, 2i + 1
        const uint32_t b0 = __byte_perm(xw[s >> 1], xw[(s >> 1) + 2], sel);
        const uint32_t b1 = __byte_perm(xw[4 + (s >> 1)], xw[6 + (s >> 1)], sel);
        vm_mma<T>(qs[n], a, b0, b1);
        vm_mma<T>(xs[n], ones, b0, b1);
      }
    }
    const int grp = (c * 64) / GS;
    const float s0 = vm_to_float(s0p[grp]), s1 = vm_to_float(s1p[grp]);
    const float z0 = vm_to_float(z0p[grp]), z1 = vm_to_float(z1p[grp]);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      // Accumulator i: row g (i < 2) or g + 8, token 2t + (i & 1) of the n-tile.
      acc[n][0] += s0 * qs[n][0] + z0 * xs[n][0];
      acc[n][1] += s0 * qs[n][1] + z0 * xs[n][1];
      acc[n][2] += s1 * qs[n][2] + z1 * xs[n][2];
      acc[n][3] += s1 * qs[n][3] + z1 * xs[n][3];
    }
  }
  }

  if constexpr (WK > 1) {  // the K ranges' sums meet in the first warp of each row tile
    __shared__ float part[(WK > 1 ? WK - 1 : 1) * WR * 32 * NT * 4];
    if (wk > 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[(((wk - 1) * WR + wr) * NT * 4 + n * 4 + i) * 32 + lane] = acc[n][i];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int j = 0; j < WK - 1; ++j)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] += part[((j * WR + wr) * NT * 4 + n * 4 + i) * 32 + lane];
  }
  if (!live) return;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tk = tok0 + 8 * n + 2 * t + (i & 1);
      if (tk < M) vm_store(y + (size_t)tk * N + row0 + g + 8 * (i >> 1), acc[n][i]);
    }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(name="vllm_metal_q4_matmul", input_names=["x", "w", "scales", "biases"],
                               output_names=["y"], source=_BODY, header=_HEADER)


def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU (where the kernel runs)."""
    return hasattr(mx, "cuda") and mx.cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu


def check(weight_shape: tuple[int, ...], group_size: int, bits: int, mode: str = "affine") -> None:
    """Raise ``QuantizedKernelUnsupported`` naming what the kernel cannot take of a layer."""
    if bits != 4 or mode != "affine":
        raise QuantizedKernelUnsupported(f"{bits}-bit {mode} weights (4-bit affine is needed)")
    if group_size not in GROUP_SIZES:
        raise QuantizedKernelUnsupported(f"group size {group_size} ({' or '.join(map(str, GROUP_SIZES))} is needed)")
    if len(weight_shape) != 2 or weight_shape[0] % 16 or (weight_shape[1] * 8) % 64:
        raise QuantizedKernelUnsupported(f"packed weight {tuple(weight_shape)} (2-D, output columns a multiple "
                                         "of 16, input columns of 64)")


def takes(x: mx.array) -> bool:
    """Whether the kernel takes activations ``x`` (bf16 or fp16; other dtypes go to MLX's op)."""
    return x.dtype in DTYPES


def token_tiles(m: int) -> int:
    """NT: 8-token tiles a launch row takes for ``m`` tokens (more tokens: more launch rows)."""
    return 1 if m <= 8 else 2 if m <= 16 else MAX_TOKEN_TILES


def row_tiles(n: int, nt: int, token_rows: int) -> int:
    """WR: 16-row tiles per threadgroup (its other warps split K). With one token tile the
    activations are small next to the weights and K splits win; with more, row tiles that share
    them, as far as the launch keeps ``TARGET_WARPS`` warps."""
    for wr in (4, 2):
        if nt > 1 and n // (16 * wr) * token_rows * WARPS >= TARGET_WARPS:
            return wr
    return 1


def q4_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
              nt: int | None = None, wr: int | None = None, pf: int = PREFETCH) -> mx.array:
    """``x @ dequantize(w, scales, biases).T`` for ``x`` (..., K): what ``mx.quantized_matmul(x, w,
    scales, biases, transpose=True, group_size=group_size, bits=4)`` computes. ``nt``, ``wr`` and
    ``pf`` (chunks of weight words in flight per warp) override the launch shape (benchmarks)."""
    k = x.shape[-1]
    n = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    nt = nt or token_tiles(m)
    token_rows = -(-m // (8 * nt))
    wr = wr or row_tiles(n, nt, token_rows)
    grid = (-(-n // (16 * wr)) * WARPS * 32, 1, token_rows)
    template = [("T", x.dtype), ("S", scales.dtype), ("GS", group_size), ("WARPS", WARPS), ("WR", wr), ("NT", nt),
                ("PF", pf)]
    y = _kernel()(inputs=[x2, w, scales, biases], template=template, grid=grid, threadgroup=(WARPS * 32, 1, 1),
                  output_shapes=[(m, n)], output_dtypes=[x.dtype])[0]
    return y.reshape(*lead, n)
