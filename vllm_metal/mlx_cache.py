"""The MLX-managed KV cache path (``VLLM_METAL_USE_PAGED_ATTENTION=0``).

Each request owns mlx-lm's own prompt cache (``make_prompt_cache``: ``KVCache``, or
``RotatingKVCache`` for sliding-window layers) and runs as its own ``(1, n)`` forward, exactly as
``mlx_lm.generate`` does; the step evaluates all requests' graphs together. vLLM's block manager
still schedules and counts blocks (admission and preemption stay vLLM's), but no block pool is
allocated: the caches grow with the sequence. It is the reference the paged path is measured
against. (A model whose attention the paged path cannot wrap is refused on both paths: the
loader checks it.)

Prefix reuse: vLLM reports a hit as ``num_computed_tokens > 0`` on a new request. With
``VLLM_METAL_PREFIX_CACHE`` on, finished prompt prefills leave a snapshot of their K/V (plain
``KVCache`` models only) in a store bounded by ``VLLM_METAL_PREFIX_CACHE_FRACTION`` of device
memory; a hit restores it. A hit without a snapshot recomputes those tokens, so outputs never
depend on what the store holds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from vllm_metal.device import EvalTimer
from vllm_metal.loader import LoadedModel


@dataclass
class RequestWork:
    """One request's share of a step: feed ``tokens`` (positions ``start``..), return ``rows``."""

    req_id: str
    tokens: list[int]  # every token id the request has, prompt then output
    start: int  # vLLM's num_computed_tokens: position of the first token scheduled this step
    count: int  # tokens vLLM scheduled this step
    all_rows: bool  # prompt logprobs: return logits for every scheduled position


class PrefixStore:
    """Byte-bounded LRU of prompt-prefix K/V snapshots for the MLX-managed path."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[int, ...], list[tuple[mx.array, mx.array]]] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(layers: list[tuple[mx.array, mx.array]]) -> int:
        return sum(k.nbytes + v.nbytes for k, v in layers)

    def put(self, tokens: tuple[int, ...], caches: list) -> None:
        if not tokens or tokens in self.entries or not all(type(c) is KVCache for c in caches):
            return
        n = len(tokens)
        layers = [(mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])) for c in caches]
        size = self._size(layers)
        if size > self.budget:
            return
        mx.eval([a for kv in layers for a in kv])
        self.entries[tokens] = layers
        self.nbytes += size
        while self.nbytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= self._size(old)

    def restore(self, prefix: list[int], model) -> list | None:
        """Fresh caches holding K/V for exactly ``prefix``, or None when no snapshot covers it."""
        want, n = tuple(prefix), len(prefix)
        for key in reversed(self.entries):
            if len(key) >= n and key[:n] == want:
                self.entries.move_to_end(key)
                caches = make_prompt_cache(model)
                for cache, (k, v) in zip(caches, self.entries[key], strict=True):
                    cache.state = (k[..., :n, :], v[..., :n, :], n)
                return caches
        return None


class MlxManagedCaches:
    """Per-request mlx-lm caches and the per-request forward of the MLX-managed path."""

    def __init__(self, loaded: LoadedModel, prefix_budget_bytes: int, block_size: int,
                 evaluate: EvalTimer | None = None):
        self.loaded = loaded
        self.evaluate = evaluate or EvalTimer()
        self.block_size = block_size
        self.caches: dict[str, list] = {}
        self.fed: dict[str, int] = {}  # tokens each request's cache holds
        self.restored_tokens = 0  # prefix tokens served from snapshots (VLLM_METAL_DEBUG logs it)
        self.prefix = PrefixStore(prefix_budget_bytes) if prefix_budget_bytes > 0 else None

    def keep_only(self, req_ids: set[str]) -> None:
        """Free the caches of requests that left the batch (finished, aborted or preempted)."""
        for req_id in self.caches.keys() - req_ids:
            del self.caches[req_id], self.fed[req_id]

    def nbytes(self) -> int:
        return sum(a.nbytes for caches in self.caches.values() for a in _arrays(caches))

    def _cache_for(self, work: RequestWork) -> list:
        caches, fed = self.caches.get(work.req_id), self.fed.get(work.req_id, 0)
        if caches is not None and fed <= work.start:
            return caches
        if caches is not None and all(c.is_trimmable() for c in caches):
            for c in caches:
                c.trim(fed - work.start)
            self.fed[work.req_id] = work.start
            return caches
        # New, resumed after preemption, or a prefix hit: restore a snapshot, else recompute.
        caches, fed = None, 0
        if self.prefix is not None and work.start > 0:
            caches = self.prefix.restore(work.tokens[: work.start], self.loaded.model)
            fed = work.start if caches is not None else 0
            self.restored_tokens += fed
        self.caches[work.req_id] = caches or make_prompt_cache(self.loaded.model)
        self.fed[work.req_id] = fed
        return self.caches[work.req_id]

    def forward(self, works: list[RequestWork], prompt_lens: dict[str, int]) -> mx.array:
        """Logits: one row per request (its last scheduled position), then, for ``all_rows``
        requests, one row per scheduled position, in ``works`` order (the paged path's layout)."""
        last_rows, extra_rows, touched = [], [], []
        for work in works:
            caches = self._cache_for(work)
            fed = self.fed[work.req_id]
            feed = work.tokens[fed : work.start + work.count]  # recompute what the cache lacks
            skip = work.start - fed
            wanted = list(range(skip, skip + work.count)) if work.all_rows else [skip + work.count - 1]
            logits = self.loaded.logits_1xn(mx.array([feed], dtype=mx.int32), caches, mx.array(wanted))
            self.fed[work.req_id] = work.start + work.count
            last_rows.append(logits[-1:])
            if work.all_rows:
                extra_rows.append(logits)
            touched.append((work, caches))
        out = mx.concatenate(last_rows + extra_rows, axis=0)
        self.evaluate(out, [a for _, caches in touched for a in _arrays(caches)])
        if self.prefix is not None:
            for work, caches in touched:
                n = prompt_lens[work.req_id] // self.block_size * self.block_size
                if work.start < n <= work.start + work.count:  # this step completed the prompt's blocks
                    self.prefix.put(tuple(work.tokens[:n]), caches)
        return out


def _arrays(caches: list) -> list[mx.array]:
    """Every array an mlx-lm cache object holds (KV buffers, recurrent state)."""
    out: list[mx.array] = []
    for cache in caches:
        for value in vars(cache).values():
            if isinstance(value, mx.array):
                out.append(value)
            elif isinstance(value, list):
                out.extend(a for a in value if isinstance(a, mx.array))
    return out
