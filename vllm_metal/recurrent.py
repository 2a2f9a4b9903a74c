"""Recurrent-state layers (Gated DeltaNet, Mamba, short convolutions) on the paged path.

mlx-lm keeps such a layer's state in an ``ArraysCache``: a few arrays per sequence (a
convolution's last inputs, a recurrence's matrix) that every token updates in place of the K/V
an attention layer appends. ``RecurrentStore`` holds those arrays for ``slots`` requests at once,
one pool per array, and gives each running request a slot. ``RecurrentLayerCache`` is the cache
object such a layer receives in the packed forward; the layer's own mlx-lm code runs on the
request's state, gathered from the pool and written back:

- the step's decode rows together, as one batch of one-token sequences, the way mlx-lm's batch
  generator decodes;
- each prefill chunk alone, as one sequence, the way mlx-lm prefills a prompt.

So no layer sees padding, and each runs exactly mlx-lm's code. A request's state is zeroed when
it starts from position 0 (new, or recomputed after preemption) and must otherwise continue from
the position the slot holds: a request that resumes anywhere else (a prefix-cache hit, which
has K/V for the prefix but no state) fails loudly instead of running on the wrong state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# where mlx-lm's hybrid models keep the module that takes a recurrent layer's cache
RECURRENT_MODULES = ("linear_attn", "mixer", "mamba", "conv")


@dataclass(frozen=True)
class StateArray:
    """One array of one request's state in one layer."""

    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def recurrent_module(layer: nn.Module) -> nn.Module | None:
    for name in RECURRENT_MODULES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def probe_state(layer: nn.Module, cache, width: int, dtype: mx.Dtype) -> tuple[StateArray, ...]:
    """The arrays one request's state holds in ``layer``: its recurrent module run (recorded,
    never evaluated: MLX knows shapes at once) on one token of width ``width`` with ``cache``,
    a fresh mlx-lm cache of the kind the model makes for the layer."""
    module = recurrent_module(layer)
    if module is None:
        raise ValueError(f"no recurrent module ({', '.join(RECURRENT_MODULES)}) in {type(layer).__name__}")
    module(mx.zeros((1, 1, width), dtype=dtype), None, cache)
    return tuple(StateArray(tuple(a.shape[1:]), a.dtype) for a in cache.cache)


@dataclass
class _Group:
    """Requests whose recurrent layers run in one call: decode rows together, or one chunk."""

    slots: mx.array  # (S,) pool slots
    fresh: mx.array | None  # (S,) bool: state starts at zero; None: none does
    rows: slice | mx.array  # the packed rows, in the group's order
    chunk: int  # tokens per request: 1 for decode rows, n for one chunk


class RecurrentStore:
    """State pools of every recurrent layer for ``slots`` requests, and the slot each running
    request holds. ``begin`` plans a step; the layers' ``RecurrentLayerCache`` run it."""

    def __init__(self, states: dict[int, tuple[StateArray, ...]], slots: int):
        self.slots = slots
        self.pools = {i: [mx.zeros((slots, *a.shape), dtype=a.dtype) for a in arrays]
                      for i, arrays in states.items()}
        mx.eval(self.arrays())
        self.slot_of: dict[str, int] = {}
        self.held: dict[str, int] = {}  # req_id -> tokens its state has consumed
        self.free = list(range(slots - 1, -1, -1))
        self.groups: list[_Group] = []
        self.out_order: mx.array | None = None  # group outputs -> packed order; None = identity

    def arrays(self) -> list[mx.array]:
        return [a for pool in self.pools.values() for a in pool]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def release(self, keep: set[str]) -> None:
        """Free the slots of requests outside ``keep`` (finished, aborted or preempted)."""
        for req_id in self.slot_of.keys() - keep:
            self.free.append(self.slot_of.pop(req_id))
            self.held.pop(req_id, None)

    def share_first_slot(self, req_ids: list[str], starts: list[int]) -> None:
        """Give all of ``req_ids`` slot 0, each as if its state held ``starts`` tokens (a scratch
        step that measures memory: what the state holds does not matter there)."""
        self.slot_of.update(dict.fromkeys(req_ids, 0))
        self.held.update(zip(req_ids, starts, strict=True))

    def begin(self, req_ids: list[str], lens: list[int], starts: list[int]) -> None:
        """Plan one step (requests in packed order): slots, which states start at zero, and the
        calls each recurrent layer makes."""
        slots, fresh = [], []
        for req_id, n, start in zip(req_ids, lens, starts, strict=True):
            slot = self.slot_of.get(req_id)
            if slot is None:
                if not self.free:
                    raise RuntimeError(
                        f"vllm-metal: no recurrent-state slot left for request {req_id}: all {self.slots} "
                        "are held (the scheduler ran more requests than --max-num-seqs allowed the "
                        "worker to reserve state for).")
                slot = self.slot_of[req_id] = self.free.pop()
            held = self.held.get(req_id, 0)
            if start != 0 and start != held:
                raise RuntimeError(
                    f"vllm-metal: request {req_id} continues at position {start}, but its recurrent "
                    f"state holds {held} tokens. Hybrid models keep no state for cached prefixes: "
                    "serve them without --enable-prefix-caching.")
            self.held[req_id] = start + n
            slots.append(slot)
            fresh.append(start == 0)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        decode = [i for i, n in enumerate(lens) if n == 1]
        groups: list[_Group] = []
        order: list[np.ndarray] = []

        def group(members: list[int], rows: slice | mx.array, chunk: int) -> None:
            f = [fresh[i] for i in members]
            groups.append(_Group(mx.array(np.array([slots[i] for i in members], dtype=np.int32)),
                                 mx.array(np.array(f)) if any(f) else None, rows, chunk))

        if decode:
            rows = offsets[decode]
            in_order = len(decode) == len(lens)
            group(decode, slice(None) if in_order else mx.array(rows.astype(np.int32)), 1)
            order.append(rows)
        for i, n in enumerate(lens):
            if n > 1:
                group([i], slice(int(offsets[i]), int(offsets[i + 1])), n)
                order.append(np.arange(offsets[i], offsets[i + 1]))
        self.groups = groups
        packed = np.concatenate(order)
        self.out_order = None
        if not (packed == np.arange(len(packed))).all():
            out_order = np.empty(len(packed), dtype=np.int32)
            out_order[packed] = np.arange(len(packed), dtype=np.int32)
            self.out_order = mx.array(out_order)

    def reset(self) -> None:
        """Forget every request's state (a failed step leaves the pools unusable)."""
        self.release(set())
        self.pools = {i: [mx.zeros_like(a) for a in pool] for i, pool in self.pools.items()}


