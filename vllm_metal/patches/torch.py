"""Patches of torch."""

from __future__ import annotations

import functools


@functools.cache
def accelerator_without_device() -> None:
    """Make ``torch.accelerator``'s memory calls no-ops when torch has no accelerator.

    vLLM calls ``torch.accelerator.empty_cache()`` (e.g. at shutdown and around memory profiling)
    on every non-CPU platform; CPU-only torch raises there because no accelerator exists. MLX owns
    our memory, so there is nothing for torch to free or synchronize.

    Delete when: vLLM guards these calls with ``torch.accelerator.is_available()``, or CPU-only
    torch stops raising in them.
    """
    import torch

    if torch.accelerator.is_available():
        return
    for name in ("empty_cache", "empty_host_cache", "synchronize", "reset_peak_memory_stats"):
        original = getattr(torch.accelerator, name, None)
        if original is not None:
            setattr(torch.accelerator, name, _noop(original))


def _noop(original):
    @functools.wraps(original)
    def noop(*args, **kwargs) -> None:
        return None

    return noop
