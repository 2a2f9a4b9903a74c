"""Paged KV cache and packed variable-length attention in plain MLX ops.

One engine step runs as one MLX forward over all scheduled tokens, packed as a batch of
``T`` one-token rows (shape ``(T, 1)``). That layout lets mlx-lm's own attention modules run
unchanged: ``mx.fast.rope`` takes a per-row offset vector (each token's position), and the
per-layer "cache" we hand the model (``PagedLayerCache``) writes K/V into vLLM-managed blocks
by slot mapping and answers attention through block tables.

Attention for a step is split into at most two groups — decode rows (one query each) and
prefill chunks — each one ``mx.fast.scaled_dot_product_attention`` call over K/V gathered by
block table, with a causal (and sliding-window) mask built from absolute positions. No
Python loop over requests runs per layer. A step of one sequence (single-stream serving) skips
the mask: ``PagedLayerCache`` reads exactly its visible context (a pool slice, or one gather by
slot) and ``paged_attention`` stays the general masked op.

With a paged kernel (``paged_kernel.py``: CUDA, or Metal when asked for), a step of several
sequences attends in that kernel instead, which reads the pools in place through the block tables;
the MLX-op path here stays the reference and serves every other device and step.

vLLM's block ids name blocks; where a block's K/V lie in the pool is ours (``PagedKVStore.phys``).
Before a step of one sequence the store swaps blocks so that sequence's context is one slice of
the pool: vLLM reuses freed blocks last-in first-out and a prefix hit starts wherever the prefix
was computed, and reading scattered blocks costs two gathers per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx
import numpy as np

from vllm_metal.paged_kernel import KernelStep, PagedKernel
from vllm_metal.recurrent import RecurrentLayerCache, RecurrentStore, StateArray

MAX_MOVE_BYTES = 64 * 2**20  # K/V one block placement may move (its rows are held twice meanwhile)


@dataclass
class AttnGroup:
    """Sequences attended together: queries padded to ``Lq``, K/V gathered to ``nb`` blocks.

    The index arrays stay NumPy until the masked path asks for them: a single-sequence step (the
    mask-free path) never does, and each ``mx.array`` made is host work on a host-bound step.
    """

    tok: np.ndarray  # (S, Lq) rows of the packed batch; padding repeats a valid row
    qpos: np.ndarray  # (S, Lq) absolute position of each query (padding: 0)
    table: np.ndarray  # (S, nb) block ids (padding: 0)
    valid_rows: mx.array | None  # flattened (s, l) entries that are real tokens; None = all
    masks: dict[int | None, mx.array] = field(default_factory=dict)  # window -> (S,1,Lq,ctx)
    in_order: bool = False  # tok is 0..T-1 (no padding): queries need no gather
    ctx_len: int | None = None  # one sequence: its exact context length (mask-free fast path)
    ctx_slot0: int | None = None  # ...whose blocks are consecutive in the pool: its first slot
    ctx_slots: mx.array | None = None  # ...whose blocks are not: the slots of its used blocks (>= ctx_len)
    _slots_from: dict[int, mx.array] = field(default_factory=dict)

    @cached_property
    def token_index(self) -> mx.array:
        return mx.array(self.tok)

    @cached_property
    def q_pos(self) -> mx.array:
        return mx.array(self.qpos)

    @cached_property
    def block_table(self) -> mx.array:
        return mx.array(self.table)

    def visible_from(self, window: int | None) -> int | None:
        """One sequence that needs no mask array: the first context position every query sees.

        0 when the whole context is visible (decode: no mask; a chunk: bottom-right causal); for
        a decode token behind a sliding window, the window's first position. None: use a mask.
        """
        if self.ctx_len is None:
            return None
        if window is None or self.ctx_len <= window:
            return 0
        return self.ctx_len - window if self.tok.shape[1] == 1 else None

    def read_context(self, pool: mx.array, start: int) -> mx.array:
        """Rows ``start:ctx_len`` of this one sequence's context from a ``(slots, ...)`` pool:
        a slice when its blocks are consecutive, else one gather by precomputed slot (the same
        number of recorded ops either way: the batch-1 step is host-bound on a fast GPU)."""
        if self.ctx_slot0 is not None:
            return pool[self.ctx_slot0 + start : self.ctx_slot0 + self.ctx_len]
        if start not in self._slots_from:
            self._slots_from[start] = self.ctx_slots[start : self.ctx_len]
        return pool[self._slots_from[start]]

    def mask(self, window: int | None, block_size: int) -> mx.array:
        if window not in self.masks:
            ctx = self.table.shape[1] * block_size
            kv = mx.arange(ctx, dtype=mx.int32)[None, None, None, :]
            q = self.q_pos[:, None, :, None]
            m = kv <= q
            if window is not None:
                m = m & (kv > q - window)
            self.masks[window] = m
        return self.masks[window]


@dataclass
class StepMetadata:
    """Everything the attention of one step needs, built once on the host and shared by layers."""

    positions: mx.array  # (T,) int32
    slots: np.ndarray  # (T,) int32 flat slot of each token's K/V
    groups: list[AttnGroup]
    out_order: mx.array | None  # (T,) packed token -> row of the group outputs; None = identity
    slot_range: tuple[int, int] | None = None  # the step's slots form one run [a, b): slice write
    sequential: bool = False  # the groups exceed one call's budget together: evaluate each in turn
    limits: AttnLimits | None = None  # one sequence: its chunk is tiled by these (see attend)
    kernel: KernelStep | None = None  # several sequences on the paged kernel (then no groups)

    @cached_property
    def slot_mapping(self) -> mx.array:
        """The slots as an MLX index (the scatter write; a step whose slots are one run slices)."""
        return mx.array(self.slots)


SCORE_BYTES = 8  # per attention score held at once: float32 scores and their softmax


@dataclass(frozen=True)
class AttnLimits:
    """How much one attention call may hold, and what it holds per query and context position.

    A call over ``S`` sequences padded to ``lq`` queries and ``ctx`` context positions holds the
    gathered K/V (``S * ctx`` tokens of one layer) and the scores (``S * heads * lq * ctx``).
    A step whose calls exceed the budget together (``StepMetadata.sequential``) evaluates them one
    after another, so it holds about one call's worth at a time.
    """

    heads: int  # query heads (the widest layer's)
    kv_token_bytes: int  # one token's K and V in one layer (the widest layer's)
    budget: int  # bytes one call may hold

    def cost(self, seqs: int, lq: int, ctx: int) -> int:
        return seqs * ctx * (self.kv_token_bytes + self.heads * lq * SCORE_BYTES)

    def max_rows(self, ctx: int) -> int:
        """Query rows of one sequence at context ``ctx`` that fit one call (at least one)."""
        return max(1, (self.budget // max(ctx, 1) - self.kv_token_bytes) // (self.heads * SCORE_BYTES))

    def tiles(self, n: int, ctx: int) -> list[tuple[int, int]]:
        """``[a, b)`` ranges of ``n`` queries ending at context ``ctx``, each fitting one call."""
        count = -(-n // self.max_rows(ctx))
        edges = [n * k // count for k in range(count + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))


def build_step_metadata(
    seq_lens_q: list[int],
    seq_start_pos: list[int],
    block_tables: list[np.ndarray],
    block_size: int,
    limits: AttnLimits | None = None,
    kernel: bool = False,
) -> StepMetadata:
    """Pack sequences (query lengths, first positions, physical blocks) into one step's metadata.

    Sequences appear in the packed batch in the given order. ``block_tables[i]`` must cover
    every position up to ``seq_start_pos[i] + seq_lens_q[i] - 1``. Attention runs in groups:
    decode rows together, prefill chunks together, each split (by sequence, and long chunks by
    query rows) so that no call holds more than ``limits.budget``; without ``limits`` each kind
    is one call. With ``kernel``, a step of several sequences is described for the paged kernel
    instead (``StepMetadata.kernel``), which reads the pools in place and needs no groups.
    """
    if len(seq_lens_q) == 1:
        return _one_sequence(int(seq_lens_q[0]), int(seq_start_pos[0]), block_tables[0], block_size, limits)
    lens = np.asarray(seq_lens_q, dtype=np.int64)
    starts = np.asarray(seq_start_pos, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)])
    total = int(cu[-1])
    positions = np.empty(total, dtype=np.int32)
    slots = np.empty(total, dtype=np.int32)
    for i, (n, p0) in enumerate(zip(lens, starts, strict=True)):
        pos = np.arange(p0, p0 + n)
        positions[cu[i] : cu[i + 1]] = pos
        slots[cu[i] : cu[i + 1]] = _slots(block_tables[i], pos, block_size)
    one_run = (int(slots[0]), int(slots[-1]) + 1) if (np.diff(slots) == 1).all() else None
    if kernel:
        return StepMetadata(mx.array(positions), slots, [], None, one_run, limits=limits,
                            kernel=KernelStep.build(seq_lens_q, seq_start_pos, block_tables, block_size))

    groups: list[AttnGroup] = []
    order_parts: list[np.ndarray] = []
    for pieces in _plan(lens, starts, limits, block_size):
        lq = max(b - a for _, a, b, _ in pieces)
        ctx = max(c for *_, c in pieces)
        nb = -(-ctx // block_size)
        s = len(pieces)
        tok = np.empty((s, lq), dtype=np.int32)
        qpos = np.zeros((s, lq), dtype=np.int32)
        valid = np.zeros((s, lq), dtype=bool)
        table = np.zeros((s, nb), dtype=np.int32)
        for row, (i, a, b, c) in enumerate(pieces):
            tok[row, : b - a] = np.arange(cu[i] + a, cu[i] + b)
            tok[row, b - a :] = cu[i] + a
            qpos[row, : b - a] = positions[cu[i] + a : cu[i] + b]
            valid[row, : b - a] = True
            used = block_tables[i][: -(-c // block_size)]
            table[row, : len(used)] = used
        flat_valid = valid.reshape(-1)
        rows = None if flat_valid.all() else mx.array(np.flatnonzero(flat_valid).astype(np.int32))
        in_order = s * lq == total and bool((tok.reshape(-1) == np.arange(total)).all())
        one = pieces[0][3] if s == 1 else None  # a lone piece reads exactly its context
        groups.append(AttnGroup(tok, qpos, table, rows, in_order=in_order, ctx_len=one))
        order_parts.append(tok.reshape(-1)[flat_valid])
    sequential = limits is not None and sum(
        limits.cost(*g.tok.shape, g.table.shape[1] * block_size) for g in groups) > limits.budget
    concat_rows = np.concatenate(order_parts)
    if (concat_rows == np.arange(total)).all():
        return StepMetadata(mx.array(positions), slots, groups, None, one_run, sequential, limits)
    out_order = np.empty(total, dtype=np.int32)
    out_order[concat_rows] = np.arange(total, dtype=np.int32)
    return StepMetadata(mx.array(positions), slots, groups, mx.array(out_order), one_run, sequential, limits)


Piece = tuple[int, int, int, int]  # (sequence, first query row, end query row, context length)


def _plan(lens: np.ndarray, starts: np.ndarray, limits: AttnLimits | None,
          block_size: int) -> list[list[Piece]]:
    """Attention calls of a step: decode rows first, then prefill chunks; within each kind the
    longest contexts first, as many sequences per call as ``limits`` allows, and a chunk whose
    scores alone exceed it split into query tiles (a tile attends up to its own last query).
    Costs count contexts in whole blocks, as the calls gather them."""

    def padded(ctx: int) -> int:
        return -(-ctx // block_size) * block_size

    calls: list[list[Piece]] = []
    for members in (np.flatnonzero(lens == 1), np.flatnonzero(lens > 1)):
        pieces: list[Piece] = []
        for i in members:
            n, end = int(lens[i]), int(starts[i] + lens[i])
            spans = [(0, n)] if limits is None or n == 1 else limits.tiles(n, padded(end))
            pieces += [(int(i), a, b, end - n + b) for a, b in spans]
        if not pieces:
            continue
        widest = max(b - a for _, a, b, _ in pieces)
        longest = padded(max(p[3] for p in pieces))
        if limits is None or limits.cost(len(pieces), widest, longest) <= limits.budget:
            calls.append(pieces)  # one call, in batch order
            continue
        pieces.sort(key=lambda p: -p[3])
        call: list[Piece] = []
        for p in pieces:
            lq = max([p[2] - p[1]] + [q[2] - q[1] for q in call])
            if call and limits.cost(len(call) + 1, lq, padded(call[0][3])) > limits.budget:
                calls.append(call)
                call = []
            call.append(p)
        if call:
            calls.append(call)
    return calls


def _one_sequence(n: int, p0: int, table: np.ndarray, block_size: int,
                  limits: AttnLimits | None) -> StepMetadata:
    """``build_step_metadata`` for a step of one sequence (``n`` tokens from position ``p0``),
    which also tells the mask-free path where the context lies. Single-stream serving runs it
    every step on a host-bound GPU, so it makes a handful of NumPy arrays instead of packing."""
    ctx_len = p0 + n
    used = table[: -(-ctx_len // block_size)]
    positions = np.arange(p0, ctx_len, dtype=np.int32)
    ctx_slot0 = ctx_slots = None
    if _is_run(used):
        ctx_slot0 = int(used[0]) * block_size
        slots = positions + np.int32(ctx_slot0)
        one_run = (ctx_slot0 + p0, ctx_slot0 + ctx_len)
    else:  # per-position slots only when the blocks are scattered
        ctx_slots = mx.array(_slots(used, np.arange(len(used) * block_size), block_size).astype(np.int32))
        slots = _slots(table, positions, block_size).astype(np.int32)
        one_run = (int(slots[0]), int(slots[-1]) + 1) if (np.diff(slots) == 1).all() else None
    group = AttnGroup(np.arange(n, dtype=np.int32)[None, :], positions[None, :],
                      np.asarray(table, dtype=np.int32)[None, :], None, in_order=True,
                      ctx_len=ctx_len, ctx_slot0=ctx_slot0, ctx_slots=ctx_slots)
    return StepMetadata(mx.array(positions), slots, [group], None, one_run, limits=limits)


def _is_run(a: np.ndarray) -> bool:
    """``a`` (non-empty) counts up by one: for a few block ids Python is faster than NumPy's calls."""
    first = int(a[0])
    return a.tolist() == list(range(first, first + len(a)))


