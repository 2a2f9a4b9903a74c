"""Gemma 4 with KV sharing (E2B, E4B: ``num_kv_shared_layers``) on the paged path.

mlx-lm builds caches only for the layers that compute K/V; each of the last
``num_kv_shared_layers`` layers attends over the K/V of the last earlier layer of its kind
(sliding or full attention), which mlx-lm's model passes along the forward. Such a layer gets
a ``PagedLayerCache`` that reads its source layer's pool and writes nothing, so it holds no KV
memory of its own.
"""

from __future__ import annotations

import mlx.nn as nn


def kv_sources(model: nn.Module) -> list[int]:
    """mlx-lm's ``previous_kvs``: the layer whose K/V each layer attends over."""
    text = getattr(model, "language_model", model)  # gemma4 (multimodal) wraps gemma4_text
    return [int(i) for i in text.model.previous_kvs]
