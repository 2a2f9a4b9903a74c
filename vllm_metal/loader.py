"""Load an mlx-lm model for vLLM: HF safetensors, MLX (quantized) checkpoints or GGUF files.

The model object stays mlx-lm's own; the loader casts floating weights to vLLM's dtype and
hands the model to ``mlx_lm_models.adapt`` (KV geometry, attention routed to the paged cache,
the LM head run only on the rows that need logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from vllm.logger import init_logger

from vllm_metal import distributed, gguf, mlx_lm_models
from vllm_metal.attention import LayerSpec
from vllm_metal.bridge import torch_dtype_to_mlx
from vllm_metal.device import on_gpu
from vllm_metal.mlx_lm_models import RowSelect, UnsupportedModelError

logger = init_logger("vllm.metal")


@dataclass
class LoadedModel:
    model: nn.Module
    specs: list[LayerSpec]  # per attention layer
    row_select: RowSelect | None  # the final norm, applied only to the rows that need logits
    dtype: mx.Dtype
    weight_bytes: int
    head: bool = True  # False (pooling runners): ``logits`` returns the final hidden states instead

    def logits(self, tokens: mx.array, caches: list, rows: mx.array | None) -> mx.array:
        """Logits ``(len(rows), vocab)`` of a packed batch ``(T,)`` of one-token rows, or of one
        sequence ``(1, n)``; ``rows=None``: every position. Without ``head``: the final (normed)
        hidden states ``(len(rows), hidden)`` of those rows."""
        x = tokens[:, None] if tokens.ndim == 1 else tokens
        if self.row_select is None:
            out = self.model(x, cache=caches)
            out = out.reshape(-1, out.shape[-1])
            return out if rows is None else out[rows]
        self.row_select.rows, self.row_select.keep = rows, not self.head
        try:
            out = self.model(x, cache=caches)
            if not self.head:
                out = self.row_select.kept
        finally:
            self.row_select.rows, self.row_select.keep, self.row_select.kept = None, False, None
        return out.reshape(-1, out.shape[-1])

    def without_head(self) -> None:
        """Make ``logits`` return final hidden states (a pooling runner's input)."""
        if self.row_select is None:
            raise UnsupportedModelError(
                f"{type(self.model).__module__}: no final norm found where mlx-lm models keep it, "
                "so its final hidden states cannot be taken for pooling (--runner pooling)."
            )
        self.head = False


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory for ``model`` (a path or an already-downloaded hub id).

    A ``.gguf`` file maps to its view directory (see ``vllm_metal.gguf.view``)."""
    path = Path(model).expanduser()
    if gguf.is_gguf_file(path):
        return gguf.ensure_view(path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available offline"
        raise FileNotFoundError(
            f"Model {model!r} is neither a local directory nor in the Hugging Face cache. "
            "Pass a local checkpoint path, or download it first (huggingface-cli download)."
        ) from exc


def load(model_dir: Path, dtype, trust_remote_code: bool = False,
         group: mx.distributed.Group | None = None) -> LoadedModel:
    """Load, cast to ``dtype`` (a torch dtype), patch attention; log progress while loading.
    With a ``group`` of more than one rank, this rank's shard only (``distributed.shard``)."""
    from mlx_lm.utils import load_config, load_model

    start = time.perf_counter()
    overrides = mlx_lm_models.prepare_mlx_lm(load_config(model_dir))  # refuses what mlx-lm lacks
    try:
        if gguf.is_view(model_dir):
            from vllm_metal.gguf.weights import load_model as load_gguf_model

            model, config = load_gguf_model(model_dir, overrides, trust_remote_code)
        else:
            model, config = load_model(
                model_dir, lazy=True, model_config=overrides, trust_remote_code=trust_remote_code
            )
    except ValueError as exc:
        if "not supported" in str(exc) and not isinstance(exc, gguf.GgufError):
            raise UnsupportedModelError(f"{exc} {mlx_lm_models.supported_hint()}") from exc
        raise
    if group is not None and group.size() > 1:
        distributed.shard(model, mlx_lm_models.layer_specs(model, config), group)
    target = torch_dtype_to_mlx(dtype)
    _log_quantized_dtype_costs(model, target)

    def cast(a: mx.array) -> mx.array:
        return a.astype(target) if mx.issubdtype(a.dtype, mx.floating) and a.dtype != target else a

    model.update(tree_map(cast, model.parameters()))
    layers = getattr(model, "layers", [])
    for i, layer in enumerate(layers):
        mx.eval(layer.parameters())
        if (i + 1) % max(1, len(layers) // 4) == 0 or i + 1 == len(layers):
            logger.info("vllm-metal: loaded %d/%d layers", i + 1, len(layers))
    mx.eval(model.parameters())
    weight_bytes = sum(a.nbytes for _, a in tree_flatten(model.parameters()))

    specs, row_select = mlx_lm_models.adapt(model, config)
    logger.info(
        "vllm-metal: loaded %s (%s, %.1f MiB of weights%s) in %.1fs",
        model_dir, config.get("model_type"), weight_bytes / 2**20,
        f", rank {group.rank()}'s shard of {group.size()}" if group is not None and group.size() > 1 else "",
        time.perf_counter() - start,
    )
    return LoadedModel(model, specs, row_select, target, weight_bytes)


def _log_quantized_dtype_costs(model: nn.Module, target: mx.Dtype) -> None:
    """Say what a non-fp32 dtype costs a quantized model: float32 scales (GGUF K-quants, fp32
    MLX checkpoints) get rounded, and MLX's CPU backend runs float16/bfloat16 quantized matmuls
    10-50x slower than float32 ones."""
    if target == mx.float32:
        return
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if not quantized:
        return
    if any(m.scales.dtype == mx.float32 for m in quantized):
        logger.info("vllm-metal: float32 quantization scales are rounded to %s; --dtype float32 keeps "
                    "them exact", target)
    if not on_gpu():
        logger.warning("vllm-metal: quantized model in %s on MLX's CPU backend, whose quantized matmuls "
                       "run 10-50x slower in float16/bfloat16 than in float32: pass --dtype float32", target)
