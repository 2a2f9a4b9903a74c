"""Paged varlen attention (``vllm_metal.attention``) against two independent references.

A step is a ragged mix of decode rows (one query, up to ~100 tokens of context) and prefill
chunks (2..40 queries on top of a prefix already in the cache). K/V pools hold random garbage
everywhere (so a wrong gather or a missing mask shows up), block tables are random
permutations of block ids (block 0 is never handed out, like vLLM's null block), and the
step's own K/V is written by the metadata's slot mapping, as the model's cache does.

Reference 1 is a float64 NumPy loop per query token; reference 2 is MLX's fused SDPA on each
sequence's dense, gathered K/V with a causal-offset mask. Neither uses the block tables the
way the op does: they compute slots from positions and take the step's K/V straight from the
new-token arrays, so a wrong slot mapping also fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from vllm_metal import attention
from vllm_metal.attention import (
    AttnLimits,
    LayerSpec,
    PagedKVStore,
    PagedLayerCache,
    build_step_metadata,
    paged_attention,
)

HEADS = 4
HEAD_DIM = 64
FP32_BOUND = 1e-4  # max abs error, float32 inputs, vs float64 NumPy and vs dense MLX SDPA
BF16_BOUND = 3e-2  # max abs error, bfloat16 inputs/output, vs float64 NumPy on the same values

HAS_SINKS = "sinks" in (mx.fast.scaled_dot_product_attention.__doc__ or "")


@dataclass
class Case:
    seqs: list[tuple[int, int]]  # (query length, first query position) in packed order
    tables: list[np.ndarray]  # block ids of each sequence
    block_size: int
    k_before: np.ndarray  # pool contents before this step's write (float64 copy)
    v_before: np.ndarray
    k_new: mx.array  # (T, KVH, D) this step's K/V
    v_new: mx.array
    k_pool: mx.array  # pools after the write
    v_pool: mx.array
    queries: mx.array  # (T, H, D)
    meta: object
    scale: float

    @property
    def dtype(self) -> mx.Dtype:
        return self.queries.dtype


def _f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def make_case(seed: int, block_size: int, kv_heads: int, dtype=mx.float32,
              n_decode: int = 5, n_prefill: int = 3, spare_block: bool = True,
              consecutive: bool = False, limits: AttnLimits | None = None, chunk: int = 40,
              min_chunk: int = 2) -> Case:
    rng = np.random.default_rng(seed)
    seqs = [(1, int(rng.integers(0, 100))) for _ in range(n_decode)]
    seqs += [(int(rng.integers(min_chunk, chunk + 1)), int(rng.integers(1, 61))) for _ in range(n_prefill)]
    order = rng.permutation(len(seqs))  # decode rows and prefill chunks interleaved
    seqs = [seqs[i] for i in order]

    # Blocks each sequence needs; some get one spare trailing block (vLLM may allocate ahead).
    need = [-(-(p0 + n) // block_size) + int(spare_block and rng.random() < 0.5) for n, p0 in seqs]
    num_blocks = 1 + sum(need) + 3  # block 0 = null block, never in a table; 3 never used
    ids = np.arange(1, num_blocks) if consecutive else rng.permutation(np.arange(1, num_blocks))
    tables, at = [], 0
    for k in need:
        tables.append(ids[at : at + k].astype(np.int32))
        at += k

    slots = num_blocks * block_size
    k_pool = mx.array(rng.standard_normal((slots, kv_heads, HEAD_DIM)).astype(np.float32)).astype(dtype)
    v_pool = mx.array(rng.standard_normal((slots, kv_heads, HEAD_DIM)).astype(np.float32)).astype(dtype)
    k_before, v_before = _f64(k_pool), _f64(v_pool)

    total = sum(n for n, _ in seqs)
    k_new = mx.array(rng.standard_normal((total, kv_heads, HEAD_DIM)).astype(np.float32)).astype(dtype)
    v_new = mx.array(rng.standard_normal((total, kv_heads, HEAD_DIM)).astype(np.float32)).astype(dtype)
    queries = mx.array(rng.standard_normal((total, HEADS, HEAD_DIM)).astype(np.float32)).astype(dtype)

    meta = build_step_metadata([n for n, _ in seqs], [p for _, p in seqs], tables, block_size, limits)
    k_pool[meta.slot_mapping] = k_new
    v_pool[meta.slot_mapping] = v_new
    mx.eval(k_pool, v_pool)
    return Case(seqs, tables, block_size, k_before, v_before, k_new, v_new, k_pool, v_pool,
                queries, meta, HEAD_DIM**-0.5)


def _dense_kv(case: Case, i: int, t0: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ``i``'s K/V (ctx, KVH, D) in float64: prefix from the old pool, step from k_new."""
    n, p0 = case.seqs[i]
    pos = np.arange(p0 + n)
    slots = case.tables[i][pos // case.block_size] * case.block_size + pos % case.block_size
    k, v = case.k_before[slots].copy(), case.v_before[slots].copy()
    k[p0:] = _f64(case.k_new)[t0 : t0 + n]
    v[p0:] = _f64(case.v_new)[t0 : t0 + n]
    return k, v


def reference_numpy(case: Case, window: int | None, sinks: np.ndarray | None = None,
                    softcap: float | None = None) -> np.ndarray:
    """float64 attention, one query token at a time, causal by absolute position."""
    q = _f64(case.queries)
    out = np.zeros_like(q)
    t0 = 0
    for i, (n, p0) in enumerate(case.seqs):
        k, v = _dense_kv(case, i, t0)
        rep = HEADS // k.shape[1]
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # (ctx, H, D)
        pos = np.arange(p0 + n)
        for j in range(n):
            p = p0 + j
            visible = pos <= p
            if window is not None:
                visible &= pos > p - window
            s = case.scale * np.einsum("hd,chd->hc", q[t0 + j], k)
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = np.where(visible[None, :], s, -np.inf)
            if sinks is not None:
                s = np.concatenate([s, sinks[:, None]], axis=1)  # sink: a logit with no value
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            out[t0 + j] = np.einsum("hc,chd->hd", w[:, : len(pos)], v)
        t0 += n
    return out


def reference_mlx_dense(case: Case, window: int | None, sinks: mx.array | None = None) -> np.ndarray:
    """MLX fused SDPA on each sequence's dense K/V, causal offset mask (lower-right aligned)."""
    outs = []
    t0 = 0
    for i, (n, p0) in enumerate(case.seqs):
        k, v = _dense_kv(case, i, t0)
        k = mx.array(k.astype(np.float32)).astype(case.dtype).transpose(1, 0, 2)[None]
        v = mx.array(v.astype(np.float32)).astype(case.dtype).transpose(1, 0, 2)[None]
        q = case.queries[t0 : t0 + n].transpose(1, 0, 2)[None]  # (1, H, n, D)
        if window is None:
            mask = "causal"
        else:
            qp = np.arange(p0, p0 + n)[:, None]
            kp = np.arange(p0 + n)[None, :]
            mask = mx.array((kp <= qp) & (kp > qp - window))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=case.scale, mask=mask, sinks=sinks)
        outs.append(o[0].transpose(1, 0, 2))
        t0 += n
    return _f64(mx.concatenate(outs, axis=0))


