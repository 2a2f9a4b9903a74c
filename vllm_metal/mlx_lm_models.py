"""What the plugin knows about, and does to, an mlx-lm model.

vLLM accepts any architecture in its own registry (and, through its Transformers fallback, any
causal LM transformers knows), but the model itself is built by mlx-lm, one module per
``model_type``. This module decides from a checkpoint's config whether mlx-lm can build it and
whether the paged KV path can hold its layers, and adapts a built model for the runner: reads
each layer's KV geometry, routes its attention to the paged cache and lets the LM head run only
on the rows that need logits.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import QuantizedAllToShardedLinear, QuantizedShardedToAllLinear

from vllm_metal import quant_kernel
from vllm_metal.attention import LayerSpec, PagedLayerCache
from vllm_metal.models import adapter_for
from vllm_metal.recurrent import RECURRENT_MODULES, StateArray, adapt_recurrent, probe_state, recurrent_module

# mlx_lm.models modules that hold shared layers, not a model.
HELPER_MODULES = frozenset({"base", "cache", "rope_utils", "activations", "switch_layers", "pipeline", "mla",
                            "ssm", "gated_delta", "bitlinear_layers"})


class UnsupportedModelError(ValueError):
    """The model cannot run on the paged path; the message says why and what is supported."""


# transformers' text-only saves of multimodal families; mlx-lm builds them with the family's
# module, which also accepts a flat (text-only) config.
TEXT_ONLY_ALIASES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}


@functools.cache
def supported_model_types() -> tuple[str, ...]:
    """``model_type`` values mlx-lm can build: its model modules plus its aliases (mistral -> llama).

    A module counts when it defines or re-exports a ``Model`` class; we read the source instead
    of importing ~140 modules.
    """
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    names = set(MODEL_REMAPPING)
    for path in Path(mlx_lm.models.__path__[0]).glob("*.py"):
        if path.stem in HELPER_MODULES or path.stem.startswith("_"):
            continue
        if re.search(r"^class Model\(|^from \S+ import .*\bModel\b", path.read_text(), re.M):
            names.add(path.stem)
    return tuple(sorted(names))


def supported_hint() -> str:
    return f"Supported model types: {', '.join(supported_model_types())}."


def mlx_lm_module(config: dict) -> str:
    """The ``mlx_lm.models`` module mlx-lm would build ``config`` with (its own remapping rules)."""
    from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    for arch in architectures:
        remapped = MODEL_ARCHITECTURE_REMAPPING.get((model_type, arch))
        if remapped is not None:
            return remapped
    model_type = TEXT_ONLY_ALIASES.get(model_type, model_type)
    return MODEL_REMAPPING.get(model_type, model_type)


def check_supported(config: dict) -> str:
    """Return the mlx-lm module for ``config``; raise UnsupportedModelError when mlx-lm has none.

    A config with ``model_file`` brings its own module (mlx-lm's trust_remote_code path), so it
    is not checked here.
    """
    module = mlx_lm_module(config)
    if config.get("model_file"):
        return module
    if module and module not in HELPER_MODULES and importlib.util.find_spec(
        f"mlx_lm.models.{module}"
    ) is not None:
        return module
    archs = ", ".join(config.get("architectures") or []) or "?"
    version = importlib.metadata.version("mlx-lm")
    raise UnsupportedModelError(
        f"Architecture {archs} (model_type {config.get('model_type')!r}) is not supported: "
        f"mlx-lm {version} has no implementation of it, and vllm-metal runs every model through "
        f"mlx-lm. {supported_hint()}"
    )


def prepare_mlx_lm(config: dict) -> dict:
    """Everything mlx-lm needs before it builds ``config``'s model; called by the loader.

    Refuses architectures mlx-lm lacks (``check_supported``), installs the loading shims of
    ``patches.at_model_load`` and returns the config overrides for ``mlx_lm.utils.load_model``.
    """
    from vllm_metal import patches

    check_supported(config)
    patches.at_model_load()
    overrides = patches.mlx_lm.config_overrides(config)
    if config.get("model_type") in TEXT_ONLY_ALIASES:
        overrides["model_type"] = TEXT_ONLY_ALIASES[config["model_type"]]
    return overrides


def check_runnable(config: dict, tensor_parallel_size: int = 1) -> None:
    """Refuse from config.json alone what the loader would refuse only after loading weights.

    Runs in the API server before the engine starts (see ``vllm_metal.preflight``): no mlx-lm
    module, layers with custom cache state or multi-head latent attention it does not implement,
    attention that does not go through mlx-lm's ``scaled_dot_product_attention``, a model that does
    not split ``tensor_parallel_size`` ways (``distributed.shard_problem``). It builds mlx-lm's model without
    weights (MLX arrays are lazy, so nothing is allocated); a model that fails to build here is
    left for the loader, which reports it with the weights in hand.
    """
    module = check_supported(config)
    if config.get("model_file"):
        return
    try:
        arch = importlib.import_module(f"mlx_lm.models.{module}")
        full = {**config, **prepare_mlx_lm(config)}
        model = arch.Model(arch.ModelArgs.from_dict(full))
    except Exception:  # noqa: BLE001 - the loader reports build errors with the weights in hand
        return
    specs = layer_specs(model)
    if not routes_attention(model):
        raise _own_attention(model)
    if tensor_parallel_size > 1:
        from vllm_metal.distributed import shard_problem

        problem = shard_problem(model, specs, tensor_parallel_size)
        if problem is not None:
            raise UnsupportedModelError(f"--tensor-parallel-size {tensor_parallel_size}: {problem}.")


def routes_attention(model: nn.Module) -> bool:
    """Whether ``patch_model_attention`` can route the model's attention to the paged cache: a
    module defining one of its classes calls mlx-lm's shared SDPA, or ``vllm_metal.models`` has
    an adapter for its model file."""
    return bool(_sdpa_modules(model)) or hasattr(adapter_for(model), "adapt_attention")


def _sdpa_modules(model: nn.Module) -> list:
    """The modules defining the model's classes that import mlx-lm's shared
    ``scaled_dot_product_attention`` (or already hold our routed one)."""
    from mlx_lm.models import base

    modules = []
    for name in {type(m).__module__ for _, m in model.named_modules()}:
        fn = getattr(sys.modules.get(name), "scaled_dot_product_attention", None)
        if fn is base.scaled_dot_product_attention or getattr(fn, "__vllm_metal_paged__", False):
            modules.append(sys.modules[name])
    return modules


def _paged_sdpa(original):
    def sdpa(queries, keys, values, cache, scale, mask, sinks=None, **kwargs):
        if isinstance(cache, PagedLayerCache):
            return cache.attend(queries, scale, sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks, **kwargs)

    sdpa.__vllm_metal_paged__ = True
    return sdpa


def patch_model_attention(model: nn.Module) -> int:
    """Route the model's ``scaled_dot_product_attention`` calls to the paged cache.

    mlx-lm model files import ``scaled_dot_product_attention`` from ``mlx_lm.models.base``;
    we rebind that name in each module that defines a class of this model. A model file with an
    adapter in ``vllm_metal.models`` (attention computed by hand) has its attention modules
    adapted by the adapter instead. Returns how many modules route it (0 means
    the model computes attention some other way).
    """
    adapter = adapter_for(model)
    if hasattr(adapter, "adapt_attention"):
        return sum(adapter.adapt_attention(m) for _, m in model.named_modules())
    modules = _sdpa_modules(model)
    for module in modules:
        fn = module.scaled_dot_product_attention
        if not getattr(fn, "__vllm_metal_paged__", False):
            module.scaled_dot_product_attention = _paged_sdpa(fn)
    return len(modules)


def layer_specs(model: nn.Module, config: dict | None = None) -> list[LayerSpec]:
    """Per-layer KV geometry, from the caches mlx-lm would build for this model, with what an
    adapter (``vllm_metal.models``) adds where mlx-lm's caches do not say it: sliding windows
    read from ``config``, and the earlier layer whose K/V each KV-sharing layer reads (mlx-lm
    builds caches for the layers that hold K/V only)."""
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

    caches = make_prompt_cache(model)
    layers = getattr(model, "layers", None)
    adapter = adapter_for(model)
    sources = adapter.kv_sources(model) if hasattr(adapter, "kv_sources") else None
    if layers is None or (len(layers) != len(caches) and (sources is None or len(sources) != len(layers))):
        raise UnsupportedModelError(
            f"{type(model).__module__}: cannot map its {len(caches)} caches to layers."
        )
    specs = []
    for i, (layer, cache) in enumerate(zip(layers[: len(caches)], caches, strict=True)):
        if isinstance(cache, ArraysCache):
            specs.append(LayerSpec.recurrent(_recurrent_state(model, i, layer, cache)))
            continue
        if type(cache) not in (KVCache, RotatingKVCache):
            raise UnsupportedModelError(
                f"{type(model).__module__}: layer {i} keeps a {type(cache).__name__} "
                "(custom cache state), which the paged KV path cannot hold."
            )
        attn = _attention_module(layer)
        window = cache.max_size if isinstance(cache, RotatingKVCache) else None
        if hasattr(adapter, "kv_geometry"):
            specs.append(LayerSpec(*(int(x) for x in adapter.kv_geometry(attn)), window))
            continue
        if _first_attr(attn, "kv_lora_rank") is not None:
            raise UnsupportedModelError(
                f"{type(model).__module__}: multi-head latent attention (MLA) caches a compressed "
                "latent and passes the rope scores as the attention mask, which the paged KV path "
                "implements for deepseek_v3 and glm4_moe_lite only."
            )
        q_heads = _first_attr(attn, "n_heads", "num_heads", "num_attention_heads")
        kv_heads = _first_attr(attn, "n_kv_heads", "num_key_value_heads", "num_kv_heads") or q_heads
        head_dim = _first_attr(attn, "head_dim") or _rows_per_head(attn, "k_proj", kv_heads)
        if q_heads is None or head_dim is None:
            raise UnsupportedModelError(
                f"{type(model).__module__}: cannot read the head layout of layer {i}'s attention."
            )
        v_head_dim = _first_attr(attn, "v_head_dim") or head_dim
        specs.append(LayerSpec(int(q_heads), int(kv_heads), int(head_dim), int(v_head_dim), window))
    for j in range(len(caches), len(layers)):  # KV-sharing layers: their source's geometry
        specs.append(replace(specs[sources[j]], kv_source=sources[j]))
    if config is not None and hasattr(adapter, "windows"):
        specs = [replace(s, window=w) for s, w in zip(specs, adapter.windows(config), strict=True)]
    return specs


def _recurrent_state(model: nn.Module, i: int, layer: nn.Module, cache) -> tuple[StateArray, ...]:
    """One request's state arrays in recurrent layer ``i`` (``recurrent.probe_state``), at the
    width of the layer's input norm and the dtype of its weights."""
    norm = next((getattr(layer, n) for n in ("input_layernorm", "operator_norm", "norm")
                 if hasattr(getattr(layer, n, None), "weight")), None)
    if recurrent_module(layer) is None or norm is None:
        raise UnsupportedModelError(
            f"{type(model).__module__}: layer {i} keeps a {type(cache).__name__} (recurrent state), but "
            f"its recurrent module ({', '.join(RECURRENT_MODULES)}) or input norm is not where the paged "
            "path looks for it.")
    return probe_state(layer, cache, norm.weight.shape[-1], norm.weight.dtype)


def _rows_per_head(attn: nn.Module, proj: str, heads: int | None) -> int | None:
    """Head width from a projection's output rows (mlx-lm's qwen2/qwen3 keep head_dim local)."""
    weight = getattr(getattr(attn, proj, None), "weight", None)
    return weight.shape[0] // heads if weight is not None and heads else None


def _first_attr(obj, *names: str):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _attention_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attention", "attn", "mixer"):
        attn = getattr(layer, name, None)
        if attn is not None:
            return attn
    raise UnsupportedModelError(f"cannot find the attention module of {type(layer).__name__}.")


class RowSelect(nn.Module):
    """Wraps a model's final norm: applies it only to ``rows`` of the packed hidden states.

    With ``keep`` set, the normed rows are also kept in ``kept``: the final hidden states a
    pooling runner wants (the LM head after it is recorded but never evaluated)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inner = norm
        self.rows: mx.array | None = None
        self.keep = False
        self.kept: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        # Packed (T, 1, H) batches select along axis 0; one (1, n, H) sequence along axis 1.
        if self.rows is not None:
            x = x[self.rows] if x.shape[0] > 1 or x.shape[1] == 1 else x[:, self.rows]
        out = self.inner(x)
        if self.keep:
            self.kept = out
        return out


def _rows_as_one_matrix(x: mx.array, product) -> mx.array:
    """``product(x)`` with a packed step's ``(T, 1, K)`` rows passed as one ``(1, T, K)`` matrix."""
    if x.ndim == 3 and x.shape[1] == 1 and x.shape[0] > 1:
        return product(x.reshape(1, x.shape[0], x.shape[2])).reshape(x.shape[0], 1, -1)
    return product(x)


class PackedQuantizedLinear(nn.QuantizedLinear):
    """A ``QuantizedLinear`` that takes a packed step's tokens as one matrix.

    The packed forward gives every layer ``(T, 1, K)`` activations (one row per token, so each
    token keeps its own position). A plain matmul folds that batch into one ``(T, K)`` product,
    but ``mx.quantized_matmul`` runs T matrix-vector products that each read the whole weight
    (MLX CUDA, K=4096, N=14336, 4-bit: 1.06 ms at T=32 against 0.16 ms for ``(1, T, K)``). The
    reshape is free; each row's product is the same.

    From ``dequantize_rows`` rows on (0: never; ``dequantize_large_products`` sets it), the
    weight is dequantized to the activations' dtype and multiplied as a dense matrix: MLX CUDA's
    quantized kernels cost 5.5x the bf16 GEMM at 512 rows (prefill chunks), and the dequantized
    copy is one layer's, freed after its product. Below that, with ``kernel`` set
    (``use_quantized_kernel``), bf16/fp16 products run ``quant_kernel.q4_matmul`` (CUDA).
    """

    dequantize_rows = 0
    kernel = False

    def __call__(self, x: mx.array) -> mx.array:
        if self.dequantize_rows and x.size // x.shape[-1] >= self.dequantize_rows:
            return self.dense_product(x)
        if self.kernel and quant_kernel.takes(x):
            y = quant_kernel.q4_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size)
            return y + self["bias"] if "bias" in self else y
        return _rows_as_one_matrix(x, super().__call__)

    def dense_product(self, x: mx.array) -> mx.array:
        """``x`` times the dequantized weight (plus the bias): the layer's product up to rounding."""
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                          bits=self.bits, mode=self.mode)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


class PackedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A ``QuantizedEmbedding`` whose tied-head product (``as_linear``) takes a packed step's rows
    as one matrix, or runs ``quant_kernel.q4_matmul`` with ``kernel`` set (see ``PackedQuantizedLinear``)."""

    kernel = False

    def as_linear(self, x: mx.array) -> mx.array:
        if self.kernel and quant_kernel.takes(x):
            return quant_kernel.q4_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size)
        return _rows_as_one_matrix(x, super().as_linear)


class PackedQuantizedAllToShardedLinear(QuantizedAllToShardedLinear):
    """A tensor-parallel rank's column shard of a quantized layer, packed (``PackedQuantizedLinear``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return _rows_as_one_matrix(x, super().__call__)


class PackedQuantizedShardedToAllLinear(QuantizedShardedToAllLinear):
    """A tensor-parallel rank's row shard of a quantized layer, packed (``PackedQuantizedLinear``)."""

    def __call__(self, x: mx.array) -> mx.array:
        return _rows_as_one_matrix(x, super().__call__)


PACKED_QUANTIZED = {nn.QuantizedLinear: PackedQuantizedLinear, nn.QuantizedEmbedding: PackedQuantizedEmbedding,
                    QuantizedAllToShardedLinear: PackedQuantizedAllToShardedLinear,
                    QuantizedShardedToAllLinear: PackedQuantizedShardedToAllLinear}


