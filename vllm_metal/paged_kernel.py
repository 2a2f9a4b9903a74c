"""Paged attention as one GPU kernel per layer: queries read K/V where they lie in the pools.

``attention.paged_attention`` (MLX ops) gathers every sequence's blocks into a padded dense copy,
builds a mask and runs SDPA over it, so a batched step costs S x the longest context and copies
the batch's K/V once per layer. This kernel reads each K/V row once, straight from the pools
through the block tables, over each sequence's own context. It is the same computation as the
MLX-op path, which stays the reference (tests compare the two and NumPy float64) and the path
wherever the kernel is not used.

The algorithm (``ATTENTION_BODY``, one source for both backends, their names for barriers,
address spaces and simdgroup reductions in ``_HEADERS``):

- The step's query rows are cut into *tiles*: a run of up to ``R`` consecutive rows of one
  sequence (a decode token is a tile of one row). A tile and one K/V head make ``G * rows`` query
  vectors (GQA: the ``G`` query heads of that K/V head; K/V are never repeated).
- One threadgroup of 4 simdgroups (CUDA: warps) of 32 lanes runs a (tile, K/V head, partition).
  The 4 simdgroups are laid out ``WQ x WC``: ``WQ`` groups split the query vectors, ``WC``
  groups split the context positions (decode: 1 x 4; prefill tiles: 4 x 1).
- A simdgroup walks its positions 32 at a time, one position per lane: the lane finds its K row
  through the block table, computes its queries' scores (causal by absolute position, a sliding
  window, a soft cap), and the simdgroup keeps an online softmax (running max and sum) per query;
  then each lane accumulates ``DV / 32`` output columns over those 32 positions' V rows.
- Few tiles (a decode batch smaller than the GPU) split each context into ``P`` partitions run by
  separate threadgroups; each writes its unnormalised output and (max, sum), and a second small
  kernel merges them (flash-decoding). With one partition the kernel normalises and writes the
  output itself. Sinks (a per-head logit with no value) enter the final normalisation.

``auto`` selects the CUDA kernel where MLX computes on CUDA (measured in docs/benchmarks.md).
The Metal kernel is only used when asked for (``VLLM_METAL_ATTENTION_KERNEL=on`` on a Mac): it
has never been run on Apple hardware by us.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

LANES = 32  # a CUDA warp / an Apple simdgroup
WARPS = 4  # simdgroups per threadgroup
MIN_PART = 256  # context positions a partition gets at least (below that, not worth a merge)
TARGET_GROUPS = 512  # threadgroups a step's launch aims for (a few per streaming multiprocessor)
SMEM_BYTES = {"cuda": 46 * 1024, "metal": 30 * 1024}  # static shared memory the kernel may use
QUERY_VECTORS = {"cuda": 64, "metal": 16}  # query vectors a prefill tile holds at most
MAX_HEAD_DIM = 256


class KernelUnsupported(ValueError):
    """The layer's geometry is outside what the kernel handles; the MLX-op path serves it."""


@dataclass(frozen=True)
class Layout:
    """Compile-time shape of one launch: query vectors per tile and how the simdgroups split."""

    nq: int  # query vectors a tile holds at most (G * rows)
    wq: int  # simdgroups splitting the query vectors
    wc: int  # simdgroups splitting the positions


def check_geometry(q_heads: int, kv_heads: int, head_dim: int, v_head_dim: int) -> None:
    """Raise ``KernelUnsupported`` naming what the kernel cannot take."""
    if kv_heads < 1 or q_heads % kv_heads:
        raise KernelUnsupported(f"{q_heads} query heads over {kv_heads} K/V heads")
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        raise KernelUnsupported(f"head dim {head_dim} (a multiple of 8 up to {MAX_HEAD_DIM} is needed)")
    if v_head_dim not in (32, 64, 128, 256):
        raise KernelUnsupported(f"value head dim {v_head_dim} (32, 64, 128 or 256 is needed)")
    if q_heads // kv_heads > QUERY_VECTORS["metal"]:
        raise KernelUnsupported(f"{q_heads // kv_heads} query heads per K/V head (at most "
                                f"{QUERY_VECTORS['metal']})")


