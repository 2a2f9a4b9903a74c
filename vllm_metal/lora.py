"""LoRA adapters (``--enable-lora``): several adapters, and the base model, in one packed step.

vLLM owns the adapters' names, ids and per-request selection (``--lora-modules name=path``, a
request's ``model``), and its scheduler keeps at most ``--max-loras`` adapters in a step. Here an
adapter is read into MLX (mlx-lm's format, ``adapters.safetensors`` with ``lora_a``/``lora_b`` and
``lora_parameters.scale``, or PEFT's, ``adapter_model.safetensors`` with ``lora_A``/``lora_B`` and
``lora_alpha / r``) and every linear layer it adapts is wrapped once in a ``MultiLoRALinear``:
``y = base(x) + sum over the step's adapters of mask_a * scale_a * (x @ A_a) @ B_a``, where
``mask_a`` marks the packed rows of the requests using adapter ``a``. The masks are the step's
context (``LoRAs.step``), set by the runner around the forward and cleared after it. The same sum is
what mlx-lm's ``LoRALinear`` computes for one adapter.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class LoRAError(ValueError):
    pass


def read_adapter(path: Path, max_rank: int) -> tuple[dict[str, tuple[mx.array, mx.array]], float]:
    """Module path -> ``(A (in, r), B (r, out))``, and the scale, of the adapter at ``path``."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAError(f"LoRA adapter {path}: no adapter_config.json (mlx-lm's or PEFT's adapter layout)")
    config = json.loads(config_file.read_text())
    pairs: dict[str, dict[str, mx.array]] = {}
    if "lora_parameters" in config:  # mlx-lm
        if config.get("fine_tune_type", "lora") != "lora":
            raise LoRAError(f"LoRA adapter {path}: fine_tune_type {config['fine_tune_type']!r}; only 'lora'")
        scale = float(config["lora_parameters"].get("scale", 20.0))
        for name, w in mx.load(str(path / "adapters.safetensors")).items():
            module, _, leaf = name.rpartition(".")
            if leaf not in ("lora_a", "lora_b"):
                raise LoRAError(f"LoRA adapter {path}: {name} is not a lora_a/lora_b weight")
            pairs.setdefault(module, {})[leaf[-1]] = w
    elif "r" in config and "lora_alpha" in config:  # PEFT
        if config.get("use_dora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
            raise LoRAError(f"LoRA adapter {path}: DoRA, modules_to_save and bias adapters are not supported")
        r = int(config["r"])
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        for name, w in mx.load(str(path / "adapter_model.safetensors")).items():
            module, _, leaf = name.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
            if leaf not in ("lora_A", "lora_B"):
                raise LoRAError(f"LoRA adapter {path}: {name} is not a lora_A/lora_B weight")
            pairs.setdefault(module, {})[leaf[-1].lower()] = w.T  # PEFT stores (r, in) and (out, r)
    else:
        raise LoRAError(f"LoRA adapter {path}: adapter_config.json is neither mlx-lm's (lora_parameters) "
                        "nor PEFT's (r, lora_alpha)")
    weights: dict[str, tuple[mx.array, mx.array]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise LoRAError(f"LoRA adapter {path}: {module} lacks its A or B matrix")
        if ab["a"].shape[1] > max_rank:
            raise LoRAError(f"LoRA adapter {path}: rank {ab['a'].shape[1]} exceeds --max-lora-rank {max_rank}")
        weights[module] = (ab["a"], ab["b"])
    return weights, scale


class MultiLoRALinear(nn.Module):
    """A linear layer plus the low-rank updates of every adapter loaded for it, each applied to
    the rows the step's context marks for it."""

    def __init__(self, base: nn.Module, loras: LoRAs):
        super().__init__()
        self.base = base
        self._loras = loras  # not a child module: its arrays are not this layer's parameters
        self._adapters: dict[int, tuple[mx.array, mx.array, float]] = {}

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for lora_id, mask in self._loras.masks.items():
            if (adapter := self._adapters.get(lora_id)) is not None:
                a, b, scale = adapter
                y = y + (mask * scale * ((x @ a) @ b)).astype(y.dtype)
        return y


class LoRAs:
    """The loaded adapters of one model, and the current step's rows for each."""

    def __init__(self, model: nn.Module, dtype: mx.Dtype, max_rank: int):
        self.model = model
        self.dtype = dtype
        self.max_rank = max_rank
        self.masks: dict[int, mx.array] = {}
        self._modules: dict[int, list[MultiLoRALinear]] = {}

    def add(self, lora_id: int, path: str | Path) -> None:
        path = Path(path)
        weights, scale = read_adapter(path, self.max_rank)
        self.remove(lora_id)
        layers = []
        for module, (a, b) in weights.items():
            layer = self._wrapped(module, path)
            layer._adapters[lora_id] = (a.astype(self.dtype), b.astype(self.dtype), scale)
            layers.append(layer)
        mx.eval([p for layer in layers for p in layer._adapters[lora_id][:2]])
        self._modules[lora_id] = layers

    def remove(self, lora_id: int) -> bool:
        for layer in self._modules.pop(lora_id, []):
            layer._adapters.pop(lora_id, None)
        return True

    def ids(self) -> set[int]:
        return set(self._modules)

    @contextmanager
    def step(self, lora_ids: list[int], lens: list[int]):
        """The context of one packed forward: request ``i`` (``lens[i]`` rows, adapter
        ``lora_ids[i]``, 0 = none) gets its adapter's update on its rows."""
        ids = np.repeat(np.asarray(lora_ids), lens)
        self.masks = {int(i): mx.array((ids == i).astype(np.float32))[:, None, None]
                      for i in np.unique(ids) if i and i in self._modules}
        try:
            yield
        finally:
            self.masks = {}

    def _wrapped(self, module: str, path: Path) -> MultiLoRALinear:
        parent: nn.Module = self.model
        *parents, leaf = module.split(".")
        try:
            for part in parents:
                parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
            layer = getattr(parent, leaf)
        except (AttributeError, IndexError, TypeError, ValueError):
            raise LoRAError(f"LoRA adapter {path}: the model has no module {module}") from None
        if isinstance(layer, MultiLoRALinear):
            return layer
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise LoRAError(f"LoRA adapter {path}: {module} is a {type(layer).__name__}, not a linear layer")
        wrapped = MultiLoRALinear(layer, self)
        setattr(parent, leaf, wrapped)
        return wrapped