def fold_quantized_rows(model: nn.Module) -> int:
    """Make every quantized linear layer and quantized embedding of ``model`` (tensor-parallel
    shards included) a packed one (same parameters, same module tree); returns how many were
    changed."""
    changed = 0
    for _, module in model.named_modules():
        packed = PACKED_QUANTIZED.get(type(module))
        if packed is not None:
            module.__class__ = packed
            changed += 1
    return changed


CUDA_DEQUANTIZE_ROWS = 256  # VLLM_METAL_DEQUANTIZE_ROWS=auto on CUDA (crossover with the 4-bit kernel: 128-192 rows)


def dequantize_large_products(model: nn.Module, rows: int) -> int:
    """Let every packed quantized linear layer of ``model`` dequantize its weight for products of
    at least ``rows`` rows (0: never; ``PackedQuantizedLinear``); returns how many layers."""
    layers = [m for _, m in model.named_modules() if isinstance(m, PackedQuantizedLinear)]
    for layer in layers:
        layer.dequantize_rows = rows
    return len(layers)


def use_quantized_kernel(model: nn.Module) -> int:
    """Let every packed quantized layer of ``model`` whose weight ``quant_kernel`` takes run its
    products there (``PackedQuantizedLinear``); returns how many layers."""
    taken = 0
    for _, m in model.named_modules():
        if isinstance(m, (PackedQuantizedLinear, PackedQuantizedEmbedding)):
            try:
                quant_kernel.check(m["weight"].shape, m.group_size, m.bits, getattr(m, "mode", "affine"))
            except quant_kernel.QuantizedKernelUnsupported:
                continue
            m.kernel = True
            taken += 1
    return taken