def run_paged(case: Case, window: int | None, sinks: mx.array | None = None,
              softcap: float | None = None) -> np.ndarray:
    out = paged_attention(case.queries, case.k_pool, case.v_pool, case.meta, case.block_size,
                          case.scale, window=window, sinks=sinks, softcap=softcap)
    assert out.shape == case.queries.shape
    assert out.dtype == case.dtype
    return _f64(out)


def _pool4(pool: mx.array) -> mx.array:
    """A case's ``(slots, KVH, D)`` pool in the store's ``(slots, KVH, 1, D)`` layout."""
    return pool.reshape(pool.shape[0], pool.shape[1], 1, pool.shape[2])


def run_layer_cache(case: Case, window: int | None, sinks: mx.array | None = None,
                    copy_reads: bool | None = None, softcap: float | None = None) -> np.ndarray:
    """The same step through ``PagedLayerCache.attend`` (what the model calls), pools as written.
    ``copy_reads``: override the device's choice of copying a lone sequence's K/V before SDPA."""
    t, kvh = case.queries.shape[0], case.k_pool.shape[1]
    store = PagedKVStore([LayerSpec(HEADS, kvh, HEAD_DIM, HEAD_DIM, window)], case.k_pool.shape[0] // case.block_size,
                         case.block_size, case.dtype)
    if copy_reads is not None:
        store.copy_reads = copy_reads
    store.k[0], store.v[0], store.steps = _pool4(case.k_pool), _pool4(case.v_pool), [case.meta]
    out = PagedLayerCache(store, 0, window).attend(case.queries.reshape(t, HEADS, 1, HEAD_DIM), case.scale, sinks,
                                                   softcap)
    assert out.shape == (t, HEADS, 1, HEAD_DIM) and out.dtype == case.dtype
    return _f64(out.reshape(t, HEADS, HEAD_DIM))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa4"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_fp32(block_size, kv_heads, window):
    case = make_case(seed=block_size * 10 + kv_heads, block_size=block_size, kv_heads=kv_heads)
    got = run_paged(case, window)
    err_np = max_err(got, reference_numpy(case, window))
    err_mx = max_err(got, reference_mlx_dense(case, window))
    assert err_np < FP32_BOUND, f"max abs error vs NumPy float64: {err_np:.3g}"
    assert err_mx < FP32_BOUND, f"max abs error vs dense MLX SDPA: {err_mx:.3g}"


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_paged_attention_bf16(window):
    case = make_case(seed=7, block_size=16, kv_heads=2, dtype=mx.bfloat16)
    got = run_paged(case, window)
    err_np = max_err(got, reference_numpy(case, window))
    err_mx = max_err(got, reference_mlx_dense(case, window))
    assert err_np < BF16_BOUND, f"max abs error vs NumPy float64: {err_np:.3g}"
    assert err_mx < BF16_BOUND, f"max abs error vs dense MLX SDPA: {err_mx:.3g}"


