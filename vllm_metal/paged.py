"""The paged KV backend: vLLM's blocks as MLX pools, a step as one packed forward.

The pools, block placement and attention are ``attention.py``'s (recurrent state:
``recurrent.py``'s); this module turns a ``StepBatch`` into the packed token row, the physical
block tables and the step metadata, runs the model over the store's per-layer caches and checks
once that every layer ran through them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from vllm_metal.attention import AttnLimits, PagedKVStore, build_step_metadata
from vllm_metal.device import EvalTimer
from vllm_metal.kv_backend import KVBackend, StepBatch
from vllm_metal.loader import LoadedModel
from vllm_metal.mlx_lm_models import UnsupportedModelError
from vllm_metal.paged_kernel import MIN_PART, PagedKernel


class PagedBackend(KVBackend):
    reads_late_tokens = True

    def __init__(self, loaded: LoadedModel, block_size: int, max_model_len: int, limits: AttnLimits,
                 evaluate: EvalTimer, state_slots: int = 0, layer_groups: list[int] | None = None,
                 layer_pools: list[int | None] | None = None, place_group: int = 0,
                 kernel: PagedKernel | None = None):
        self.loaded = loaded
        self.kernel = kernel  # the paged attention kernel steps of several sequences use (None: MLX ops)
        self.state_slots = state_slots  # requests whose recurrent state the store holds at once
        self.layer_groups = layer_groups  # each layer's KV cache group (None: one group)
        self.layer_pools = layer_pools  # each layer's pool, shared across groups (None: one per layer)
        self.num_groups = 1 + max(layer_groups or [0])
        self.place_group = place_group  # the group whose blocks a lone sequence has placed in one run
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.limits = limits
        self.evaluate = evaluate
        self.store: PagedKVStore | None = None
        self._verified = False

    def _new_store(self, num_blocks: int, state_slots: int) -> PagedKVStore:
        return PagedKVStore(self.loaded.specs, num_blocks, self.block_size, self.loaded.dtype, self.limits,
                            state_slots, self.layer_groups, self.layer_pools, self.kernel)

    def allocate(self, num_blocks: int) -> None:
        self.store = self._new_store(num_blocks, self.state_slots)

    def keep_only(self, req_ids: set[str]) -> None:
        if self.store is not None and self.store.recurrent is not None:
            self.store.recurrent.release(req_ids)

    def clear(self) -> None:
        self.store = None

    @property
    def moved_blocks(self) -> int:
        return self.store.moved_blocks if self.store is not None else 0

    def nbytes(self) -> int:
        return self.store.nbytes() if self.store is not None else 0

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.store.copy_blocks(pairs)

    def describe(self) -> str:
        store = self.store
        state = "" if store.recurrent is None else (
            f"; recurrent state for {store.recurrent.slots} requests "
            f"({store.recurrent.nbytes() / 2**20:.1f} MiB)")
        groups = "" if self.num_groups == 1 else (
            f" in {self.num_groups} groups over {sum(a is not None for a in store.k)} pools "
            "(sliding-window layers hold only their window)")
        attention = (f"batched attention in the {self.kernel.backend} paged kernel" if self.kernel is not None
                     else f"attention calls hold up to {self.limits.budget / 2**20:.0f} MiB each")
        return (f"paged KV cache of {store.num_blocks} blocks x {self.block_size} tokens{groups} "
                f"({store.kv_nbytes() / 2**20:.1f} MiB){state}; {attention}")

    def forward(self, step: StepBatch) -> mx.array:
        store = self.store
        ends = [s + n for s, n in zip(step.starts, step.lens, strict=True)]
        groups = [step.tables, *step.group_tables]
        if len(step.lens) == 1:  # a lone sequence's full-attention blocks are placed first
            store.place_consecutive(groups[self.place_group][0])
        tables = [store.physical_tables(t, place=False) for t in groups]
        tokens = np.concatenate([h[s:e] for h, s, e in zip(step.histories, step.starts, ends, strict=True)])
        rows = None  # every row's logits, in order: a step of decodes only
        if any(step.all_rows) or step.num_tokens != len(step.lens):
            last = np.cumsum(step.lens) - 1
            extra = [np.arange(e - n, e) for e, n, wanted in zip(last + 1, step.lens, step.all_rows, strict=True)
                     if wanted]
            rows = mx.array(np.concatenate([last, *extra]).astype(np.int32))
        ids = mx.array(tokens.astype(np.int32))
        if step.late is not None:
            index, late_ids = step.late
            ids[mx.array(index.astype(np.int32))] = late_ids
        if store.recurrent is not None:
            store.recurrent.begin(step.req_ids, step.lens, step.starts)
        return self._run(store, step.lens, step.starts, tables, ids, rows)

    def _run(self, store: PagedKVStore, lens: list[int], starts: list[int], tables: list[list[np.ndarray]],
             tokens: mx.array, rows: mx.array | None) -> mx.array:
        """``tables``: per KV cache group, each request's physical blocks."""
        store.steps = [build_step_metadata(lens, starts, t, self.block_size, store.limits, store.kernel is not None)
                       for t in tables]
        store.calls = 0
        logits = self.loaded.logits(tokens, store.layers, rows)
        self.evaluate(logits, store.arrays() + store.state_arrays())
        store.steps = []
        if not self._verified:
            layers = len(self.loaded.specs)
            if store.calls != layers:
                raise UnsupportedModelError(
                    f"{type(self.loaded.model).__module__}: only {store.calls} of {layers} layers "
                    "ran through the paged cache; this model's attention is not supported on "
                    "the paged path."
                )
            self._verified = True
        return logits

    def profile(self, lens: list[int], starts: list[int]) -> int:
        mx.eval(mx.zeros(1))  # settle anything pending before the baseline
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        scratch = self._scratch_forward(lens, starts)
        return max(0, mx.get_peak_memory() - base - scratch)

    def attention_bound(self, lens: list[int], starts: list[int]) -> int:
        """Two attention calls at the most each may hold (a step's calls run one after another),
        or the step's whole attention where that is less."""
        unsplit = sum(self.limits.cost(1, n, s + n) for n, s in zip(lens, starts, strict=True))
        return min(2 * self.limits.budget, unsplit)

    def warm_up(self, num_tokens: int) -> None:
        """A single-sequence prefill (the mask-free path) and a step of a prefill chunk and a decode
        (the masked block-table path, or the paged kernel's prefill layout); with the kernel also
        decode-only steps, short and with partitioned contexts: MLX's CUDA backend compiles
        kernels on first use."""
        self.profile([num_tokens], [0])
        if self.max_model_len > 3:  # the smallest such step: 2 + 1 rows
            self._scratch_forward([2, 1], [0, 2])
        if self.kernel is not None:
            self._scratch_forward([1, 1], [0, 1])
            long = min(self.max_model_len - 1, 4 * MIN_PART)
            if long >= 2 * MIN_PART:
                self._scratch_forward([1, 1], [long, long])

    def _scratch_forward(self, lens: list[int], starts: list[int]) -> int:
        """One step of ``lens`` tokens at ``starts`` through a scratch store (the real pool is
        untouched); returns the store's bytes. All sequences share one block table as long as the
        longest context, and one recurrent-state slot: what they read and write does not matter
        here, and each still gathers its own copy of the state, as a real step does."""
        need = max(-(-(s + n) // self.block_size) for n, s in zip(lens, starts, strict=True))
        table = np.arange(1, 1 + need)  # block 0 stays unused, as in vLLM's pool
        store = self._new_store(1 + need, 1)
        if store.recurrent is not None:  # one state slot read and written by every sequence
            names = [f"scratch-{i}" for i in range(len(lens))]
            store.recurrent.share_first_slot(names, starts)
            store.recurrent.begin(names, lens, starts)
        tokens = mx.zeros((sum(lens),), dtype=mx.int32)
        rows = mx.array(np.cumsum(lens).astype(np.int32) - 1)
        mx.eval(self._run(store, lens, starts, [[table] * len(lens)] * self.num_groups, tokens, rows),
                store.arrays(), store.state_arrays())
        return store.nbytes()