def _final_norm_owner(model: nn.Module) -> tuple[nn.Module, str] | None:
    for path in ("model", "language_model.model", "transformer", "backbone"):
        owner = model
        for part in path.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if owner is None:
            continue
        for name in ("norm", "ln_f", "final_layernorm", "norm_f"):
            if isinstance(getattr(owner, name, None), nn.Module):
                return owner, name
    return None


def adapt(model: nn.Module, config: dict) -> tuple[list[LayerSpec], RowSelect | None]:
    """Read the model's per-layer KV geometry, route its attention to the paged cache, let its
    quantized layers take a packed step as one matrix and wrap its final norm in a ``RowSelect``;
    refuse a model whose attention cannot be routed."""
    specs = layer_specs(model, config)
    if patch_model_attention(model) == 0:
        raise _own_attention(model)
    for layer, spec in zip(model.layers, specs, strict=False):
        if spec.state is not None:
            adapt_recurrent(recurrent_module(layer))
    fold_quantized_rows(model)
    owner = _final_norm_owner(model)
    if owner is None:
        return specs, None
    row_select = RowSelect(getattr(owner[0], owner[1]))
    setattr(owner[0], owner[1], row_select)
    return specs, row_select


def _own_attention(model: nn.Module) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(model).__module__} computes attention without mlx-lm's "
        "scaled_dot_product_attention, so it cannot run on the paged KV path."
    )
