"""Build the mlx-lm model of a GGUF view with the file's weights, quantized blocks kept packed.

Every quantized GGUF tensor becomes MLX affine (``QuantizedLinear`` / ``QuantizedEmbedding``
with group size 32 and the file's bit width), F32/F16/BF16 tensors load dense. The resident
model is therefore about the size of the file, never a dense float copy of it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vllm_metal.gguf.blocks import DENSE, Q, to_affine
from vllm_metal.gguf.names import ARCHITECTURES, mlx_name, permuted_heads, unpermute
from vllm_metal.gguf.reader import GgufFile
from vllm_metal.gguf.view import GgufError, check_loadable, read_pointer


def _dense(raw: np.ndarray, qtype: Q) -> mx.array:
    if qtype == Q.BF16:  # the reader hands BF16 over as its uint16 bit patterns
        return mx.array(np.ascontiguousarray(raw)).view(mx.bfloat16)
    return mx.array(np.ascontiguousarray(raw))


def read_weights(path: Path, config: dict) -> tuple[dict[str, mx.array], dict[str, dict], list[float] | None]:
    """mlx-lm-named weights of the GGUF at ``path``, the per-module quantization they need, and
    llama.cpp's rope frequency factors (``rope_freqs``, Llama 3.x) when the file has them."""
    reader = GgufFile(path)
    check_loadable(reader)
    arch = reader.metadata["general.architecture"]
    weights: dict[str, mx.array] = {}
    quantization: dict[str, dict] = {}
    unknown = []
    rope_freqs = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight" and t.qtype == Q.F32:
            rope_freqs = reader.data(t).astype(float).tolist()
            continue
        name = mlx_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        raw = reader.data(t)
        heads = permuted_heads(t.name, config) if ARCHITECTURES[arch] else None
        if heads is not None:
            raw = unpermute(raw, heads)
        if t.qtype in DENSE:
            weights[name] = _dense(raw, t.qtype)
            continue
        affine = to_affine(t.qtype, raw, t.dims[0])
        module = name.rsplit(".", 1)[0]
        weights[name] = mx.array(affine.weight)
        weights[f"{module}.scales"] = mx.array(affine.scales)
        weights[f"{module}.biases"] = mx.array(affine.biases)
        quantization[module] = {"group_size": affine.group_size, "bits": affine.bits, "mode": "affine"}
    if unknown:
        raise GgufError(f"{path.name}: tensors with no counterpart in mlx-lm's {arch} model: {', '.join(unknown[:8])}")
    return weights, quantization, rope_freqs


def rope_from_factors(factors: list[float], config: dict) -> dict:
    """mlx-lm rope settings applying llama.cpp's per-frequency factors.

    llama.cpp rotates pair i by ``pos * base**(-2i/d) / factors[i]`` (its converter bakes Llama 3
    rope scaling into these factors); mlx-lm's longrope with ``long_factor = factors`` and the
    original context equal to the full one (so no attention rescaling) rotates by exactly that.
    """
    context = int(config["max_position_embeddings"])
    return {"rope_type": "longrope", "long_factor": factors, "short_factor": factors,
            "original_max_position_embeddings": context}


def load_model(view: Path, config_overrides: dict, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """The mlx-lm model (lazy arrays) for a GGUF view directory, and its config."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = Path(read_pointer(view)["gguf"])
    if not path.is_file():
        raise GgufError(f"{view} points at {path}, which no longer exists")
    config = load_config(view) | config_overrides
    weights, quantization, rope_freqs = read_weights(path, config)
    overrides = dict(config_overrides)
    if rope_freqs is not None:
        overrides["rope_scaling"] = rope_from_factors(rope_freqs, config)
    if quantization:
        # mlx-lm quantizes exactly the modules named here (its per-layer quantization config);
        # the top-level group_size/bits are only its required defaults.
        overrides["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine", **quantization}
    model, config = mlx_lm_load_model(view, lazy=True, strict=False, model_config=overrides,
                                      trust_remote_code=trust_remote_code)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise GgufError(f"{path.name}: its tensors do not fit mlx-lm's {config.get('model_type')} model: {exc}") from exc
    return model, config
