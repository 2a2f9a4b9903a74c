"""The interface between the runner and a KV cache: what one step computes, and the few calls
every cache kind answers.

A step is a ``StepBatch``: per request, in the input batch's order, the tokens vLLM scheduled,
where they start, the request's block ids and token history. A backend turns it into logits laid
out the same way whatever the cache: one row per request (its last scheduled position), then,
for requests with ``all_rows`` (prompt logprobs, speculative drafts, pooling), one row per
scheduled position, in batch order.

Backends: ``vllm_metal.paged.PagedBackend`` (vLLM-managed blocks, one packed forward) and
``vllm_metal.mlx_cache.MlxManagedBackend`` (mlx-lm's own per-request caches).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


@dataclass
class StepBatch:
    """One step's work, request by request in batch order."""

    req_ids: list[str]
    lens: list[int]  # tokens scheduled this step
    starts: list[int]  # position of the first scheduled token (vLLM's num_computed_tokens)
    histories: list[np.ndarray]  # token ids the request holds, prompt then output, through start + len
    tables: list[np.ndarray]  # vLLM block ids of the request
    all_rows: list[bool]  # logits for every scheduled position, not only the last (module doc)
    prompt_lens: list[int]
    # Input ids still on the device (sampled one step ahead): (packed token index, ids); the
    # histories hold placeholders there. Only for backends with ``reads_late_tokens``.
    late: tuple[np.ndarray, mx.array] | None = None
    # With several KV cache groups (sliding-window layers beside full-attention ones): the block
    # ids of each further group, group by group, then request by request (``tables`` is group 0's).
    group_tables: list[list[np.ndarray]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.lens)

    def row_spans(self) -> dict[str, tuple[int, int, int]]:
        """req_id -> (first logits row, rows, first position) of the requests with ``all_rows``."""
        rows: dict[str, tuple[int, int, int]] = {}
        row = len(self.req_ids)
        for req_id, n, start, wanted in zip(self.req_ids, self.lens, self.starts, self.all_rows, strict=True):
            if wanted:
                rows[req_id] = (row, n, start)
                row += n
        return rows


class KVBackend(ABC):
    """A KV cache kind behind the runner. Counters are cumulative since start (debug logging)."""

    moved_blocks: int = 0  # block ids whose K/V placement moved (paged placement)
    reads_late_tokens: bool = False  # takes ``StepBatch.late``; else the runner waits for them first
    restored_tokens: int = 0  # prefix tokens restored from snapshots (MLX-managed prefix store)

    @abstractmethod
    def allocate(self, num_blocks: int) -> None:
        """Create the empty cache for vLLM's ``num_blocks`` blocks (again after ``clear``)."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every cached K/V (a failed step leaves them unusable); ``allocate`` follows."""

    @abstractmethod
    def forward(self, step: StepBatch) -> mx.array:
        """Run the step through the model and return its evaluated logits (layout: module doc)."""

    def keep_only(self, req_ids: set[str]) -> None:
        """Free what requests outside ``req_ids`` hold (finished, aborted or preempted)."""
        return

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` (block ids) when the scheduler asks for it."""
        return

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds now."""

    @abstractmethod
    def profile(self, lens: list[int], starts: list[int]) -> int:
        """MLX memory one step of ``lens`` tokens from ``starts`` holds at its peak beyond what
        was allocated before (scratch K/V not counted); the real cache is untouched."""

    def attention_bound(self, lens: list[int], starts: list[int]) -> int:
        """At most the bytes that step's attention holds at once, where the backend bounds it
        (0: attention memory is in what ``profile`` measures and scales with tokens)."""
        return 0

    def warm_up(self, num_tokens: int) -> None:
        """Run the step shapes serving runs first, so their kernels are compiled before requests."""
        self.profile([num_tokens], [0])

    @abstractmethod
    def describe(self) -> str:
        """One line for the startup log."""
