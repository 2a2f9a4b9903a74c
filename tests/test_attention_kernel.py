"""The paged attention kernel (``vllm_metal.paged_kernel``) against the MLX-op path and NumPy.

Each case is a step of decode rows and prefill chunks over random block tables whose pools hold
random values everywhere (a wrong slot, a missed mask or an unwritten output row shows up). The
kernel runs through ``PagedLayerCache.attend`` as the model calls it, and is held to float64
NumPy (one query at a time, causal by absolute position) and to ``attention.paged_attention``
(the MLX-op path, the reference the kernel replaces). Cases cover decode-only steps (one and
several context partitions, i.e. the merge kernel), prefill chunks longer than one tile, GQA
group sizes 1-16, head dims 64/128/256, bf16/fp16/fp32 pools, sliding windows, sinks and soft caps.

The kernel needs an MLX GPU: CUDA here (``scripts/gpu/run.sh kernel``); on Metal with
``VLLM_METAL_KERNEL_TEST_BACKEND=metal`` (never run by us). Elsewhere only the tile planning,
which is plain NumPy, is checked.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from vllm_metal.attention import LayerSpec, PagedKVStore, PagedLayerCache, build_step_metadata
from vllm_metal.device import gpu_backend
from vllm_metal.paged_kernel import MIN_PART, KernelStep, PagedKernel, layout

BACKEND = os.environ.get("VLLM_METAL_KERNEL_TEST_BACKEND") or gpu_backend()
on_gpu = pytest.mark.skipif(
    BACKEND not in ("cuda", "metal") or mx.default_device().type != mx.DeviceType.gpu,
    reason="the paged kernel runs on an MLX GPU (CUDA: scripts/gpu/run.sh kernel)")
BOUND = {mx.float32: 2e-4, mx.float16: 1e-2, mx.bfloat16: 4e-2}  # max abs error vs float64 NumPy


@dataclass
class Step:
    seqs: list[tuple[int, int]]  # (query rows, first position) in packed order
    tables: list[np.ndarray]
    block_size: int
    k_pool: mx.array  # (slots, KVH, 1, D), this step's K/V written
    v_pool: mx.array
    k64: np.ndarray  # the same pools in float64, (slots, KVH, D)
    v64: np.ndarray
    queries: mx.array  # (T, H, D)


def make_step(seed: int, seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int,
              dtype: mx.Dtype, block_size: int = 16) -> Step:
    rng = np.random.default_rng(seed)
    need = [-(-(p0 + n) // block_size) + int(rng.random() < 0.5) for n, p0 in seqs]
    num_blocks = 1 + sum(need) + 2
    ids = rng.permutation(np.arange(1, num_blocks))
    tables, at = [], 0
    for k in need:
        tables.append(ids[at: at + k].astype(np.int32))
        at += k
    slots = num_blocks * block_size

    def rand(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    k_pool, v_pool = rand(slots, kv_heads, 1, head_dim), rand(slots, kv_heads, 1, head_dim)
    total = sum(n for n, _ in seqs)
    meta = build_step_metadata([n for n, _ in seqs], [p for _, p in seqs], tables, block_size)
    k_pool[meta.slot_mapping] = rand(total, kv_heads, 1, head_dim)
    v_pool[meta.slot_mapping] = rand(total, kv_heads, 1, head_dim)
    mx.eval(k_pool, v_pool)
    def as64(a: mx.array) -> np.ndarray:
        return np.array(a.astype(mx.float32), dtype=np.float64)[:, :, 0]

    return Step(seqs, tables, block_size, k_pool, v_pool, as64(k_pool), as64(v_pool),
                rand(total, heads, head_dim))


def reference(step: Step, scale: float, window: int | None, sinks: np.ndarray | None,
              softcap: float | None) -> np.ndarray:
    """float64 attention, one query at a time, causal by absolute position."""
    q = np.array(step.queries.astype(mx.float32), dtype=np.float64)
    heads, kv_heads = q.shape[1], step.k64.shape[1]
    out = np.zeros((q.shape[0], heads, step.v64.shape[-1]))
    row = 0
    for (n, p0), table in zip(step.seqs, step.tables, strict=True):
        pos = np.arange(p0 + n)
        slot = table[pos // step.block_size] * step.block_size + pos % step.block_size
        k = np.repeat(step.k64[slot], heads // kv_heads, axis=1)
        v = np.repeat(step.v64[slot], heads // kv_heads, axis=1)
        for j in range(n):
            p = p0 + j
            seen = pos <= p
            if window is not None:
                seen &= pos > p - window
            s = scale * np.einsum("hd,chd->hc", q[row], k)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = np.where(seen[None], s, -np.inf)
            if sinks is not None:
                s = np.concatenate([s, sinks[:, None]], axis=1)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            out[row] = np.einsum("hc,chd->hd", w[:, : len(pos)], v)
            row += 1
    return out


def run(step: Step, scale: float, window: int | None, sinks: mx.array | None, softcap: float | None,
        kernel: PagedKernel | None) -> np.ndarray:
    """The step through ``PagedLayerCache.attend`` with or without the kernel."""
    t, h, d = step.queries.shape
    kvh = step.k_pool.shape[1]
    store = PagedKVStore([LayerSpec(h, kvh, d, d, window)], step.k_pool.shape[0] // step.block_size,
                         step.block_size, step.k_pool.dtype, kernel=kernel)
    store.k[0], store.v[0] = step.k_pool, step.v_pool
    store.steps = [build_step_metadata([n for n, _ in step.seqs], [p for _, p in step.seqs], step.tables,
                                       step.block_size, kernel=kernel is not None)]
    assert (store.steps[0].kernel is not None) == (kernel is not None and len(step.seqs) > 1)
    out = PagedLayerCache(store, 0, window).attend(step.queries.reshape(t, h, 1, d), scale, sinks, softcap)
    assert out.shape == (t, h, 1, d) and out.dtype == step.queries.dtype
    return np.array(out.reshape(t, h, d).astype(mx.float32), dtype=np.float64)


# (query rows, first position) per sequence
MIXED = [(1, 37), (23, 0), (1, 5), (40, 61), (1, 99), (3, 14), (1, 0)]
DECODE_SHORT = [(1, p) for p in (0, 9, 31, 32, 77, 100)]
DECODE_LONG = [(1, p) for p in (700, 1500, 40, 1023, 513, 2047, 260, 1800)]  # several partitions
LONG_CHUNK = [(1, 900), (300, 700), (1, 64), (65, 0)]
STEPS = {"mixed": MIXED, "decode_short": DECODE_SHORT, "decode_long": DECODE_LONG, "long_chunk": LONG_CHUNK}
# (heads, kv heads, head dim): Llama-3.2-1B, Llama-3-8B, SmolLM2 (G=3), MHA, G=16, Gemma (256)
GEOMETRIES = {"g4d64": (32, 8, 64), "g4d128": (32, 8, 128), "g3d64": (9, 3, 64), "mha": (4, 4, 64),
              "g16": (16, 1, 64), "d256": (8, 4, 256)}


@on_gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("kind", list(STEPS))
def test_kernel_matches_numpy_and_mlx_ops(kind, geometry, dtype):
    heads, kv_heads, d = GEOMETRIES[geometry]
    step = make_step(zlib.crc32(f"{kind}-{geometry}".encode()), STEPS[kind], heads, kv_heads, d, dtype)
    scale = d**-0.5
    want = reference(step, scale, None, None, None)
    got = run(step, scale, None, None, None, PagedKernel(BACKEND))
    ops = run(step, scale, None, None, None, None)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < BOUND[dtype], f"kernel vs float64: {np.abs(got - want).max():.2e}"
    assert np.abs(got - ops).max() < 2 * BOUND[dtype], f"kernel vs MLX ops: {np.abs(got - ops).max():.2e}"


@on_gpu
@pytest.mark.parametrize("extra", ["window", "sinks", "softcap", "window_sinks"])
@pytest.mark.parametrize("kind", list(STEPS))
def test_kernel_windows_sinks_and_soft_caps(kind, extra):
    heads, kv_heads, d = GEOMETRIES["g4d64"]
    step = make_step(7, STEPS[kind], heads, kv_heads, d, mx.float32)
    window = 300 if kind in ("decode_long", "long_chunk") else 7
    window = window if "window" in extra else None
    sinks64 = np.random.default_rng(1).standard_normal(heads) if "sinks" in extra else None
    sinks = None if sinks64 is None else mx.array(sinks64.astype(np.float32))
    softcap = 0.5 if extra == "softcap" else None  # small enough to change which positions dominate
    want = reference(step, d**-0.5, window, sinks64, softcap)
    got = run(step, d**-0.5, window, sinks, softcap, PagedKernel(BACKEND))
    assert np.abs(got - want).max() < BOUND[mx.float32], f"kernel vs float64: {np.abs(got - want).max():.2e}"


@on_gpu
def test_kernel_reads_pools_as_the_model_writes_them():
    """A real layer step: K/V written by the cache's slot mapping in the same graph the kernel
    reads them in (the kernel must see this step's writes)."""
    heads, kv_heads, d = GEOMETRIES["g4d64"]
    seqs = MIXED
    step = make_step(3, seqs, heads, kv_heads, d, mx.float32)
    t = step.queries.shape[0]
    rng = np.random.default_rng(4)
    k_new = mx.array(rng.standard_normal((t, kv_heads, 1, d)).astype(np.float32))
    v_new = mx.array(rng.standard_normal((t, kv_heads, 1, d)).astype(np.float32))
    outs = []
    for kernel in (PagedKernel(BACKEND), None):
        store = PagedKVStore([LayerSpec(heads, kv_heads, d, d, None)], step.k_pool.shape[0] // step.block_size,
                             step.block_size, mx.float32, kernel=kernel)
        store.k[0], store.v[0] = mx.array(step.k_pool), mx.array(step.v_pool)
        store.steps = [build_step_metadata([n for n, _ in seqs], [p for _, p in seqs], step.tables,
                                           step.block_size, kernel=kernel is not None)]
        cache = PagedLayerCache(store, 0, None)
        cache.update_and_fetch(k_new, v_new)
        outs.append(np.array(cache.attend(step.queries.reshape(t, heads, 1, d), d**-0.5, None)))
    assert np.abs(outs[0] - outs[1]).max() < 2e-4


@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("rows", [1, 16, 21])
def test_tiles_cover_every_row_once(kind, rows):
    """The tile plan (host NumPy, the same on every backend): each packed query row in exactly
    one tile, tiles within one sequence, and partitions only where contexts are long."""
    seqs = STEPS[kind]
    lens, starts = [n for n, _ in seqs], [p for _, p in seqs]
    tables = [np.arange(1, 2 + (p + n) // 16) for n, p in seqs]
    plan = KernelStep.build(lens, starts, tables, 16).tiles(rows, 8, None)
    tiles = np.array(plan.tiles)
    covered = np.zeros(sum(lens), dtype=int)
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    for seq, row0, n, pos0 in tiles:
        assert 1 <= n <= rows
        assert first[seq] <= row0 and row0 + n <= first[seq] + lens[seq]
        assert pos0 == starts[seq] + row0 - first[seq]
        covered[row0: row0 + n] += 1
    assert (covered == 1).all()
    longest = max(p + n for n, p in seqs)
    assert plan.parts == 1 or longest >= 2 * MIN_PART


def test_layouts_fit_shared_memory():
    """Every geometry the kernel accepts gets a layout within the backend's shared memory."""
    from vllm_metal.paged_kernel import SMEM_BYTES, WARPS, _smem_bytes

    for backend in ("cuda", "metal"):
        for g in (1, 2, 3, 4, 7, 8, 16):
            for d in (64, 128, 256):
                for prefill in (False, True):
                    lay = layout(backend, g, d, d, prefill)
                    assert lay.nq % g == 0 and lay.wq * lay.wc == WARPS
                    assert _smem_bytes(lay.nq, lay.wq, lay.wc, d, d) <= SMEM_BYTES[backend]


@pytest.mark.parametrize("extra", ["plain", "window_sinks"])
@pytest.mark.parametrize("kind", ["mixed", "decode_long"])
def test_reference_is_what_the_mlx_op_path_computes(kind, extra):
    """The float64 reference the kernel is held to, checked against the MLX-op path on any
    device, so a kernel failure on the GPU is the kernel's."""
    heads, kv_heads, d = GEOMETRIES["g3d64"]
    step = make_step(11, STEPS[kind], heads, kv_heads, d, mx.float32)
    window = 300 if extra != "plain" else None
    sinks64 = np.random.default_rng(2).standard_normal(heads) if extra != "plain" else None
    sinks = None if sinks64 is None else mx.array(sinks64.astype(np.float32))
    want = reference(step, d**-0.5, window, sinks64, None)
    ops = run(step, d**-0.5, window, sinks, None, None)
    assert np.abs(ops - want).max() < BOUND[mx.float32]