def _smem_bytes(nq: int, wq: int, wc: int, d: int, dv: int) -> int:
    """Shared memory of one threadgroup: the scaled queries, each simdgroup's probabilities, and
    (with ``wc`` > 1) each position group's partial state for the merge."""
    qpw = -(-nq // wq)
    merge = wc * nq * (dv + 2) if wc > 1 else 0
    return 4 * (nq * d + WARPS * qpw * LANES + merge)


def layout(backend: str, g: int, d: int, dv: int, prefill: bool) -> Layout:
    """The launch layout for ``g`` query heads per K/V head: decode steps put all 4 simdgroups on
    positions (each sees every query of the row), steps with prefill chunks split the queries."""
    limit = SMEM_BYTES[backend]
    if not prefill:
        for wc in (4, 2, 1):
            if _smem_bytes(g, WARPS // wc, wc, d, dv) <= limit:
                return Layout(g, WARPS // wc, wc)
    nq = max(g, QUERY_VECTORS[backend] // g * g)
    while nq > g and _smem_bytes(nq, WARPS, 1, d, dv) > limit:
        nq -= g
    return Layout(nq, WARPS, 1)


@dataclass
class Tiles:
    """One step's tiles for one layout: ``(n, 4)`` int32 rows of (sequence, first packed row,
    rows, first position), the block tables ``(S, nb)`` and the partition count."""

    tiles: mx.array
    tables: mx.array
    count: int
    parts: int


@dataclass
class KernelStep:
    """The step's sequences as the kernel sees them (host arrays); ``tiles`` caches one
    ``Tiles`` per (rows per tile, K/V heads)."""

    lens: np.ndarray  # (S,) query rows per sequence
    starts: np.ndarray  # (S,) first query position
    first_row: np.ndarray  # (S,) first packed row
    table: np.ndarray  # (S, nb) physical block ids (padding: 0)
    block_size: int
    num_tokens: int
    _tiles: dict[tuple[int, int, int | None], Tiles] | None = None

    @property
    def prefill(self) -> bool:
        return bool((self.lens > 1).any())

    @classmethod
    def build(cls, lens: list[int], starts: list[int], tables: list[np.ndarray], block_size: int) -> KernelStep:
        lens_a = np.asarray(lens, dtype=np.int64)
        starts_a = np.asarray(starts, dtype=np.int64)
        need = -(-(starts_a + lens_a) // block_size)
        table = np.zeros((len(lens), int(need.max())), dtype=np.int32)
        for i, (t, k) in enumerate(zip(tables, need, strict=True)):
            table[i, :k] = t[:k]
        first = np.concatenate([[0], np.cumsum(lens_a)[:-1]])
        return cls(lens_a, starts_a, first, table, block_size, int(lens_a.sum()))

    def tiles(self, rows: int, kv_heads: int, window: int | None) -> Tiles:
        key = (rows, kv_heads, window)
        if self._tiles is None:
            self._tiles = {}
        if key not in self._tiles:
            self._tiles[key] = self._make(rows, kv_heads, window)
        return self._tiles[key]

    def _make(self, rows: int, kv_heads: int, window: int | None) -> Tiles:
        per_seq = -(-self.lens // rows)
        seq = np.repeat(np.arange(len(self.lens)), per_seq)
        k = np.arange(len(seq)) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)  # tile index within its sequence
        off = k * rows
        n = np.minimum(rows, self.lens[seq] - off)
        tiles = np.stack([seq, self.first_row[seq] + off, n, self.starts[seq] + off], axis=1).astype(np.int32)
        ends = tiles[:, 3] + tiles[:, 2]
        lows = np.zeros_like(ends) if window is None else np.maximum(0, tiles[:, 3] - window + 1)
        longest = int((ends - lows).max())
        parts = max(1, min(-(-TARGET_GROUPS // (len(seq) * kv_heads)), longest // MIN_PART))
        return Tiles(mx.array(tiles), mx.array(self.table), len(seq), parts)


# Each backend's names for what the one kernel body below needs: address spaces, barriers,
# simdgroup reductions, fast math, and K/V row loads (16-byte vector loads on CUDA).
_HEADERS = {
    "cuda": """
#define VM_SHARED __shared__
#define VM_TG
#define VM_UNROLL _Pragma("unroll")
#define VM_UNROLL_4 _Pragma("unroll 4")
#define VM_UNROLL_8 _Pragma("unroll 8")
#define VM_SYNC_ALL() __syncthreads()
#define VM_SYNC_SIMD() __syncwarp()
#define VM_EXP(x) __expf(x)
#define VM_TANH(x) tanhf(x)
#define VM_FMAX(a, b) fmaxf(a, b)
__device__ __forceinline__ float vm_float(float x) { return x; }
__device__ __forceinline__ float vm_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float vm_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T vm_cast(float x);
template <> __device__ __forceinline__ float vm_cast<float>(float x) { return x; }
template <> __device__ __forceinline__ __half vm_cast<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 vm_cast<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <int N, typename T> __device__ __forceinline__ void vm_load(float* dst, const T* src) {
  const mlx::core::cu::AlignedVector<T, N> v = *reinterpret_cast<const mlx::core::cu::AlignedVector<T, N>*>(src);
#pragma unroll
  for (int j = 0; j < N; ++j) dst[j] = vm_float(v[j]);
}
__device__ __forceinline__ float vm_simd_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float vm_simd_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
""",
    "metal": """
#define VM_SHARED threadgroup
#define VM_TG threadgroup
#define VM_UNROLL
#define VM_UNROLL_4
#define VM_UNROLL_8
#define VM_SYNC_ALL() threadgroup_barrier(mem_flags::mem_threadgroup)
#define VM_SYNC_SIMD() simdgroup_barrier(mem_flags::mem_threadgroup)
#define VM_EXP(x) fast::exp(x)
#define VM_TANH(x) precise::tanh(x)
#define VM_FMAX(a, b) max(a, b)
template <typename U> inline float vm_float(U x) { return float(x); }
template <typename U> inline U vm_cast(float x) { return U(x); }
template <int N, typename P> inline void vm_load(thread float* dst, P src) {
  for (int j = 0; j < N; ++j) dst[j] = float(src[j]);
}
inline float vm_simd_max(float x) { return simd_max(x); }
inline float vm_simd_sum(float x) { return simd_sum(x); }
""",
}

# Where each threadgroup is (CUDA's built-ins; the Metal attributes MLX passes when named here).
# ``tid``/``nthreads`` are names for the built-ins rather than copies, so the CUDA code is the one
# measured (scripts/gpu/run.sh kernel).
_PROLOGUES = {
    "cuda": """
  const int tile = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
#define nthreads blockDim.x
""",
    "metal": """
  const int tile = threadgroup_position_in_grid.x, kvh = threadgroup_position_in_grid.y;
  const int part = threadgroup_position_in_grid.z, parts = threadgroups_per_grid.z;
  const int tid = thread_position_in_threadgroup.x;
  const int warp = simdgroup_index_in_threadgroup, lane = thread_index_in_simdgroup;
#define nthreads threads_per_threadgroup.x
""",
}
_MERGE_PROLOGUES = {
    "cuda": """
  const size_t th = blockIdx.x;
#define tid threadIdx.x
#define nthreads blockDim.x
""",
    "metal": """
  const size_t th = threadgroup_position_in_grid.x;
#define tid thread_position_in_threadgroup.x
#define nthreads threads_per_threadgroup.x
""",
}

# The attention kernel. Inputs: q (T, H, D); k_pool (slots, KVH, 1, D); v_pool (slots, KVH, 1, DV);
# tables (S, NB) int32; tiles (n, 4) int32; params (2,) float32 = (scale, soft cap); sinks (H,)
# float32. Outputs: one partition: out (T, H, DV); several: part_out (P, T, H, DV) and stats
# (P, T, H, 2) float32 (``EMIT``).
ATTENTION_BODY = """
  constexpr int QPW = (NQ + WQ - 1) / WQ;   // query vectors per simdgroup
  constexpr int DPL = DV / 32;              // output columns per lane
  VM_SHARED float sQ[NQ * D];
  VM_SHARED float sP[4 * QPW * 32];
  VM_SHARED float sMerge[(WC > 1) ? WC * NQ * (DV + 2) : 1];

  const int wq = warp % WQ, wc = warp / WQ;
  const int H = q_shape[1], T_rows = q_shape[0], KVH = k_pool_shape[1], NB = tables_shape[1];
  const int seq = tiles[tile * 4], row0 = tiles[tile * 4 + 1];
  const int nrows = tiles[tile * 4 + 2], pos0 = tiles[tile * 4 + 3];
  const int nq = nrows * G;
  const float scale = params[0], cap = params[1];

  for (int e = tid; e < nq * D; e += nthreads) {
    const int i = e / D, d = e % D;
    const int r = i / G, g = i % G;
    sQ[e] = vm_float(q[((size_t)(row0 + r) * H + kvh * G + g) * D + d]) * scale;
  }
  VM_SYNC_ALL();

  // This partition's share of the tile's visible context [lo_all, hi_all).
  const int hi_all = pos0 + nrows;
  const int lo_all = (WINDOW > 0) ? max(0, pos0 - WINDOW + 1) : 0;
  const int per = ((hi_all - lo_all + parts - 1) / parts + 31) / 32 * 32;
  const int lo = lo_all + part * per;
  const int hi = min(hi_all, lo + per);

  float m[QPW], l[QPW], acc[QPW][DPL];
VM_UNROLL
  for (int i = 0; i < QPW; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
VM_UNROLL
    for (int j = 0; j < DPL; ++j) acc[i][j] = 0.f;
  }
  VM_TG float* myP = sP + warp * QPW * 32;
  const auto table = tables + (size_t)seq * NB;   // Metal passes small inputs in `constant` memory

  for (int base = lo; base < hi; base += 32 * WC) {
    const int c0 = base + wc * 32;
    const int pos = c0 + lane;
    const bool in_part = pos < hi;
    float s[QPW];
VM_UNROLL
    for (int i = 0; i < QPW; ++i) s[i] = 0.f;
    if (in_part) {
      const int slot = table[pos / BS] * BS + pos % BS;
      const auto krow = k_pool + ((size_t)slot * KVH + kvh) * D;
VM_UNROLL_4
      for (int d = 0; d < D; d += 8) {
        float kf[8];
        vm_load<8>(kf, krow + d);
VM_UNROLL
        for (int i = 0; i < QPW; ++i) {
          const int qi = wq + WQ * i;
          if (qi < nq) {
            const VM_TG float* qrow = sQ + qi * D + d;
            float acc_s = s[i];
VM_UNROLL
            for (int j = 0; j < 8; ++j) acc_s += qrow[j] * kf[j];
            s[i] = acc_s;
          }
        }
      }
    }
VM_UNROLL
    for (int i = 0; i < QPW; ++i) {
      const int qi = wq + WQ * i;
      if (qi >= nq) break;   // uniform across the simdgroup
      const int qpos = pos0 + qi / G;
      const bool valid = in_part && pos <= qpos && (WINDOW == 0 || pos > qpos - WINDOW);
      float sc = s[i];
      if (SOFTCAP) sc = cap * VM_TANH(sc / cap);
      sc = valid ? sc : -INFINITY;
      const float mnew = VM_FMAX(m[i], vm_simd_max(sc));
      const float p = valid ? VM_EXP(sc - mnew) : 0.f;
      const float alpha = (m[i] == -INFINITY) ? 0.f : VM_EXP(m[i] - mnew);
      l[i] = l[i] * alpha + vm_simd_sum(p);
      m[i] = mnew;
VM_UNROLL
      for (int j = 0; j < DPL; ++j) acc[i][j] *= alpha;
      myP[i * 32 + lane] = p;
    }
    VM_SYNC_SIMD();
    const int ncols = min(32, hi - c0);
VM_UNROLL_8
    for (int c = 0; c < ncols; ++c) {
      const int pc = c0 + c;
      const int slot = table[pc / BS] * BS + pc % BS;
      float vf[DPL];
      vm_load<DPL>(vf, v_pool + ((size_t)slot * KVH + kvh) * DV + lane * DPL);
VM_UNROLL
      for (int i = 0; i < QPW; ++i) {
        const int qi = wq + WQ * i;
        if (qi < nq) {
          const float p = myP[i * 32 + c];
VM_UNROLL
          for (int j = 0; j < DPL; ++j) acc[i][j] += p * vf[j];
        }
      }
    }
    VM_SYNC_SIMD();
  }

  if (WC > 1) {   // merge the position groups' states: group wc's state at sMerge[wc][qi]
VM_UNROLL
    for (int i = 0; i < QPW; ++i) {
      const int qi = wq + WQ * i;
      if (qi < nq) {
        VM_TG float* st = sMerge + (wc * NQ + qi) * (DV + 2);
        if (lane == 0) { st[0] = m[i]; st[1] = l[i]; }
VM_UNROLL
        for (int j = 0; j < DPL; ++j) st[2 + lane * DPL + j] = acc[i][j];
      }
    }
    VM_SYNC_ALL();
    if (wc != 0) return;
VM_UNROLL
    for (int i = 0; i < QPW; ++i) {
      const int qi = wq + WQ * i;
      if (qi < nq) {
        float mm = -INFINITY;
        for (int w = 0; w < WC; ++w) mm = VM_FMAX(mm, sMerge[(w * NQ + qi) * (DV + 2)]);
        float ll = 0.f;
        float a[DPL];
VM_UNROLL
        for (int j = 0; j < DPL; ++j) a[j] = 0.f;
        for (int w = 0; w < WC; ++w) {
          const VM_TG float* st = sMerge + (w * NQ + qi) * (DV + 2);
          if (st[0] == -INFINITY) continue;
          const float f = VM_EXP(st[0] - mm);
          ll += st[1] * f;
VM_UNROLL
          for (int j = 0; j < DPL; ++j) a[j] += st[2 + lane * DPL + j] * f;
        }
        m[i] = mm;
        l[i] = ll;
VM_UNROLL
        for (int j = 0; j < DPL; ++j) acc[i][j] = a[j];
      }
    }
  }

VM_UNROLL
  for (int i = 0; i < QPW; ++i) {
    const int qi = wq + WQ * i;
    if (qi >= nq) break;
    const int row = row0 + qi / G, h = kvh * G + qi % G;
    const size_t th = (size_t)row * H + h;
    EMIT
  }
"""

# How the kernel ends, with one partition (normalised output) or several (partials for the merge).
EMIT = {
    False: """{
      float mm = m[i], ll = l[i], f = 1.f;
      if (SINKS) {
        const float sk = sinks[h];
        const float top = VM_FMAX(mm, sk);
        f = (mm == -INFINITY) ? 0.f : VM_EXP(mm - top);
        ll = ll * f + VM_EXP(sk - top);
      }
      const float inv = (ll > 0.f) ? f / ll : 0.f;
VM_UNROLL
      for (int j = 0; j < DPL; ++j) out[th * DV + lane * DPL + j] = vm_cast<T>(acc[i][j] * inv);
    }""",
    True: """{
      const size_t at = (size_t)part * T_rows * H + th;
VM_UNROLL
      for (int j = 0; j < DPL; ++j) part_out[at * DV + lane * DPL + j] = acc[i][j];
      if (lane == 0) { stats[at * 2] = m[i]; stats[at * 2 + 1] = l[i]; }
    }""",
}

# The merge of partitions. Inputs: part_out (P, T, H, DV), stats (P, T, H, 2) float32, sinks (H,)
# float32. Output out (T, H, DV).
MERGE_BODY = """
  const int P = part_out_shape[0], H = part_out_shape[2];
  const size_t TH = (size_t)part_out_shape[1] * H;
  const int h = th % H;
  float mm = SINKS ? sinks[h] : -INFINITY;
  for (int p = 0; p < P; ++p) mm = VM_FMAX(mm, stats[(p * TH + th) * 2]);
  float ll = SINKS ? VM_EXP(sinks[h] - mm) : 0.f;
  for (int p = 0; p < P; ++p) {
    const float mp = stats[(p * TH + th) * 2];
    if (mp != -INFINITY) ll += stats[(p * TH + th) * 2 + 1] * VM_EXP(mp - mm);
  }
  const float inv = (ll > 0.f) ? 1.f / ll : 0.f;
  for (int d = tid; d < DV; d += nthreads) {
    float o = 0.f;
    for (int p = 0; p < P; ++p) {
      const float mp = stats[(p * TH + th) * 2];
      if (mp != -INFINITY) o += part_out[(p * TH + th) * DV + d] * VM_EXP(mp - mm);
    }
    out[th * DV + d] = vm_cast<T>(o * inv);
  }
"""

_INPUTS = ["q", "k_pool", "v_pool", "tables", "tiles", "params", "sinks"]


def attention_source(backend: str, split: bool) -> str:
    """The attention kernel's body for ``backend``, ending with one partition's output or partials."""
    return _PROLOGUES[backend] + ATTENTION_BODY.replace("EMIT", EMIT[split])


def merge_source(backend: str) -> str:
    return _MERGE_PROLOGUES[backend] + MERGE_BODY


def header(backend: str) -> str:
    return _HEADERS[backend]


@functools.cache
def _kernels(backend: str, split: bool):
    """The (attention, merge) kernel objects of ``backend``; MLX compiles one per template set."""
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    main = make(name="vllm_metal_paged_attention_split" if split else "vllm_metal_paged_attention",
                input_names=_INPUTS, output_names=["part_out", "stats"] if split else ["out"],
                source=attention_source(backend, split), header=header(backend))
    merge = make(name="vllm_metal_paged_attention_merge", input_names=["part_out", "stats", "sinks"],
                 output_names=["out"], source=merge_source(backend), header=header(backend))
    return main, merge


class PagedKernel:
    """The kernel of one GPU backend ('cuda' or 'metal'), called by the layers' caches."""

    def __init__(self, backend: str):
        if backend not in ("cuda", "metal"):
            raise ValueError(f"no paged attention kernel for backend {backend!r}")
        self.backend = backend
        self._params: dict[tuple[float, float | None], mx.array] = {}
        self._no_sinks = mx.zeros((1,), dtype=mx.float32)

    def __call__(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, step: KernelStep,
                 scale: float, window: int | None = None, sinks: mx.array | None = None,
                 softcap: float | None = None) -> mx.array:
        """Attention of packed queries ``(T, H, D)`` over pools ``(slots, KVH, 1, D)`` -> ``(T, H, DV)``."""
        t, h, d = queries.shape
        kvh, dv = k_pool.shape[1], v_pool.shape[-1]
        g = h // kvh
        lay = layout(self.backend, g, d, dv, step.prefill)
        tiles = step.tiles(max(1, lay.nq // g), kvh, window)
        key = (float(scale), softcap)
        if key not in self._params:
            self._params[key] = mx.array([scale, softcap or 0.0], dtype=mx.float32)
        has_sinks = sinks is not None
        sink_arr = sinks.astype(mx.float32) if has_sinks else self._no_sinks
        split = tiles.parts > 1
        template = [("T", queries.dtype), ("D", d), ("DV", dv), ("G", g), ("NQ", lay.nq), ("WQ", lay.wq),
                    ("WC", lay.wc), ("BS", step.block_size), ("WINDOW", window or 0), ("SINKS", has_sinks),
                    ("SOFTCAP", softcap is not None)]
        main, merge = _kernels(self.backend, split)
        inputs = [queries, k_pool, v_pool, tiles.tables, tiles.tiles, self._params[key], sink_arr]
        grid = (tiles.count * WARPS * LANES, kvh, tiles.parts)
        if not split:
            return main(inputs=inputs, template=template, grid=grid, threadgroup=(WARPS * LANES, 1, 1),
                        output_shapes=[(t, h, dv)], output_dtypes=[queries.dtype])[0]
        part_out, stats = main(inputs=inputs, template=template, grid=grid, threadgroup=(WARPS * LANES, 1, 1),
                               output_shapes=[(tiles.parts, t, h, dv), (tiles.parts, t, h, 2)],
                               output_dtypes=[mx.float32, mx.float32])
        return merge(inputs=[part_out, stats, sink_arr],
                     template=[("T", queries.dtype), ("DV", dv), ("SINKS", has_sinks)],
                     grid=(t * h * LANES, 1, 1), threadgroup=(LANES, 1, 1),
                     output_shapes=[(t, h, dv)], output_dtypes=[queries.dtype])[0]


def select(setting: str, gpu_backend: str | None, on_gpu: bool) -> PagedKernel | None:
    """The kernel ``VLLM_METAL_ATTENTION_KERNEL`` asks for where MLX computes (``on_gpu``, on
    ``gpu_backend``), or None for the MLX-op path. ``on`` without a GPU is refused."""
    if setting == "off":
        return None
    if setting == "on":
        if not on_gpu or gpu_backend is None:
            raise KernelUnsupported(
                "VLLM_METAL_ATTENTION_KERNEL=on needs MLX on a GPU (CUDA or Metal); MLX computes on the "
                "CPU here. Use auto or off.")
        return PagedKernel(gpu_backend)
    return PagedKernel("cuda") if on_gpu and gpu_backend == "cuda" else None