def _slots(table: np.ndarray, pos: np.ndarray, block_size: int) -> np.ndarray:
    """Flat pool slot of each position ``pos`` of a sequence with block table ``table``."""
    return table[pos // block_size] * block_size + pos % block_size


def paged_attention(
    queries: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    meta: StepMetadata,
    block_size: int,
    scale: float,
    window: int | None = None,
    sinks: mx.array | None = None,
    softcap: float | None = None,
    copy_reads: bool = False,
) -> mx.array:
    """Attention of packed queries ``(T, H, D)`` over paged K/V pools ``(slots, KVH, [1,] D)``.

    Returns ``(T, H, D)``. Each group gathers its sequences' blocks and runs one fused SDPA with
    an absolute-position causal mask (plus window); a group of one sequence reads exactly its
    context with SDPA's own causal mask instead, in query tiles if ``meta.limits`` asks. The rows
    are put back in packed order. ``copy_reads``: copy the gathered K/V of a group into SDPA's
    layout first (MLX's CPU SDPA is ~6x slower on the transposed view). When ``meta.sequential``
    (or a chunk is tiled) each call is evaluated as soon as it is recorded, so the device holds
    one call's scores at a time, not all of them (MLX keeps a command buffer's temporaries until
    the whole buffer has run).
    """
    num_blocks = k_pool.shape[0] // block_size
    kvh, dk = k_pool.shape[1], k_pool.shape[-1]
    dv = v_pool.shape[-1]
    k_blocks = k_pool.reshape(num_blocks, block_size, kvh, dk)
    v_blocks = v_pool.reshape(num_blocks, block_size, kvh, dv)
    outs: list[mx.array] = []
    chain = meta.sequential

    def done(o: mx.array) -> None:
        outs.append(o)
        if chain:
            mx.eval(o)

    for g in meta.groups:
        s, lq = g.tok.shape
        q = queries if g.in_order else queries[g.token_index.reshape(-1)]
        if g.ctx_len is not None and g.visible_from(window) == 0:  # one sequence, whole context
            tiles = [(0, lq)] if meta.limits is None or lq == 1 else meta.limits.tiles(lq, g.ctx_len)
            chain = chain or len(tiles) > 1
            q = q.reshape(lq, -1, dk)
            k = k_blocks[g.block_table[0]].reshape(-1, kvh, dk).transpose(1, 0, 2)[None]
            v = v_blocks[g.block_table[0]].reshape(-1, kvh, dv).transpose(1, 0, 2)[None]
            for a, b in tiles:
                ctx = g.ctx_len - lq + b
                o = sdpa(q[a:b].transpose(1, 0, 2)[None], k[:, :, :ctx], v[:, :, :ctx], scale,
                         "causal" if b - a > 1 else None, sinks, softcap)
                done(o[0].transpose(1, 0, 2))
            continue
        ctx = g.table.shape[1] * block_size
        tiles = [(0, lq)] if meta.limits is None or s > 1 else meta.limits.tiles(lq, ctx)
        chain = chain or len(tiles) > 1
        q = q.reshape(s, lq, -1, dk).transpose(0, 2, 1, 3)
        mask = g.mask(window, block_size)
        k = k_blocks[g.block_table].reshape(s, ctx, kvh, dk).transpose(0, 2, 1, 3)
        v = v_blocks[g.block_table].reshape(s, ctx, kvh, dv).transpose(0, 2, 1, 3)
        if copy_reads:
            k, v = mx.contiguous(k), mx.contiguous(v)
        for a, b in tiles:  # one sequence's chunk behind a sliding window: tiles of query rows
            o = sdpa(q[:, :, a:b], k, v, scale, mask[:, :, a:b], sinks, softcap)
            o = o.transpose(0, 2, 1, 3).reshape(s * (b - a), -1, dv)
            done(o if g.valid_rows is None else o[g.valid_rows])
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    return out if meta.out_order is None else out[meta.out_order]


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None,
         sinks: mx.array | None = None, softcap: float | None = None) -> mx.array:
    """MLX's fused SDPA (``q`` ``(B, H, L, D)``, ``k``/``v`` ``(B, KVH, S, D)``), or, for
    attention whose scores are soft-capped (``softcap * tanh(scores / softcap)``, Gemma 2), the
    same product in MLX ops: the fused kernel has no soft-cap. ``mask``: None, "causal" (bottom
    right) or a boolean array broadcastable to ``(B, H, L, S)``."""
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
    if sinks is not None:
        raise ValueError("soft-capped attention with sinks is not implemented")
    b, h, lq, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    q = (q * scale).reshape(b, kvh, h // kvh, lq, d)  # GQA: query heads grouped by their K/V head
    scores = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
    scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        mask = mx.arange(s)[None, :] <= mx.arange(lq)[:, None] + (s - lq)
    if mask is not None:
        if mask.ndim == 4:
            mask = mx.expand_dims(mask, 2)
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ mx.expand_dims(v, 2)).reshape(b, h, lq, -1)


