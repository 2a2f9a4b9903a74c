"""A tiny random-weight llama with the real SmolLM2 tokenizer, saved as an HF safetensors checkpoint.

The soak and the sampling statistics need thousands of requests; they test the plugin's mechanics
(scheduling, memory, sampling), for which the model's size is irrelevant, and a 2-layer model
decodes far faster than the 135M one on a CPU. The (untied) LM head is scaled up so the next-token
distribution is peaked over a few dozen tokens, with the rest spread thinly: a near-uniform one
over 49,152 tokens would give a chi-square test no power.
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures.tiny import write_llama

LM_HEAD_STD = 0.3  # logit std ~2.4: at T=0.8 the top token has p~0.29, 13 tokens hold ~53%


def tiny_config(vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab_size,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def write_tiny_llama(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Random weights (fixed seed) with the LM head scaled up; tokenizer files copied in."""
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    return write_llama(dest, tiny_config(vocab), tokenizer_dir, seed=seed, lm_head_std=LM_HEAD_STD)


def first_token_probs(model_dir: Path, prompt_ids: list[int], temperature: float):
    """HF transformers' softmax(logits / T) of the next token after ``prompt_ids`` (a torch vector)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)
