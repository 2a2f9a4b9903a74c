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
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken MLX install must not break vLLM
        logger.debug("vllm-metal not activated: mlx.core does not import (%s)", exc)
        return None
    from vllm_metal import envs

    envs.register_with_vllm()
    return "vllm_metal.platform.MetalPlatform"