class PagedKVStore:
    """Per-layer K/V pools of shape ``(num_blocks * block_size, kv_heads, 1, head_dim)``.

    The singleton axis is the sequence axis of the ``(B, KVH, L, D)`` K/V that mlx-lm's attention
    hands its cache with ``B = T`` tokens and ``L = 1``: a step's K/V go in without a reshape, and
    one sequence's run of slots becomes SDPA's ``(1, KVH, ctx, D)`` with one transpose.

    Block id ``b`` (vLLM's) keeps its K/V in physical block ``phys[b]``; ``phys`` is a permutation
    that fixes the null block 0, and every read, write and copy goes through it.
    """

    def __init__(self, specs: list[LayerSpec], num_blocks: int, block_size: int, dtype: mx.Dtype,
                 limits: AttnLimits | None = None, state_slots: int = 0,
                 layer_groups: list[int] | None = None, layer_pools: list[int | None] | None = None,
                 kernel: PagedKernel | None = None):
        self.block_size = block_size
        self.limits = limits  # how a step's attention is split (None: one call per kind)
        self.kernel = kernel  # steps of several sequences attend through it (None: MLX ops)
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        # The pool pair each layer that holds K/V writes: its own, or, where vLLM overlays its KV
        # cache groups on one memory, the pool ``layer_pools`` names, shared with one layer of each
        # other group (the groups never hold the same block id at once). A layer that reads another's K/V uses the
        # source's pools and group; recurrent layers keep state in ``self.recurrent`` instead.
        n = len(specs)
        source = [i if s.kv_source is None else s.kv_source for i, s in enumerate(specs)]
        own = [i if layer_pools is None else layer_pools[i] for i in range(n)]
        self.pool_of = [own[source[i]] if specs[source[i]].holds_kv else None for i in range(n)]
        self.group_of = [0 if layer_groups is None else layer_groups[source[i]] for i in range(n)]
        first = {}
        for i, pool in enumerate(self.pool_of):
            if pool is not None:
                first.setdefault(pool, specs[i])
        width = max(first, default=-1) + 1
        self.k = [mx.zeros((slots, first[p].kv_heads, 1, first[p].head_dim), dtype=dtype) if p in first else None
                  for p in range(width)]
        self.v = [mx.zeros((slots, first[p].kv_heads, 1, first[p].v_head_dim), dtype=dtype) if p in first else None
                  for p in range(width)]
        mx.eval(self.arrays())
        states = {i: s.state for i, s in enumerate(specs) if s.state is not None}
        self.recurrent = RecurrentStore(states, state_slots) if states else None
        self.phys = np.arange(num_blocks, dtype=np.int32)  # block id -> physical block
        self.owner = np.arange(num_blocks, dtype=np.int32)  # physical block -> block id
        self.steps: list[StepMetadata] = []  # the step's metadata, per KV cache group
        self.calls = 0
        # MLX's CPU SDPA is composed of matmuls, which copy a strided operand through a slow
        # general path (GQA broadcasts it too); one explicit copy per read is cheaper there
        self.copy_reads = mx.default_device().type == mx.DeviceType.cpu
        self.moved_blocks = 0  # block ids whose K/V placement moved, since start (VLLM_METAL_DEBUG logs it)
        self.layers = [self._layer_cache(i, s) for i, s in enumerate(specs)]  # the model's caches

    def _layer_cache(self, i: int, spec: LayerSpec) -> PagedLayerCache | RecurrentLayerCache:
        if spec.state is not None:
            return RecurrentLayerCache(self.recurrent, i, self._count_call)
        return PagedLayerCache(self, self.pool_of[i], spec.window, writes=spec.kv_source is None,
                               group=self.group_of[i])

    def _count_call(self) -> None:
        self.calls += 1

    def arrays(self) -> list[mx.array]:
        """The K/V pools (what block copies and placement move)."""
        return [a for a in self.k + self.v if a is not None]

    def kv_nbytes(self) -> int:
        """Bytes of the K/V pools (one block of every pool: this / ``num_blocks``)."""
        return sum(a.nbytes for a in self.arrays())

    def state_arrays(self) -> list[mx.array]:
        """The recurrent-state pools (empty without recurrent layers)."""
        return [] if self.recurrent is None else self.recurrent.arrays()

    def nbytes(self) -> int:
        return self.kv_nbytes() + sum(a.nbytes for a in self.state_arrays())

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` (block ids) in every layer (scheduler-requested copies)."""
        if not pairs:
            return
        src, dst = (self.phys[np.array(ids, dtype=np.int64)] for ids in zip(*pairs, strict=True))
        self._copy_physical(src, dst)
        mx.eval(self.arrays())

    def physical_tables(self, tables: list[np.ndarray], place: bool = True) -> list[np.ndarray]:
        """The step's block tables in physical blocks. With ``place``, a step of one sequence first
        has its blocks placed consecutively: all it holds, so blocks vLLM allocated ahead of the
        context (speculative drafts, the next step's slots) are in place when the context reaches
        them."""
        if place and len(tables) == 1:
            self.place_consecutive(tables[0])
        return [self.phys[t] for t in tables]

    def place_consecutive(self, blocks: np.ndarray) -> None:
        """Swap physical blocks until ``blocks`` (block ids, in order) lie consecutively in the
        pool. Each swapped-out block's K/V move with it, so every block id keeps its contents.

        Where the run goes decides how often it moves again. vLLM hands a request's new blocks
        out from the front of its free queue: blocks a finished request gave back (in reverse
        order when they hold no cached prefix), or never-used blocks in ascending order. So the
        next block a sequence gets is usually the one after its last block, or, when its last
        block came back from a finished request, the never-used frontier (the block after its
        highest id). A run that ends just before that block grows into it for free; a run placed
        elsewhere moves a block each time the sequence gets a new one (every ``block_size`` decode
        steps, or every few steps with speculative drafts). Each move costs a few hundred kernels
        and a wait on a host-bound step, whatever its size, so the run ends at its last block, or
        else just before the frontier block, unless that moves more than ``MAX_MOVE_BYTES``; then
        it starts where most of the blocks already are, and if that moves too much as well the
        step reads the blocks by slot."""
        n = len(blocks)
        where = self.phys[blocks]
        if n < 2 or _is_run(where) or (blocks == 0).any():
            return
        starts, kept = np.unique(where - np.arange(n), return_counts=True)
        ok = (starts >= 1) & (starts <= self.num_blocks - n)  # never the null block 0
        most_kept = int(starts[ok][np.argmax(kept[ok])]) if ok.any() else self.num_blocks - n
        frontier = int(blocks.max()) + 1
        choices = [int(where[-1]) - (n - 1), most_kept]  # anchored at the last block
        if frontier < self.num_blocks:
            choices.insert(1, int(self.phys[frontier]) - n)
        for start in dict.fromkeys(c for c in choices if 1 <= c <= self.num_blocks - n):
            phys, owner = self.phys.copy(), self.owner.copy()
            for target, b in enumerate(blocks, start):
                here = phys[b]
                if here != target:
                    other = owner[target]
                    phys[b], phys[other] = target, here
                    owner[target], owner[here] = b, other
            moved = np.flatnonzero(phys != self.phys)  # block ids whose K/V change place
            if len(moved) * self.kv_nbytes() <= MAX_MOVE_BYTES * self.num_blocks:
                self._copy_physical(self.phys[moved], phys[moved])
                self.phys, self.owner = phys, owner
                self.moved_blocks += len(moved)
                return

    def _copy_physical(self, src: np.ndarray, dst: np.ndarray) -> None:
        """``pool[block dst[i]] = pool[block src[i]]`` in every pool. The rows are read and
        evaluated first: MLX keeps an evaluation's input buffers until it completes, so a write
        recorded in the same evaluation as a read of that pool would copy the whole pool."""
        rows = np.arange(self.block_size)
        src_i, dst_i = (mx.array((b[:, None] * self.block_size + rows).reshape(-1).astype(np.int32))
                        for b in (src, dst))
        pools = self.arrays()
        moved = [pool[src_i] for pool in pools]
        mx.eval(moved)
        mx.synchronize()
        for pool, rows_moved in zip(pools, moved, strict=True):
            pool[dst_i] = rows_moved  # updates the array object that self.k / self.v hold


def attention_limits(specs: list[LayerSpec], dtype: mx.Dtype, budget: int) -> AttnLimits:
    """The widest layer's attention geometry, with ``budget`` bytes per attention call."""
    kv_token = max(s.kv_heads * (s.head_dim + s.v_head_dim) for s in specs) * dtype.size  # 0 for recurrent layers
    return AttnLimits(max(s.q_heads for s in specs), kv_token, budget)


@dataclass(frozen=True)
class LayerSpec:
    """What the cache of one layer looks like: an attention layer's K/V geometry, or a
    recurrent layer's per-request state (``state``; its K/V fields are 0)."""

    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int | None
    kv_source: int | None = None  # attends over that (earlier) layer's K/V and holds none (shared KV)
    state: tuple[StateArray, ...] | None = None  # a recurrent layer: one request's state arrays

    @property
    def holds_kv(self) -> bool:
        return self.kv_source is None and self.state is None

    @classmethod
    def recurrent(cls, state: tuple[StateArray, ...]) -> LayerSpec:
        return cls(0, 0, 0, 0, None, state=state)


class PagedLayerCache:
    """Stands in for an mlx-lm KV cache of one layer; the model's attention code calls it.
    ``layer`` is the pool it reads (its own, or the source layer's where it shares K/V; a memory
    tensor's where vLLM shares one between groups), ``group`` the KV cache group whose block table
    it uses; ``writes`` is False for a layer that shares another's K/V (that layer wrote them)."""

    def __init__(self, store: PagedKVStore, layer: int, window: int | None, writes: bool = True,
                 group: int = 0):
        self.store = store
        self.layer = layer
        self.window = window
        self.writes = writes
        self.group = group

    @property
    def step(self) -> StepMetadata:
        return self.store.steps[self.group]

    @property
    def offset(self) -> mx.array:
        return self.step.positions

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write this step's K/V (shape ``(T, KVH, 1, D)``) into the pools by slot mapping (a
        slice write when the slots are one run, e.g. any single decode token). A layer that
        shares another's K/V writes nothing: the source layer wrote these."""
        if not self.writes:
            return keys, values
        step = self.step
        k_pool = self.store.k[self.layer]
        v_pool = self.store.v[self.layer]
        where = step.slot_mapping if step.slot_range is None else slice(*step.slot_range)
        k_pool[where] = _as(keys, k_pool.dtype)
        v_pool[where] = _as(values, v_pool.dtype)
        self.store.k[self.layer] = k_pool
        self.store.v[self.layer] = v_pool
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return None  # masks come from the step metadata

    def attend(self, queries: mx.array, scale: float, sinks: mx.array | None,
               softcap: float | None = None) -> mx.array:
        """Queries ``(T, H, 1, D)`` -> output ``(T, H, 1, Dv)``; ``softcap`` soft-caps the scores."""
        self.store.calls += 1
        step = self.step
        t, h = queries.shape[0], queries.shape[1]
        k_pool, v_pool = self.store.k[self.layer], self.store.v[self.layer]
        if step.kernel is not None:
            out = self.store.kernel(_as(queries.reshape(t, h, -1), k_pool.dtype), k_pool, v_pool, step.kernel,
                                    scale, self.window, sinks, softcap)
            return _as(out.reshape(t, h, 1, -1), queries.dtype)
        g = step.groups[0]
        if (len(step.groups) == 1 and (g.ctx_slot0 is not None or g.ctx_slots is not None)
                and (start := g.visible_from(self.window)) is not None):
            return self._attend_one_sequence(queries, g, start, scale, sinks, softcap)
        out = paged_attention(
            queries.reshape(t, h, -1),
            k_pool,
            v_pool,
            step,
            self.store.block_size,
            scale,
            self.window,
            sinks,
            softcap,
            self.store.copy_reads,
        )
        return _as(out.reshape(t, h, 1, -1), queries.dtype)

    def _attend_one_sequence(
        self, queries: mx.array, g: AttnGroup, start: int, scale: float, sinks: mx.array | None,
        softcap: float | None,
    ) -> mx.array:
        """One sequence (single-stream serving): its visible K/V are one slice of the pool, or one
        gather when its blocks are scattered (a request that starts on prefix-cached blocks), and
        SDPA runs without a mask array: about as few ops per layer as mlx-lm's own cache. A chunk
        whose scores exceed the step's limits runs in query tiles, one after another."""
        k = g.read_context(self.store.k[self.layer], start).transpose(2, 1, 0, 3)  # -> (1, KVH, ctx, D)
        v = g.read_context(self.store.v[self.layer], start).transpose(2, 1, 0, 3)
        if self.store.copy_reads:
            k, v = mx.contiguous(k), mx.contiguous(v)
        if queries.shape[0] == 1:  # decode: (1, H, 1, D) is already SDPA's layout
            o = sdpa(queries, k, v, scale, None, sinks, softcap)
            return _as(o, queries.dtype)
        q = queries.transpose(2, 1, 0, 3)  # (T, H, 1, D) -> (1, H, T, D)
        n, limits = q.shape[2], self.step.limits
        tiles = [(0, n)] if limits is None else limits.tiles(n, k.shape[2])
        outs: list[mx.array] = []
        for a, b in tiles:
            ctx = k.shape[2] - n + b  # the tile's queries see up to its last one (bottom-right causal)
            outs.append(sdpa(q[:, :, a:b], k[:, :, :ctx], v[:, :, :ctx], scale, "causal", sinks, softcap))
            if len(tiles) > 1:
                mx.eval(outs[-1])  # one tile's scores at a time (see paged_attention)
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        return _as(o.transpose(2, 1, 0, 3), queries.dtype)


def _as(a: mx.array, dtype: mx.Dtype) -> mx.array:
    return a if a.dtype == dtype else a.astype(dtype)
