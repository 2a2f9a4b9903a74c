"""MLX -> torch tensors (the logits the sampler reads) and the dtype maps between the two.

MLX -> torch is zero-copy on the host (MLX buffers are read through numpy's buffer protocol;
on Apple Silicon that is the same unified memory the GPU wrote) and dtype-exact: bfloat16 has
no numpy dtype, so it travels as its 16-bit pattern and is reinterpreted on the torch side.
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
