"""Multi-head latent attention (DeepSeek-V3, GLM-4.7-Flash) on the paged path.

mlx-lm's MLA layers cache, per token, the normed compressed latent (``kv_lora_rank`` wide) and
the rope key (``qk_rope_head_dim``, one head), and for a decode token attend in the latent space:
``scale * (embed_q(q_nope) . latent + q_pe . k_pe)``, the weights applied to the latent, the
result lifted by ``unembed_out``. That is ordinary attention with one K/V head whose key is
``latent ‖ k_pe`` and whose value is ``latent``, against the query ``embed_q(q_nope) ‖ q_pe``; the
packed step makes every token such a one-row query, so ``PagedAttention`` writes those keys and
values to the pools and attends through the paged cache like any other layer.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.deepseek_v3 import DeepseekV3Attention
from mlx_lm.models.glm4_moe_lite import Glm4MoeLiteAttention

from vllm_metal.attention import PagedLayerCache

ATTENTION = (DeepseekV3Attention, Glm4MoeLiteAttention)


class _Paged:
    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        if not isinstance(cache, PagedLayerCache):
            return super().__call__(x, mask, cache)
        b, n, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, n, self.num_heads, self.q_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)
        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        latent = mx.expand_dims(self.kv_a_layernorm(latent), axis=1)  # (B, 1, L, rank)
        k_pe = self.rope(k_pe.reshape(b, n, 1, self.qk_rope_head_dim).transpose(0, 2, 1, 3), cache.offset)
        q_pe = self.rope(q_pe, cache.offset)
        cache.update_and_fetch(mx.concatenate([latent, k_pe], axis=-1), latent)
        queries = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)
        out = self.unembed_out(cache.attend(queries, self.scale, None))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


@functools.cache
def _paged_class(cls: type) -> type:
    return type(f"Paged{cls.__name__}", (_Paged, cls), {})


def adapt_attention(module: nn.Module) -> bool:
    if type(module) not in ATTENTION:
        return False
    module.__class__ = _paged_class(type(module))
    return True


def kv_geometry(attn: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, K/V heads, key width, value width) of the pools: one head, the latent and
    the rope key side by side as the key, the latent as the value."""
    return attn.num_heads, 1, attn.kv_lora_rank + attn.qk_rope_head_dim, attn.kv_lora_rank
