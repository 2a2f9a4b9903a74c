"""The MLX-managed KV cache path (``VLLM_METAL_USE_PAGED_ATTENTION=0``).

Each request owns mlx-lm's own prompt cache (``make_prompt_cache``: ``KVCache``, or
``RotatingKVCache`` for sliding-window layers) and runs as its own ``(1, n)`` forward, exactly as
``mlx_lm.generate`` does; the step evaluates all requests' graphs together. vLLM's block manager
still schedules and counts blocks (admission and preemption stay vLLM's), but no block pool is
allocated: the caches grow with the sequence. It is the reference the paged path is measured
against. A model whose attention the paged path cannot wrap is refused on both paths (the loader
checks it).

Prefix reuse: vLLM reports a hit as ``num_computed_tokens > 0`` on a new request. With
``VLLM_METAL_PREFIX_CACHE`` on, finished prompt prefills leave a snapshot of their K/V (plain
``KVCache`` models only) in a store bounded by ``VLLM_METAL_PREFIX_CACHE_FRACTION`` of device
memory; a hit restores it. A hit without a snapshot recomputes those tokens, so outputs never
depend on what the store holds.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from vllm_metal.device import EvalTimer
from vllm_metal.kv_backend import KVBackend, StepBatch
from vllm_metal.loader import LoadedModel


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


class MlxManagedBackend(KVBackend):
    """Per-request mlx-lm caches and the per-request forward of the MLX-managed path."""

    def __init__(self, loaded: LoadedModel, block_size: int, max_model_len: int, prefix_budget_bytes: int,
                 evaluate: EvalTimer | None = None):
        self.loaded = loaded
        self.evaluate = evaluate or EvalTimer()
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.prefix_budget = prefix_budget_bytes
        self.caches: dict[str, list] = {}
        self.fed: dict[str, int] = {}  # tokens each request's cache holds
        self.prefix: PrefixStore | None = None
        self.num_blocks = 0

    def allocate(self, num_blocks: int) -> None:
        """No pool: vLLM's ``num_blocks`` only bound admission; the prefix store starts empty."""
        self.num_blocks = num_blocks
        self.prefix = PrefixStore(self.prefix_budget) if self.prefix_budget > 0 else None

    def clear(self) -> None:
        self.caches, self.fed, self.prefix = {}, {}, None

    def keep_only(self, req_ids: set[str]) -> None:
        for req_id in self.caches.keys() - req_ids:
            del self.caches[req_id], self.fed[req_id]

    def nbytes(self) -> int:
        return sum(a.nbytes for caches in self.caches.values() for a in _arrays(caches))

    def describe(self) -> str:
        return (f"MLX-managed KV cache (per-request mlx-lm caches; vLLM accounts {self.num_blocks} "
                f"blocks x {self.block_size} tokens; prefix snapshots up to "
                f"{self.prefix_budget / 2**20:.1f} MiB)")

    def profile(self, lens: list[int], starts: list[int]) -> int:
        """One request of the step's tokens, up to ``max_model_len`` (the path runs one forward
        per request)."""
        n = max(1, min(sum(lens), self.max_model_len))
        mx.eval(mx.zeros(1))  # settle anything pending before the baseline
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        scratch = MlxManagedBackend(self.loaded, self.block_size, self.max_model_len, 0)
        history = np.zeros(n, dtype=np.int32)
        mx.eval(scratch.forward(StepBatch(["profile"], [n], [0], [history], [np.zeros(0, np.int32)],
                                          [False], [n])))
        return max(0, mx.get_peak_memory() - base)

    def _cache_for(self, req_id: str, history: np.ndarray, start: int) -> list:
        caches, fed = self.caches.get(req_id), self.fed.get(req_id, 0)
        if caches is not None and fed <= start:
            return caches
        if caches is not None and all(c.is_trimmable() for c in caches):
            for c in caches:
                c.trim(fed - start)
            self.fed[req_id] = start
            return caches
        # New, resumed after preemption, or a prefix hit: restore a snapshot, else recompute.
        caches, fed = None, 0
        if self.prefix is not None and start > 0:
            caches = self.prefix.restore(history[:start].tolist(), self.loaded.model)
            fed = start if caches is not None else 0
            self.restored_tokens += fed
        self.caches[req_id] = caches or make_prompt_cache(self.loaded.model)
        self.fed[req_id] = fed
        return self.caches[req_id]

    def forward(self, step: StepBatch) -> mx.array:
        last_rows, extra_rows, touched = [], [], []
        for req_id, history, start, count, all_rows in zip(
            step.req_ids, step.histories, step.starts, step.lens, step.all_rows, strict=True
        ):
            caches = self._cache_for(req_id, history, start)
            fed = self.fed[req_id]
            feed = history[fed : start + count]  # recompute what the cache lacks
            skip = start - fed
            wanted = list(range(skip, skip + count)) if all_rows else [skip + count - 1]
            logits = self.loaded.logits(mx.array(feed.astype(np.int32))[None], caches, mx.array(wanted))
            self.fed[req_id] = start + count
            last_rows.append(logits[-1:])
            if all_rows:
                extra_rows.append(logits)
            touched.append(caches)
        out = mx.concatenate(last_rows + extra_rows, axis=0)
        self.evaluate(out, [a for caches in touched for a in _arrays(caches)])
        if self.prefix is not None:
            for history, start, count, prompt_len, caches in zip(
                step.histories, step.starts, step.lens, step.prompt_lens, touched, strict=True
            ):
                n = prompt_len // self.block_size * self.block_size
                if start < n <= start + count:  # this step completed the prompt's blocks
                    self.prefix.put(tuple(history[:n].tolist()), caches)
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