@pytest.mark.skipif(not HAS_SINKS, reason="this MLX's fast SDPA has no `sinks` argument")
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa4"])
def test_paged_attention_sinks(kv_heads, window):
    case = make_case(seed=100 + kv_heads, block_size=16, kv_heads=kv_heads)
    # Large sinks matter most with a window: they soak up most of the probability mass.
    sinks_np = np.array([-1.0, 0.5, 2.0, 4.0], dtype=np.float32)
    sinks = mx.array(sinks_np)
    got = run_paged(case, window, sinks)
    err_np = max_err(got, reference_numpy(case, window, sinks_np.astype(np.float64)))
    err_mx = max_err(got, reference_mlx_dense(case, window, sinks))
    assert err_np < FP32_BOUND, f"max abs error vs NumPy float64: {err_np:.3g}"
    assert err_mx < FP32_BOUND, f"max abs error vs dense MLX SDPA: {err_mx:.3g}"
    # The sinks did change the result (the test would be vacuous otherwise).
    assert max_err(got, reference_numpy(case, window)) > 1e-2


@pytest.mark.parametrize("kind", ["decode_only", "prefill_only"])
def test_paged_attention_single_group(kind):
    """Steps with only one group (all decode, or all prefill) take the no-concatenate path."""
    n_decode, n_prefill = (6, 0) if kind == "decode_only" else (0, 3)
    case = make_case(seed=3, block_size=8, kv_heads=2, n_decode=n_decode, n_prefill=n_prefill)
    assert len(case.meta.groups) == 1
    got = run_paged(case, None)
    assert max_err(got, reference_numpy(case, None)) < FP32_BOUND


