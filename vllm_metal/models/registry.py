"""Which architectures the plugin can build, decided from the checkpoint's config before loading.

vLLM accepts any architecture in its own registry, and through its Transformers-backend fallback
any causal LM transformers knows, but the model itself is built by mlx-lm, which has its own
set (one module per ``model_type``). Checking here turns "mlx-lm has no such module" into a
startup error that names the architecture and lists what mlx-lm can run, instead of a bare
``Model type X not supported.`` from deep inside mlx-lm.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from vllm_metal.attention import UnsupportedModelError

# transformers' text-only saves of multimodal families; mlx-lm builds them with the family's
# module, which also accepts a flat (text-only) config.
TEXT_ONLY_ALIASES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
# mlx_lm.models modules that hold shared layers, not a model.
_HELPER_MODULES = {"base", "cache", "rope_utils", "activations", "switch_layers", "pipeline", "mla",
                   "ssm", "gated_delta", "bitlinear_layers"}


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
        if path.stem in _HELPER_MODULES or path.stem.startswith("_"):
            continue
        if re.search(r"^class Model\(|^from \S+ import .*\bModel\b", path.read_text(), re.M):
            names.add(path.stem)
    return tuple(sorted(names))


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
    if module and module not in _HELPER_MODULES and importlib.util.find_spec(
        f"mlx_lm.models.{module}"
    ) is not None:
        return module
    archs = ", ".join(config.get("architectures") or []) or "?"
    version = importlib.metadata.version("mlx-lm")
    raise UnsupportedModelError(
        f"Architecture {archs} (model_type {config.get('model_type')!r}) is not supported: "
        f"mlx-lm {version} has no implementation of it, and vllm-metal runs every model through "
        f"mlx-lm. Supported model types: {', '.join(supported_model_types())}."
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


def check_runnable(config: dict) -> None:
    """Refuse from config.json alone what the loader would refuse only after loading weights.

    Runs in the API server before the engine starts (see ``vllm_metal.preflight``): no mlx-lm
    module, layers with recurrent state or multi-head latent attention, attention that does not
    go through mlx-lm's ``scaled_dot_product_attention``. It builds mlx-lm's model without
    weights (MLX arrays are lazy, so nothing is allocated); a model that fails to build here is
    left for the loader, which reports it with the weights in hand.
    """
    from vllm_metal.attention import layer_specs

    module = check_supported(config)
    if config.get("model_file"):
        return
    try:
        arch = importlib.import_module(f"mlx_lm.models.{module}")
        full = {**config, **prepare_mlx_lm(config)}
        model = arch.Model(arch.ModelArgs.from_dict(full))
    except Exception:  # noqa: BLE001 - the loader reports build errors with the weights in hand
        return
    layer_specs(model)
    if not uses_mlx_lm_sdpa(model):
        raise UnsupportedModelError(
            f"{type(model).__module__} computes attention without mlx-lm's "
            "scaled_dot_product_attention, so it cannot run on the paged KV path."
        )


def uses_mlx_lm_sdpa(model) -> bool:
    """Whether a module defining one of the model's classes calls mlx-lm's shared SDPA (the
    function the paged path replaces; see ``attention.patch_model_attention``)."""
    import sys

    from mlx_lm.models import base

    for name in {type(m).__module__ for _, m in model.named_modules()}:
        fn = getattr(sys.modules.get(name), "scaled_dot_product_attention", None)
        if fn is base.scaled_dot_product_attention or getattr(fn, "__vllm_metal_paged__", False):
            return True
    return False
