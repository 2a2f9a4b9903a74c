"""Tiny random-weight checkpoints, one per architecture of the supported-model matrix.

We cannot download the real models here, but an architecture's code path (layer types, head
layout, rope variant, sliding windows, sinks, MoE routing, tied embeddings) does not depend on
the weights' sizes. Each entry below starts from the real checkpoint's config (named in
``source``) and shrinks only sizes: hidden width, layer count, head counts (keeping the GQA
ratio where it fits), expert counts, windows. Weights come from transformers'
``AutoModelForCausalLM.from_config`` under a fixed seed, saved in fp32 as HF safetensors with the
bundled SmolLM2 tokenizer, so every checkpoint shares one 49152-token vocabulary.

Usage::

    python -m vllm_metal.models.tiny --out DIR [NAME ...]   # build checkpoints, print paths
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB = 49152  # SmolLM2's tokenizer
BOS, EOS = 1, 2
SEED = 0
# Larger than the usual 0.02: a 64-wide random model with std 0.02 puts nearly the same logit on
# every token, so greedy output degenerates into one repeated token and a comparison proves little.
INIT_STD = 0.2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TinySpec:
    """One architecture of the matrix: a real checkpoint's config with sizes shrunk."""

    name: str  # test id
    family: str  # what users call it
    source: str  # the real checkpoint whose config.json this shrinks
    config: dict[str, Any]  # HF config (model_type + fields); sizes shrunk, nothing else changed
    features: tuple[str, ...] = ()  # what the config exercises, for the docs
    # Gemma scales embeddings by sqrt(hidden): at INIT_STD the input embedding swamps the residual
    # stream and, with tied embeddings, greedy decoding just repeats the last token.
    embed_std: float | None = None

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]


def _common(**kw: Any) -> dict[str, Any]:
    base = {"vocab_size": VOCAB, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS,
            "initializer_range": INIT_STD, "max_position_embeddings": 4096}
    return {**base, **kw}


SPECS: tuple[TinySpec, ...] = (
    TinySpec(
        "llama3", "Llama 3", "meta-llama/Llama-3.2-1B-Instruct",
        _common(
            architectures=["LlamaForCausalLM"], model_type="llama",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,  # GQA 4:1 (real 32:8)
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
            max_position_embeddings=131072,
            # llama3 rope; original_max_position_embeddings shrunk (8192 -> 64) so the
            # unscaled, smoothed and scaled frequency bands all fall inside 16-dim heads.
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                          "low_freq_factor": 1.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0,
        ),
        ("GQA 4:1", "llama3 rope scaling", "tied embeddings"),
    ),
    TinySpec(
        "mistral", "Mistral-Small", "mistralai/Mistral-Small-24B-Instruct-2501",
        _common(
            architectures=["MistralForCausalLM"], model_type="mistral",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1,
            head_dim=32,  # decoupled from hidden/heads (16), as in the real 5120/32 != 128
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_theta=100000000.0, sliding_window=None, max_position_embeddings=32768,
        ),
        ("GQA 4:1", "head_dim != hidden/heads", "untied embeddings", "rope theta 1e8"),
    ),
    TinySpec(
        "qwen2", "Qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct",
        _common(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,  # real 14:2
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
            max_window_layers=21, max_position_embeddings=32768,
        ),
        ("q/k/v bias", "GQA 2:1", "tied embeddings"),
    ),
    TinySpec(
        "qwen3", "Qwen3", "Qwen/Qwen3-0.6B",
        _common(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,  # real 16:8
            head_dim=32,  # decoupled, as the real 1024/16 != 128
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_theta=1000000.0, attention_bias=False, max_position_embeddings=40960,
        ),
        ("q/k RMSNorm", "head_dim != hidden/heads", "GQA 2:1", "tied embeddings"),
    ),
    TinySpec(
        "qwen3_moe", "Qwen3 MoE", "Qwen/Qwen3-30B-A3B",
        _common(
            architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1,  # real 32:4
            head_dim=32,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,  # real 128 / top-8
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_theta=1000000.0, max_position_embeddings=40960,
        ),
        ("MoE top-2 of 8, normalized", "q/k RMSNorm", "untied embeddings"),
    ),
    TinySpec(
        "gemma2", "Gemma 2", "google/gemma-2-2b-it",
        _common(
            architectures=["Gemma2ForCausalLM"], model_type="gemma2",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
            max_position_embeddings=8192,
        ),
        ("attention + final logit softcapping", "alternating sliding window 16", "GQA 2:1"),
        embed_std=INIT_STD / 8,
    ),
    TinySpec(
        "gemma3", "Gemma 3", "google/gemma-3-1b-it",
        _common(
            architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=6,  # one 5:1 period: five local layers, then one global
            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
            sliding_window=16,  # real 512
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=None, attn_logit_softcapping=None,
            rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
        ),
        ("5:1 local/global, window 16", "local/global rope theta", "q/k RMSNorm", "MQA"),
        embed_std=INIT_STD / 8,
    ),
    TinySpec(
        "gemma4", "Gemma 4 (no KV sharing)", "transformers Gemma4TextConfig (google/gemma-4 text layout)",
        _common(
            architectures=["Gemma4ForCausalLM"], model_type="gemma4_text",
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=10,  # two 4:1 local/global periods
            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True,
            hidden_activation="gelu_pytorch_tanh", sliding_window=16,
            layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0},
            },
            hidden_size_per_layer_input=4, vocab_size_per_layer_input=VOCAB,  # real 256 per layer
            num_kv_shared_layers=0, use_double_wide_mlp=False, final_logit_softcapping=30.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072,
        ),
        ("4:1 local/global, window 16", "global layers: 2x head_dim, k = v, proportional rope",
         "per-layer embeddings", "final logit softcapping"),
        embed_std=INIT_STD / 8,
    ),
    TinySpec(
        "gemma4_e2b", "Gemma 4 E2B (KV sharing)", "google/gemma-4-E2B-it",
        _common(
            architectures=["Gemma4ForCausalLM"], model_type="gemma4_text",
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=10, num_kv_shared_layers=4,  # real 35 layers, the last 20 share KV
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
            hidden_activation="gelu_pytorch_tanh", sliding_window=16,
            layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0},
            },
            hidden_size_per_layer_input=4, vocab_size_per_layer_input=VOCAB,
            use_double_wide_mlp=True, final_logit_softcapping=30.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072,
        ),
        ("layers share the KV cache of earlier layers", "per-layer embeddings"),
        embed_std=INIT_STD / 8,
    ),
    TinySpec(
        "phi3", "Phi-4-mini (phi3)", "microsoft/Phi-4-mini-instruct",
        _common(
            architectures=["Phi3ForCausalLM"], model_type="phi3",
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,  # real 24:8
            partial_rotary_factor=0.75,
            rope_scaling={"rope_type": "longrope",
                          "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                          "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]},
            original_max_position_embeddings=4096, max_position_embeddings=131072,
            rope_theta=10000.0, sliding_window=262144,
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
        ),
        ("fused qkv / gate_up", "longrope", "partial rotary 0.75", "tied embeddings"),
    ),
    TinySpec(
        "gpt_oss", "GPT-OSS", "openai/gpt-oss-20b",
        _common(
            architectures=["GptOssForCausalLM"], model_type="gpt_oss",
            hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=1, head_dim=16,  # real 64:8
            num_local_experts=4, num_experts_per_tok=2,  # real 32 / top-4
            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
            rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "truncate": False,
                          "original_max_position_embeddings": 4096},
            rope_theta=150000.0, swiglu_limit=7.0, attention_bias=True,
            rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
        ),
        ("attention sinks", "MoE top-2 of 4", "alternating sliding window 16", "yarn rope",
         "q/k/v/o bias", "untied embeddings"),
    ),
    TinySpec(
        "glm4_moe_lite", "GLM-4.7-Flash", "zai-org/GLM-4.7-Flash",
        _common(
            architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite",
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=32,
            v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            n_group=1, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True,
            mlp_layer_types=["dense", "sparse"], rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=202752,
        ),
        ("multi-head latent attention (MLA)", "MoE + shared expert"),
    ),
    TinySpec(
        "qwen3_5", "Qwen3.5 (hybrid, text-only save)", "transformers Qwen3_5TextConfig (Qwen/Qwen3.5 text layout)",
        _common(
            architectures=["Qwen3_5ForCausalLM"], model_type="qwen3_5_text",
            hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                             "partial_rotary_factor": 0.25},
            rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=262144,
        ),
        ("gated-delta linear attention 3:1",),
    ),
    TinySpec(
        "qwen3_next", "Qwen3-Next (hybrid)", "Qwen/Qwen3-Next-80B-A3B-Instruct",
        _common(
            architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
            hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32,
            partial_rotary_factor=0.25,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True, rope_theta=10000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=262144,
        ),
        ("gated-delta linear attention 3:1", "MoE + shared expert"),
    ),
)

