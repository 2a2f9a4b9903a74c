"""torch <-> MLX tensor bridge: dtype-exact (bfloat16 included), zero-copy where memory allows.

MLX -> torch is zero-copy on the host (MLX buffers are read through numpy's buffer protocol;
on Apple Silicon that is the same unified memory the GPU wrote). torch -> MLX copies once,
because MLX arrays own their memory. bfloat16 has no numpy dtype, so it travels as its
16-bit pattern and is reinterpreted on the other side.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

_TORCH_TO_MLX = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.int64: mx.int64,
    torch.int32: mx.int32,
    torch.int16: mx.int16,
    torch.int8: mx.int8,
    torch.uint8: mx.uint8,
    torch.bool: mx.bool_,
}
_MLX_TO_TORCH = {v: k for k, v in _TORCH_TO_MLX.items()}


def torch_dtype_to_mlx(dtype: torch.dtype) -> mx.Dtype:
    try:
        return _TORCH_TO_MLX[dtype]
    except KeyError:
        raise TypeError(f"no MLX dtype for torch {dtype}") from None


def mlx_dtype_to_torch(dtype: mx.Dtype) -> torch.dtype:
    try:
        return _MLX_TO_TORCH[dtype]
    except KeyError:
        raise TypeError(f"no torch dtype for MLX {dtype}") from None


def _host(a: mx.array) -> np.ndarray:
    """NumPy view of an MLX array's buffer; a copy only where torch cannot view it."""
    n = np.array(a, copy=False)
    if any(s < 0 for s in n.strides):  # reversed slices: torch has no negative strides
        n = np.ascontiguousarray(n)
    return n


def mlx_to_torch(a: mx.array) -> torch.Tensor:
    """View an MLX array as a CPU torch tensor (evaluates it; no copy unless a stride is
    negative, e.g. ``a[::-1]``, which torch cannot represent)."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(_host(a.view(mx.uint16))).view(torch.bfloat16)
    torch_dtype = mlx_dtype_to_torch(a.dtype)  # raises for unsupported dtypes
    t = torch.from_numpy(_host(a))
    return t if t.dtype == torch_dtype else t.to(torch_dtype)


def torch_to_mlx(t: torch.Tensor) -> mx.array:
    """Copy a torch tensor (any device) into a new MLX array of the same dtype and shape."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.contiguous().numpy(), dtype=torch_dtype_to_mlx(t.dtype))
