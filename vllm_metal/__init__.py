"""vllm-metal: a vLLM platform plugin that runs the model in Apple's MLX.

``register()`` is the ``vllm.platform_plugins`` entry point. It must stay cheap: vLLM calls it
in every process before choosing a platform.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.metal")


def register() -> str | None:
    """Return the platform's qualified name when MLX imports, else None (vLLM then picks another)."""
    _load_cpu_blas()
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken MLX install must not break vLLM
        logger.debug("vllm-metal not activated: mlx.core does not import (%s)", exc)
        return None
    from vllm_metal import envs

    envs.register_with_vllm()
    return "vllm_metal.platform.MetalPlatform"


def _load_cpu_blas() -> None:
    """Before MLX is first imported: an optimized BLAS for its CPU matmuls (compat.load_cpu_blas).
    An invalid VLLM_METAL_CPU_BLAS is left to the platform, which refuses it at startup."""
    from vllm_metal import compat, envs

    try:
        setting = envs.load().cpu_blas
    except envs.MetalConfigError:
        return
    compat.load_cpu_blas(setting)