class RecurrentLayerCache:
    """Stands in for the mlx-lm cache of one recurrent layer in the packed forward; the layer's
    recurrent module (adapted by ``adapt_recurrent``) hands its call to ``run``."""

    def __init__(self, store: RecurrentStore, layer: int, on_call=None):
        self.store = store
        self.layer = layer
        self.on_call = on_call  # counts the call (the paged store checks every layer ran through it)

    def make_mask(self, n: int, *args, **kwargs):
        return None  # each call sees whole sequences, never padding

    def run(self, call, x: mx.array) -> mx.array:
        """``call(x, cache)`` (the module's own code) over the packed rows ``x`` (``(T, 1, D)``),
        decode rows together and each chunk alone, each on its requests' state."""
        from mlx_lm.models.cache import ArraysCache

        if self.on_call is not None:
            self.on_call()
        pools = self.store.pools[self.layer]
        outs = []
        for g in self.store.groups:
            cache = ArraysCache(len(pools))
            for k, pool in enumerate(pools):
                state = pool[g.slots]
                if g.fresh is not None:
                    state = mx.where(g.fresh.reshape(-1, *[1] * (state.ndim - 1)), mx.zeros_like(state), state)
                cache[k] = state
            xs = x[g.rows]
            if g.chunk > 1:
                xs = xs.reshape(1, g.chunk, -1)
            out = call(xs, cache)
            for k, pool in enumerate(pools):
                pool[g.slots] = cache[k].astype(pool.dtype)
            outs.append(out.reshape(-1, 1, out.shape[-1]))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return out if self.store.out_order is None else out[self.store.out_order]


_ADAPTED: dict[type, type] = {}


def adapt_recurrent(module: nn.Module) -> None:
    """Make ``module`` (a recurrent layer's mlx-lm module, called as ``module(x, mask, cache)``)
    hand a packed step to its ``RecurrentLayerCache``; with any other cache it runs as before.
    Same parameters, same module tree: only its class changes."""
    base = type(module)
    if not getattr(base, "__vllm_metal_recurrent__", False):
        module.__class__ = _ADAPTED.get(base) or _ADAPTED.setdefault(base, _paged_class(base))


def _paged_class(base: type) -> type:

    def __call__(self, x, *args, **kwargs):
        args = list(args)
        ours = next((i for i, a in enumerate(args) if isinstance(a, RecurrentLayerCache)), None)
        if ours is None and not isinstance(kwargs.get("cache"), RecurrentLayerCache):
            return base.__call__(self, x, *args, **kwargs)
        cache = args[ours] if ours is not None else kwargs["cache"]

        def call(xs, state):
            # the model's mask (None from our cache's make_mask) and cache become this call's
            a = [state if i == ours else None for i in range(len(args))]
            kw = {k: None if k == "mask" else v for k, v in kwargs.items()}
            if ours is None:
                kw["cache"] = state
            return base.__call__(self, xs, *a, **kw)

        return cache.run(call, x)

    return type(f"Paged{base.__name__}", (base,), {"__call__": __call__, "__vllm_metal_recurrent__": True})