@pytest.mark.parametrize("blocks", ["scattered", "consecutive"])
@pytest.mark.parametrize("window", [None, 7, 1000], ids=["full", "window7", "window-wide"])
@pytest.mark.parametrize("kind", ["decode", "prefill_chunk"])
def test_paged_attention_single_sequence(kind, window, blocks):
    """One sequence in the step (single-stream serving), through the general masked op and through
    the layer cache's mask-free path: K/V cut to the exact context and SDPA without a mask array
    (decode) or bottom-right causal (prefill chunk on a cached prefix). A
    window shorter than the context: a decode token attends the window's last keys, still with no
    mask; a chunk falls back to the masked path. When its blocks are consecutive in the pool, K/V
    are a slice of it and the write is a slice write; when scattered, one gather by slot."""
    n_decode, n_prefill = (1, 0) if kind == "decode" else (0, 1)
    for seed in range(4):
        case = make_case(seed=40 + seed, block_size=8, kv_heads=2, n_decode=n_decode, n_prefill=n_prefill,
                         consecutive=blocks == "consecutive")
        (group,) = case.meta.groups
        assert group.ctx_len == sum(case.seqs[0]) and group.in_order and case.meta.out_order is None
        used = case.tables[0][: -(-group.ctx_len // 8)]
        is_run = bool((np.diff(used) == 1).all())
        assert is_run or blocks == "scattered"
        assert group.ctx_slot0 == (int(used[0]) * 8 if is_run else None)
        assert (group.ctx_slots is None) == is_run
        assert (case.meta.slot_range is not None) == (kind == "decode" or is_run)
        ref = reference_numpy(case, window)
        for got in (run_paged(case, window), run_layer_cache(case, window, copy_reads=False),
                    run_layer_cache(case, window, copy_reads=True)):  # masked op / mask-free
            assert max_err(got, ref) < FP32_BOUND
            assert max_err(got, reference_mlx_dense(case, window)) < FP32_BOUND


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("kind", ["batched", "one_decode", "one_chunk"])
def test_soft_capped_attention(kind, window):
    """Soft-capped scores (``cap * tanh(s / cap)``, Gemma 2), which MLX's fused SDPA cannot
    apply: the batched masked path and a lone sequence's path match float64 NumPy, with GQA."""
    n_decode, n_prefill = {"batched": (5, 3), "one_decode": (1, 0), "one_chunk": (0, 1)}[kind]
    case = make_case(11, 8, 2, n_decode=n_decode, n_prefill=n_prefill)
    want = reference_numpy(case, window, softcap=2.0)
    assert max_err(run_paged(case, window, softcap=2.0), want) < FP32_BOUND
    assert max_err(run_layer_cache(case, window, softcap=2.0), want) < FP32_BOUND
    assert max_err(reference_numpy(case, window), want) > 1e-2  # the cap changes the result


def test_step_metadata_layout():
    """Positions and slots follow the block tables; every packed token comes back exactly once."""
    case = make_case(seed=11, block_size=16, kv_heads=1)
    positions = np.array(case.meta.positions)
    slots = np.array(case.meta.slot_mapping)
    t0 = 0
    for (n, p0), table in zip(case.seqs, case.tables, strict=True):
        pos = np.arange(p0, p0 + n)
        np.testing.assert_array_equal(positions[t0 : t0 + n], pos)
        np.testing.assert_array_equal(slots[t0 : t0 + n], table[pos // 16] * 16 + pos % 16)
        t0 += n
    assert len(set(slots.tolist())) == len(slots)  # no two tokens share a slot
    assert (slots >= 16).all()  # nothing written into the null block
    assert case.meta.out_order is not None  # decode rows and prefill chunks interleave
    assert sorted(np.array(case.meta.out_order).tolist()) == list(range(len(slots)))


@pytest.mark.parametrize("kind", ["mixed", "one_chunk_consecutive", "one_decode"])
def test_layer_cache_writes_and_attends(kind):
    """PagedLayerCache: update_and_fetch writes by slot mapping (a slice write for one run of
    slots), attend matches the reference."""
    shape = {"mixed": {}, "one_chunk_consecutive": {"n_decode": 0, "n_prefill": 1, "consecutive": True},
             "one_decode": {"n_decode": 1, "n_prefill": 0}}[kind]
    case = make_case(seed=21, block_size=8, kv_heads=2, **shape)
    assert (case.meta.slot_range is None) == (kind == "mixed")
    t = case.queries.shape[0]
    num_blocks = case.k_pool.shape[0] // 8
    store = PagedKVStore([LayerSpec(4, 2, HEAD_DIM, HEAD_DIM, None)], num_blocks, 8, mx.float32)
    store.k[0] = _pool4(mx.array(case.k_before.astype(np.float32)))
    store.v[0] = _pool4(mx.array(case.v_before.astype(np.float32)))
    store.steps = [case.meta]
    cache = PagedLayerCache(store, 0, window=None)
    np.testing.assert_array_equal(np.array(cache.offset), np.array(case.meta.positions))
    cache.update_and_fetch(case.k_new.reshape(t, 2, 1, HEAD_DIM), case.v_new.reshape(t, 2, 1, HEAD_DIM))
    np.testing.assert_array_equal(np.array(store.k[0]), np.array(_pool4(case.k_pool)))
    np.testing.assert_array_equal(np.array(store.v[0]), np.array(_pool4(case.v_pool)))
    out = cache.attend(case.queries.reshape(t, HEADS, 1, HEAD_DIM), case.scale, None)
    assert out.shape == (t, HEADS, 1, HEAD_DIM)
    assert store.calls == 1
    err = max_err(_f64(out.reshape(t, HEADS, HEAD_DIM)), reference_numpy(case, None))
    assert err < FP32_BOUND


def test_copy_blocks_every_layer():
    bs, num_blocks = 4, 8
    specs = [LayerSpec(4, 2, 8, 8, None), LayerSpec(2, 1, 16, 4, None), LayerSpec(4, 2, 8, 8, 5)]
    store = PagedKVStore(specs, num_blocks, bs, mx.float32)
    rng = np.random.default_rng(0)
    for pools in (store.k, store.v):
        for i, pool in enumerate(pools):
            pools[i] = mx.array(rng.standard_normal(pool.shape).astype(np.float32))
    before = [np.array(a) for a in store.arrays()]

    store.copy_blocks([])  # no-op
    for a, b in zip(store.arrays(), before, strict=True):
        np.testing.assert_array_equal(np.array(a), b)

    pairs = [(1, 5), (2, 7), (6, 3)]
    store.copy_blocks(pairs)
    after = [np.array(a) for a in store.arrays()]
    assert len(after) == 2 * len(specs)
    dst = {d for _, d in pairs}
    for old, new in zip(before, after, strict=True):
        old_b = old.reshape(num_blocks, bs, *old.shape[1:])
        new_b = new.reshape(num_blocks, bs, *new.shape[1:])
        for s, d in pairs:
            np.testing.assert_array_equal(new_b[d], old_b[s])  # whole block, all heads and dims
        for b in range(num_blocks):
            if b not in dst:
                np.testing.assert_array_equal(new_b[b], old_b[b])  # sources and others untouched


def _random_store(num_blocks: int, bs: int, seed: int) -> PagedKVStore:
    specs = [LayerSpec(4, 2, 8, 8, None), LayerSpec(2, 1, 16, 4, 5)]
    store = PagedKVStore(specs, num_blocks, bs, mx.float32)
    rng = np.random.default_rng(seed)
    for pools in (store.k, store.v):
        for i, pool in enumerate(pools):
            pools[i] = mx.array(rng.standard_normal(pool.shape).astype(np.float32))
    return store


def _by_block_id(store: PagedKVStore) -> list[np.ndarray]:
    """Every pool as ``(block id, block_size, ...)``: the contents each vLLM block id names."""
    out = []
    for a in store.arrays():
        blocks = np.array(a).reshape(store.num_blocks, store.block_size, *a.shape[1:])
        out.append(blocks[store.phys])
    return out


@pytest.mark.parametrize("seed", range(3))
def test_place_consecutive_moves_blocks_with_their_contents(seed):
    """One sequence's blocks, in any order (vLLM reuses freed blocks last-in first-out; a prefix
    hit starts where the prefix was computed), end up one run of the pool, so its context is a
    slice; every block id, the sequence's and the ones swapped out of the way, keeps its K/V."""
    bs, num_blocks = 4, 12
    store = _random_store(num_blocks, bs, seed)
    want = _by_block_id(store)
    rng = np.random.default_rng(seed)
    lists = [np.array([9, 8, 7, 6]), np.array([11, 3]), rng.permutation(np.arange(1, num_blocks))[:7],
             np.array([2, 5, 10]), np.arange(1, num_blocks)[::-1]]
    for blocks in lists:
        tables = store.physical_tables([blocks])  # last block partly used
        where = tables[0]
        np.testing.assert_array_equal(where, store.phys[blocks])
        np.testing.assert_array_equal(np.diff(where), 1)
        assert store.phys[0] == 0 and sorted(store.phys.tolist()) == list(range(num_blocks))
        np.testing.assert_array_equal(store.owner[store.phys], np.arange(num_blocks))
        for got, ref in zip(_by_block_id(store), want, strict=True):
            np.testing.assert_array_equal(got, ref)
    # A step of several sequences is only translated; scheduler block copies follow the ids.
    before = store.phys.copy()
    tables = store.physical_tables([np.array([3, 1]), np.array([5])])
    np.testing.assert_array_equal(store.phys, before)
    np.testing.assert_array_equal(tables[0], before[[3, 1]])
    store.copy_blocks([(4, 2), (6, 9)])
    for got, ref in zip(_by_block_id(store), want, strict=True):
        ref[2], ref[9] = ref[4], ref[6]
        np.testing.assert_array_equal(got, ref)


def test_place_consecutive_moves_few_blocks_in_place(monkeypatch):
    """A prefix hit on block 1 followed by a run of four: placing them consecutively swaps one
    block (not the run), the pools are updated in place (no pool-sized copy: the moved rows are
    read in an evaluation of their own), and a move over MAX_MOVE_BYTES is skipped."""
    bs, num_blocks = 16, 2048
    store = PagedKVStore([LayerSpec(4, 2, 64, 64, None)] * 4, num_blocks, bs, mx.float32)
    for pools in (store.k, store.v):
        for pool in pools:
            pool[0:1] = mx.ones((1, 2, 1, 64))  # written once, as a served pool is
    mx.eval(store.arrays())
    blocks = np.array([1, 18, 19, 20, 21])
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    store.physical_tables([blocks])
    mx.eval(store.arrays())
    pool_bytes = store.k[0].nbytes  # 4 MiB
    assert mx.get_peak_memory() - base < pool_bytes // 4
    np.testing.assert_array_equal(np.diff(store.phys[blocks]), 1)
    assert len(np.flatnonzero(store.phys != np.arange(num_blocks))) <= 2  # one block in, its owner out
    monkeypatch.setattr(attention, "MAX_MOVE_BYTES", 2 * store.nbytes() // num_blocks)  # two blocks
    before = store.phys.copy()
    store.place_consecutive(np.array([300, 200, 100]))  # four blocks would move
    np.testing.assert_array_equal(store.phys, before)
    meta = build_step_metadata([1], [40], store.physical_tables([np.array([300, 200, 100])]), bs)
    assert meta.groups[0].ctx_slots is not None  # read by slot, still correct (tests above)


def _grows_without_moving(store: PagedKVStore, seq: list[int], fresh: list[int], want: list[np.ndarray]) -> None:
    """``seq``, already placed, gets the ``fresh`` blocks one by one: each step's table is one run,
    no block moves, and every block id keeps its K/V (``want``, by block id)."""
    placed, moved = store.phys.copy(), store.moved_blocks
    for block in fresh:
        seq.append(block)
        tables = store.physical_tables([np.array(seq)])
        np.testing.assert_array_equal(np.diff(tables[0]), 1)
    np.testing.assert_array_equal(store.phys, placed)
    assert store.moved_blocks == moved
    for got, ref in zip(_by_block_id(store), want, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_placed_run_grows_into_the_next_fresh_block(monkeypatch):
    """A sequence on a prefix hit (blocks 1-3) that continued on a fresh block (40) is placed as
    one run that decode then grows into blocks 41 and 42, the ones vLLM hands out next, without
    another move; contents stay with their block ids. Where that placement would move more than
    MAX_MOVE_BYTES, a placement within it is found instead."""
    bs, num_blocks = 4, 64
    store = _random_store(num_blocks, bs, 7)
    want = _by_block_id(store)
    seq = [1, 2, 3, 40]
    store.physical_tables([np.array(seq)])
    np.testing.assert_array_equal(np.diff(store.phys[seq]), 1)
    assert store.moved_blocks <= 2 * len(seq)  # each block of the run in, its place's owner out
    _grows_without_moving(store, seq, [41, 42], want)

    store = _random_store(num_blocks, bs, 8)
    monkeypatch.setattr(attention, "MAX_MOVE_BYTES", 2 * store.nbytes() // num_blocks)  # two blocks
    want = _by_block_id(store)
    store.physical_tables([np.array([1, 2, 3, 40])])
    np.testing.assert_array_equal(np.diff(store.phys[[1, 2, 3, 40]]), 1)
    assert store.moved_blocks <= 2  # within MAX_MOVE_BYTES
    for got, ref in zip(_by_block_id(store), want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("drafts_ahead", [0, 2], ids=["plain", "blocks_allocated_ahead"])
def test_recycled_blocks_placed_once(drafts_ahead):
    """A request on blocks a finished one gave back (vLLM hands them out in reverse order), then
    on never-used blocks in ascending order, as its context grows: with or without blocks
    allocated ahead of the context (speculative drafts), it is placed once and then grows into
    each new block where it lies; contents stay with their block ids."""
    bs, num_blocks = 4, 32
    store = _random_store(num_blocks, bs, 3)
    want = _by_block_id(store)
    seq = list(range(8 + drafts_ahead, 0, -1))  # 8 + k recycled blocks, last-in first-out
    store.physical_tables([np.array(seq)])
    _grows_without_moving(store, seq, list(range(9 + drafts_ahead, 14 + drafts_ahead)), want)


def test_single_sequence_reads_one_slice_after_placement():
    """The runner's order: place the step's blocks, then build the metadata on physical blocks;
    a sequence on scattered blocks then attends through a pool slice and still matches."""
    bs = 8
    store = _random_store(16, bs, 5)
    blocks = np.array([12, 4, 9])
    tables = store.physical_tables([blocks])
    meta = build_step_metadata([1], [19], tables, bs)
    (group,) = meta.groups
    assert group.ctx_slot0 == int(store.phys[12]) * bs and group.ctx_slots is None
    assert meta.slot_range == (int(store.phys[9]) * bs + 3, int(store.phys[9]) * bs + 4)


@pytest.mark.skipif(not HAS_SINKS, reason="this MLX's fast SDPA has no `sinks` argument")
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("blocks", ["scattered", "consecutive"])
@pytest.mark.parametrize("kind", ["decode", "prefill_chunk"])
def test_single_sequence_fast_path_keeps_sinks(kind, blocks, window):
    """The mask-free path of one sequence (pool slice or gather by slot, window cut for decode)
    passes attention sinks through (gpt-oss: sinks on sliding-window layers)."""
    n_decode, n_prefill = (1, 0) if kind == "decode" else (0, 1)
    for seed in range(77, 200):  # a context that the window cuts, over blocks that are (not) a run
        case = make_case(seed=seed, block_size=8, kv_heads=1, n_decode=n_decode, n_prefill=n_prefill,
                         consecutive=blocks == "consecutive")
        if sum(case.seqs[0]) > 16 and (case.meta.groups[0].ctx_slot0 is not None) == (blocks == "consecutive"):
            break
    else:
        pytest.fail("no seed gives the wanted case")
    sinks_np = np.array([-1.0, 0.5, 2.0, 4.0], dtype=np.float32)
    got = run_layer_cache(case, window, mx.array(sinks_np))
    assert max_err(got, reference_numpy(case, window, sinks_np.astype(np.float64))) < FP32_BOUND
    assert max_err(got, reference_numpy(case, window)) > 1e-2


def _limits(kv_heads: int, budget: int) -> AttnLimits:
    return AttnLimits(heads=HEADS, kv_token_bytes=kv_heads * 2 * HEAD_DIM * 4, budget=budget)


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("budget", ["one_row", "some_rows"])
@pytest.mark.parametrize("n_decode,n_prefill", [(6, 3), (0, 4), (8, 0)], ids=["mixed", "chunks", "decodes"])
def test_attention_split_to_fit_the_budget(n_decode, n_prefill, budget, window):
    """A step whose attention exceeds its budget runs as several calls (decode rows split by
    sequence, long chunks by query rows) evaluated in turn, with the same result: against
    float64 NumPy, through the op and the layer cache, with and without sinks. Every call fits
    the budget, except one that is a single query row (nothing smaller exists)."""
    kv_heads = 2
    # one_row: even one query row of the longest context exceeds it; some_rows: a few rows fit
    limits = _limits(kv_heads, 4096 if budget == "one_row" else 300_000)
    sinks_np = np.array([-1.0, 0.5, 2.0, 4.0], dtype=np.float32) if HAS_SINKS else None
    for seed in range(3):
        case = make_case(seed=200 + seed, block_size=8, kv_heads=kv_heads, n_decode=n_decode,
                         n_prefill=n_prefill, limits=limits, chunk=120, min_chunk=60)
        meta = case.meta
        assert len(meta.groups) >= 2 and meta.sequential
        for g in meta.groups:
            s, lq = g.tok.shape
            assert lq == 1 or limits.cost(s, lq, g.table.shape[1] * 8) <= limits.budget
        ref = reference_numpy(case, window)
        assert max_err(run_paged(case, window), ref) < FP32_BOUND
        assert max_err(run_layer_cache(case, window), ref) < FP32_BOUND
        if sinks_np is not None:
            sinks = mx.array(sinks_np)
            ref_s = reference_numpy(case, window, sinks_np.astype(np.float64))
            assert max_err(run_paged(case, window, sinks), ref_s) < FP32_BOUND


def test_attention_fitting_the_budget_is_one_call_per_kind():
    """Within the budget nothing is split or chained: decode rows one call, chunks one call."""
    case = make_case(seed=5, block_size=8, kv_heads=2, limits=_limits(2, 2**30))
    assert len(case.meta.groups) == 2 and not case.meta.sequential
    assert max_err(run_paged(case, None), reference_numpy(case, None)) < FP32_BOUND


@pytest.mark.parametrize("window", [None, 1000], ids=["full", "window-wide"])
@pytest.mark.parametrize("blocks", ["scattered", "consecutive"])
def test_single_sequence_chunk_split_to_fit_the_budget(blocks, window):
    """One long chunk alone in its step (the mask-free path) runs in query tiles when its scores
    exceed the budget; each tile sees the context up to its own last query."""
    limits = _limits(2, 200_000)
    for seed in range(3):
        case = make_case(seed=300 + seed, block_size=8, kv_heads=2, n_decode=0, n_prefill=1,
                         consecutive=blocks == "consecutive", limits=limits, chunk=160, min_chunk=100)
        n, p0 = case.seqs[0]
        assert len(limits.tiles(n, n + p0)) > 1
        ref = reference_numpy(case, window)
        for copy_reads in (False, True):
            assert max_err(run_layer_cache(case, window, copy_reads=copy_reads), ref) < FP32_BOUND
        assert max_err(run_paged(case, window), ref) < FP32_BOUND


def test_split_step_holds_about_two_calls_at_a_time():
    """The memory contract behind the startup reservation: with MLX's memory limit at what is
    reserved, a step split into many calls holds about two calls' worth at a time, where the
    same step unsplit holds all its scores at once (float32, 4 chunks of 512 queries)."""
    kv_heads, bs = 2, 16
    lens, starts = [512] * 4, [512] * 4
    need = -(-1024 // bs)
    tables = [np.arange(1 + i * need, 1 + (i + 1) * need, dtype=np.int32) for i in range(4)]
    slots = (1 + 4 * need) * bs
    rng = np.random.default_rng(0)
    k_pool = mx.array(rng.standard_normal((slots, kv_heads, HEAD_DIM)).astype(np.float32))
    v_pool = mx.array(rng.standard_normal((slots, kv_heads, HEAD_DIM)).astype(np.float32))
    q = mx.array(rng.standard_normal((sum(lens), HEADS, HEAD_DIM)).astype(np.float32))
    unsplit_scores = 4 * HEADS * 512 * 1024 * 4
    limits = _limits(kv_heads, unsplit_scores // 16)
    peaks = {}
    for name, lim in (("unsplit", None), ("split", limits)):
        meta = build_step_metadata(lens, starts, tables, bs, lim)
        mx.eval(k_pool, v_pool, q)
        base = mx.get_active_memory()
        old = mx.set_memory_limit(base + limits.budget)
        mx.reset_peak_memory()
        try:
            mx.eval(paged_attention(q, k_pool, v_pool, meta, bs, HEAD_DIM**-0.5).sum())
        finally:
            mx.set_memory_limit(old)
        peaks[name] = mx.get_peak_memory() - base
    assert peaks["unsplit"] > unsplit_scores, peaks
    assert peaks["split"] < 4 * limits.budget, peaks