# vLLM knows this architecture, mlx-lm has no module for it: must be refused at startup.
UNSUPPORTED = TinySpec(
    "opt", "OPT (no mlx-lm module)", "facebook/opt-125m",
    _common(
        architectures=["OPTForCausalLM"], model_type="opt",
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, do_layer_norm_before=True, max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
)

BY_NAME = {s.name: s for s in (*SPECS, UNSUPPORTED)}


# Held while transformers constructs a model in a process that may do so from several threads.
TRANSFORMERS_LOCK = threading.Lock()


def build(spec: TinySpec, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """Write ``spec``'s checkpoint (fp32 safetensors, config, tokenizer) into ``out``.

    Safe next to other threads using transformers: its ``from_pretrained`` swaps
    ``PreTrainedModel.tie_weights`` for a no-op process-wide while it loads, and a build that ran
    meanwhile (the model tests build in threads while the main thread loads references) once saved
    a gemma4 checkpoint with an untied ``lm_head.weight``, which mlx-lm refused. So tied embeddings
    are tied here explicitly, and constructions take turns under TRANSFORMERS_LOCK (the seeded
    weights also use the global RNG).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer_dir is None:
        from vllm_metal.models.default_model import ensure_default_models

        tokenizer_dir = ensure_default_models().hf
    cfg = dict(spec.config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    out.mkdir(parents=True, exist_ok=True)
    with TRANSFORMERS_LOCK:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if getattr(config, "tie_word_embeddings", False):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        _widen_init(model, spec.embed_std)
        model.save_pretrained(out, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    (out / "tiny_spec.json").write_text(json.dumps(
        {"name": spec.name, "family": spec.family, "source": spec.source, "seed": SEED}, indent=1
    ))
    return out


def _widen_init(model, embed_std: float | None) -> None:
    """Give norms and biases random values too: transformers initialises them to 0/1, which would
    leave q/k-norm scales, Gemma's (1 + w) norms and attention biases unexercised."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        if embed_std is not None:
            emb = model.get_input_embeddings().weight
            emb.copy_(torch.randn(emb.shape, generator=gen) * embed_std)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if "norm" in name or "layernorm" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                else:  # biases, sinks
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(BY_NAME)}")
    args = parser.parse_args(argv)
    for name in args.names or list(BY_NAME):
        print(build(BY_NAME[name], args.out / name))


if __name__ == "__main__":
    main()
