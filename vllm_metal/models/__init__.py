"""Adapters for mlx-lm models whose attention the paged path cannot route by rebinding mlx-lm's
``scaled_dot_product_attention`` (``vllm_metal.mlx_lm_models``): one module per mlx-lm model
file, named in ``ADAPTERS``, each defining

- ``adapt_attention(module)``: for a model file that computes attention by hand, make ``module``
  (if it is one of its attention modules; returns whether it was) attend through a
  ``PagedLayerCache`` (and run mlx-lm's own code with any other cache);
- ``kv_geometry(attn)``: (query heads, K/V heads, key width, value width) of an attention
  module's pools, where they are not its heads (multi-head latent attention);
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
    "mlx_lm.models.deepseek_v3": "vllm_metal.models.mla",
    "mlx_lm.models.glm4_moe_lite": "vllm_metal.models.mla",
}


def adapter_for(model: nn.Module) -> ModuleType | None:
    """The adapter module for ``model``'s mlx-lm model file, if it has one."""
    name = ADAPTERS.get(type(model).__module__)
    return importlib.import_module(name) if name else None
