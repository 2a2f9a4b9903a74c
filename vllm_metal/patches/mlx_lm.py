"""Patches of mlx-lm: configs and checkpoints it reads differently from transformers."""

from __future__ import annotations

import functools
import sys


def config_overrides(config: dict) -> dict:
    """Config keys mlx-lm needs that a transformers-5 checkpoint only stores elsewhere.

    transformers 5 writes RoPE settings only as ``rope_parameters`` (``rope_theta``,
    ``rope_type`` and scaling factors; per layer type for Gemma 3) and renames some fields when
    it saves (``num_experts`` -> ``num_local_experts``, ``sliding_window_pattern`` ->
    ``_sliding_window_pattern``, Gemma 4's ``global_head_dim`` -> ``per_layer_config``, Granite
    4.0 hybrids' ``layer_types`` ``mamba``/``attention`` -> ``linear_attention``/``full_attention``).
    mlx-lm 0.32.2 reads the older top-level keys and silently falls back to its defaults (e.g.
    theta 10000), which changes every logit, or fails to build the model. This returns the
    values copied up, for the older keys that are absent; the loader passes them to mlx-lm.

    Delete when: mlx-lm reads transformers-5 configs itself.
    """
    overrides: dict = {}
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3)
            local = params.get("sliding_attention") or {}
            if "rope_local_base_freq" not in config and "rope_theta" in local:
                overrides["rope_local_base_freq"] = local["rope_theta"]
            params = params["full_attention"]
        if "rope_theta" not in config and "rope_theta" in params:
            overrides["rope_theta"] = params["rope_theta"]
        if "partial_rotary_factor" not in config and "partial_rotary_factor" in params:
            overrides["partial_rotary_factor"] = params["partial_rotary_factor"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if "rope_scaling" not in config and rope_type not in (None, "default"):
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
            # Some mlx-lm models (phi3, qwen2_moe, deepseek, ...) index rope_scaling["type"].
            overrides["rope_scaling"] = {**scaling, "type": rope_type}
    renamed = {"num_experts": "num_local_experts", "sliding_window_pattern": "_sliding_window_pattern"}
    for old, new in renamed.items():
        if old not in config and new in config:
            overrides[old] = config[new]
    # Gemma 4: the global layers' head layout moves into per_layer_config.
    per_layer = config.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        first = next(iter(per_layer.values()))
        for old, new in (("global_head_dim", "head_dim"), ("num_global_key_value_heads", "num_key_value_heads")):
            if old not in config and new in first:
                overrides[old] = first[new]
    # Granite 4.0 hybrids: transformers 5 writes layer_types as linear_attention/full_attention,
    # mlx-lm's granitemoehybrid builds only "mamba" and "attention" layers.
    kinds = config.get("layer_types")
    if config.get("model_type") == "granitemoehybrid" and isinstance(kinds, list) and \
            {"linear_attention", "full_attention"} & set(kinds):
        names = {"linear_attention": "mamba", "full_attention": "attention"}
        overrides["layer_types"] = [names.get(k, k) for k in kinds]
    return overrides


@functools.cache
def gpt_oss_dense_experts() -> None:
    """mlx-lm's gpt_oss ``sanitize`` reads the original MXFP4 checkpoint and mlx-community's
    converted one, but not transformers' dense layout (bf16/fp32 re-uploads, ``save_pretrained``):
    ``experts.gate_up_proj`` (E, H, 2I) with gate/up interleaved and ``experts.down_proj``
    (E, I, H), both applied as ``x @ W``. It renames them without ``.weight`` and loading fails
    with "parameters not in model". We convert them to mlx-lm's (E, out, in) expert weights.

    Delete when: mlx-lm's gpt_oss sanitize handles dense transformers checkpoints.
    """
    from mlx_lm.models import gpt_oss

    original = gpt_oss.Model.sanitize

    @functools.wraps(original)
    def sanitize(self, weights):
        converted = {}
        for key, value in weights.items():
            if key.endswith("experts.gate_up_proj") and value.ndim == 3:
                converted[key.replace("gate_up_proj", "gate_proj.weight")] = value[..., ::2].swapaxes(-1, -2)
                converted[key.replace("gate_up_proj", "up_proj.weight")] = value[..., 1::2].swapaxes(-1, -2)
            elif key.endswith("experts.gate_up_proj_bias"):
                converted[key.replace("gate_up_proj_bias", "gate_proj.bias")] = value[..., ::2]
                converted[key.replace("gate_up_proj_bias", "up_proj.bias")] = value[..., 1::2]
            elif key.endswith("experts.down_proj") and value.ndim == 3:
                converted[key + ".weight"] = value.swapaxes(-1, -2)
            elif key.endswith("experts.down_proj_bias"):
                converted[key.replace("down_proj_bias", "down_proj.bias")] = value
            else:
                converted[key] = value
        return original(self, converted)

    gpt_oss.Model.sanitize = sanitize


@functools.cache
def yarn_truncate_flag() -> None:
    """transformers' YaRN takes ``truncate`` (default True: floor/ceil the correction range) and
    GPT-OSS sets it to False; mlx-lm's ``YarnRoPE`` always truncates, so every rotary frequency
    inside the ramp differs from transformers (and vLLM) for gpt-oss: logits of a tiny random
    gpt-oss move by ~0.3. When the config says ``truncate: false`` we recompute the frequencies
    without truncation.

    Delete when: mlx-lm's YarnRoPE honours ``truncate``.
    """
    import math

    import mlx.core as mx
    from mlx_lm.models import rope_utils

    original = rope_utils.initialize_rope

    @functools.wraps(original)
    def initialize_rope(dims, base, traditional, scaling_config=None, max_position_embeddings=None):
        rope = original(dims, base, traditional, scaling_config, max_position_embeddings)
        if isinstance(rope, rope_utils.YarnRoPE) and scaling_config.get("truncate") is False:
            orig = scaling_config.get("original_max_position_embeddings", 4096)

            def correction_dim(rotations: float) -> float:
                return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low = max(correction_dim(scaling_config.get("beta_fast", 32)), 0)
            high = min(correction_dim(scaling_config.get("beta_slow", 1)), dims - 1)
            ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
            extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
            inter = scaling_config["factor"] * extra
            rope._freqs = (inter * extra) / (inter * (1 - ramp) + extra * ramp)
        return rope

    rope_utils.initialize_rope = initialize_rope
    for name, module in list(sys.modules.items()):  # model modules imported before the patch
        if name.startswith("mlx_lm.models.") and getattr(module, "initialize_rope", None) is original:
            module.initialize_rope = initialize_rope
