"""Gemma 2 on the paged path: soft-capped attention scores and alternating sliding windows.

mlx-lm's gemma2 computes attention by hand, since MLX's fused SDPA cannot apply
``attn_logit_softcapping``, and keeps every layer's whole context, where transformers limits the
``sliding_attention`` layers (every other one) to the last ``sliding_window`` positions.
``PagedAttention`` makes mlx-lm's projections and rope and attends through the paged cache with
the soft-cap; ``windows`` gives the sliding layers their window, as transformers does. On the
MLX-managed cache (``VLLM_METAL_USE_PAGED_ATTENTION=0``) mlx-lm's own attention runs, every layer
over the whole context, as in mlx-lm itself.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma2 import Attention

from vllm_metal.attention import PagedLayerCache


class PagedAttention(Attention):
    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        if not isinstance(cache, PagedLayerCache):
            return super().__call__(x, mask, cache)
        b, n, _ = x.shape
        queries = self.q_proj(x).reshape(b, n, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        cache.update_and_fetch(keys, values)
        out = cache.attend(queries, self.scale, None, softcap=self.attn_logit_softcapping)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


def adapt_attention(module: nn.Module) -> bool:
    if type(module) is not Attention:
        return False
    module.__class__ = PagedAttention
    return True


def windows(config: dict) -> list[int | None]:
    """transformers' Gemma 2 layout: ``layer_types``, by default sliding on even layers."""
    n = config["num_hidden_layers"]
    kinds = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    window = config.get("sliding_window")
    return [window if kind == "sliding_attention" and window else None for kind in kinds]
