"""Where vllm-metal keeps the files it builds (GGUF views, converted checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "VLLM_METAL_MODEL_CACHE"


def model_cache_dir() -> Path:
    """Cache root: ``$VLLM_METAL_MODEL_CACHE``, else ``~/.cache/vllm-metal/models``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-metal" / "models"
