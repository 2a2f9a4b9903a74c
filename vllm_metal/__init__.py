"""vllm-metal: a vLLM platform plugin that runs the model in Apple's MLX.

``register()`` is the ``vllm.platform_plugins`` entry point. It must stay cheap: vLLM calls it
in every process before choosing a platform.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.metal")


def register() -> str | None:
    """Return the platform's qualified name when MLX imports, else None (vLLM then picks another).

    The patches of this phase (``patches.at_register``) come first: the CPU BLAS must be loaded
    before anything imports MLX.
    """
    from vllm_metal import envs, patches

    try:
        cpu_blas = envs.load().cpu_blas
    except envs.MetalConfigError:  # the platform refuses it at startup, naming the fix
        cpu_blas = None
    patches.at_register(cpu_blas)
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken MLX install must not break vLLM
        logger.debug("vllm-metal not activated: mlx.core does not import (%s)", exc)
        return None
    patches.at_activate()
    envs.register_with_vllm()
    return "vllm_metal.platform.MetalPlatform"
