"""GGUF tensor names -> mlx-lm parameter names, and llama.cpp's q/k row permutation.

llama.cpp's HF->GGUF converter reorders the rows of ``attn_q``/``attn_k`` of llama-architecture
models (its rope pairs element i with i+1, HF's with i+d/2): per head, rows ``[0..d/2) [d/2..d)``
are interleaved. ``unpermute`` is the inverse (transformers' ``_reverse_permute_weights``);
qwen2/qwen3 files are written unpermuted.
"""

from __future__ import annotations

import re

import numpy as np

# architecture -> whether attn_q/attn_k rows are permuted in the file
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def mlx_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    if m := _BLOCK.fullmatch(gguf_name):
        module = _LAYER.get(m[2])
        return None if module is None else f"model.layers.{m[1]}.{module}.{m[3]}"
    base, _, kind = gguf_name.rpartition(".")
    module = _GLOBAL.get(base)
    return None if module is None or kind not in ("weight", "bias") else f"{module}.{kind}"


def permuted_heads(gguf_name: str, config: dict) -> int | None:
    """Heads to un-permute over for a llama-architecture q/k tensor, else None."""
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave; works on raw block rows (rows, row_bytes) too."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
