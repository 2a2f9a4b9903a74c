"""Adapters for mlx-lm models whose attention the paged path cannot route by rebinding mlx-lm's
``scaled_dot_product_attention`` (``vllm_metal.mlx_lm_models``): one module per mlx-lm model
file, named in ``ADAPTERS``, each defining

- ``ATTENTION`` and ``PagedAttention``: the mlx-lm attention class it adapts, and a subclass of
  it whose ``__call__`` attends through a ``PagedLayerCache`` (and runs mlx-lm's own code with
  any other cache), for a model file that computes attention by hand;
- ``windows(config)``: each layer's sliding window (None: the whole context), where the caches
  mlx-lm builds for the model do not say it;
- ``kv_sources(model)``: for a model whose later layers reuse earlier layers' K/V, the layer
  whose K/V each layer attends over (its own index where it holds K/V).

Each defines only what its model needs.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import mlx.nn as nn

ADAPTERS = {
    "mlx_lm.models.gemma2": "vllm_metal.models.gemma2",
    "mlx_lm.models.gemma4_text": "vllm_metal.models.gemma4",
    "mlx_lm.models.gemma4": "vllm_metal.models.gemma4",
}


def adapter_for(model: nn.Module) -> ModuleType | None:
    """The adapter module for ``model``'s mlx-lm model file, if it has one."""
    name = ADAPTERS.get(type(model).__module__)
    return importlib.import_module(name) if name else None
