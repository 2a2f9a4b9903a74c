"""torch <-> MLX bridge: exact round trips, zero-copy MLX -> torch, clear errors."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
import torch

from vllm_metal.bridge import mlx_dtype_to_torch, mlx_to_torch, torch_dtype_to_mlx

DTYPES = [
    (torch.float32, mx.float32),
    (torch.float16, mx.float16),
    (torch.bfloat16, mx.bfloat16),
    (torch.int32, mx.int32),
    (torch.int64, mx.int64),
    (torch.bool, mx.bool_),
    (torch.int8, mx.int8),
    (torch.uint8, mx.uint8),
    (torch.int16, mx.int16),
]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values that use the whole dtype: extremes, negative zero, inf/nan, subnormals."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"),
                                 torch.finfo(dtype).max, torch.finfo(dtype).tiny,
                                 torch.finfo(dtype).tiny / 4], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
        specials = torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1], dtype=dtype)
    flat = t.reshape(-1)
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    return flat.reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (nan == nan, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def torch_to_mlx(t: torch.Tensor) -> mx.array:
    """The same values as an MLX array, built through NumPy (bf16 through its bits)."""
    if t.dtype == torch.bfloat16:
        return mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.contiguous().numpy(), dtype=torch_dtype_to_mlx(t.dtype))


def _bytes(a: mx.array) -> mx.array:
    flat = a.reshape(-1)
    return flat if a.dtype == mx.bool_ else flat.view(mx.uint8)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tdt,mdt", DTYPES, ids=[str(t).removeprefix("torch.") for t, _ in DTYPES])
def test_round_trip_exact(tdt, mdt, shape):
    t = _sample(tdt, shape)
    a = torch_to_mlx(t)
    assert a.dtype == mdt
    assert tuple(a.shape) == shape
    back = mlx_to_torch(a)
    assert back.device.type == "cpu"
    assert _same_bits(back, t)
    # and the other direction: MLX -> torch -> MLX
    again = torch_to_mlx(back)
    assert again.dtype == mdt
    assert again.shape == a.shape
    assert mx.array_equal(_bytes(again), _bytes(a)).item()


@pytest.mark.parametrize("mdt", [m for _, m in DTYPES], ids=str)
def test_mlx_to_torch_zero_copy(mdt):
    """Every supported dtype (bfloat16 via its uint16 view) is viewed, not copied."""
    a = mx.arange(24).reshape(4, 6).astype(mdt)
    mx.eval(a)
    t = mlx_to_torch(a)
    assert t.dtype == mlx_dtype_to_torch(mdt)
    host = np.array(a.view(mx.uint16) if mdt == mx.bfloat16 else a, copy=False)
    assert t.data_ptr() == host.ctypes.data
    assert np.shares_memory(host, t.view(torch.int16).numpy() if mdt == mx.bfloat16 else t.numpy())


def test_mlx_to_torch_zero_copy_float32_shares_memory():
    a = mx.random.normal((16, 32))
    t = mlx_to_torch(a)
    assert np.shares_memory(np.array(a, copy=False), t.numpy())
    assert t.data_ptr() == np.array(a, copy=False).ctypes.data


def test_mlx_to_torch_non_contiguous_view():
    """A transposed MLX array comes back as a strided torch view of the same buffer."""
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    mx.eval(a)
    at = a.T
    t = mlx_to_torch(at)
    assert t.shape == (4, 3)
    assert torch.equal(t, torch.arange(12, dtype=torch.float32).reshape(3, 4).t())
    assert np.shares_memory(np.array(a, copy=False), t.numpy())


@pytest.mark.parametrize("mdt", [mx.float32, mx.bfloat16, mx.int64], ids=str)
@pytest.mark.parametrize("view", ["rows[::-1]", "cols[::-1]", "slice", "step", "broadcast"])
def test_mlx_to_torch_strided_views(mdt, view):
    """Sliced, stepped, reversed and broadcast MLX arrays convert to the right values.
    Torch has no negative strides, so reversed views are the one case that is copied."""
    base = mx.arange(12).reshape(3, 4).astype(mdt)
    mx.eval(base)
    x = {
        "rows[::-1]": base[::-1],
        "cols[::-1]": base[:, ::-1],
        "slice": base[1:, 2:],
        "step": base[:, ::2],
        "broadcast": mx.broadcast_to(base[0], (3, 4)),
    }[view]
    t = mlx_to_torch(x)
    assert t.dtype == mlx_dtype_to_torch(mdt)
    expected = np.array(x.astype(mx.float32))
    assert np.array_equal(t.float().numpy(), expected)
    if "::-1" not in view:  # the bridge adds no copy of its own
        host = np.array(x.view(mx.uint16) if mdt == mx.bfloat16 else x, copy=False)
        shown = t.view(torch.int16).numpy() if mdt == mx.bfloat16 else t.numpy()
        assert np.shares_memory(host, shown)


def test_mlx_to_torch_keeps_buffer_alive():
    """The torch tensor holds on to the MLX buffer after the MLX array is gone."""
    a = mx.arange(1000, dtype=mx.float32) * 3
    t = mlx_to_torch(a)
    del a
    gc.collect()
    _ = [mx.zeros((1000,)) + i for i in range(8)]  # give MLX's allocator a chance to reuse it
    mx.eval(_)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32) * 3)


def test_mlx_to_torch_evaluates_lazy_graph():
    a = mx.ones((3, 3)) @ mx.ones((3, 3))  # not evaluated yet
    assert torch.equal(mlx_to_torch(a), torch.full((3, 3), 3.0))


def test_zero_dim():
    t = mlx_to_torch(mx.array(2.5))
    assert t.shape == () and t.item() == 2.5
    a = torch_to_mlx(torch.tensor(7, dtype=torch.int64))
    assert a.shape == () and a.dtype == mx.int64 and a.item() == 7
    b = mlx_to_torch(mx.array(1.5, dtype=mx.bfloat16))
    assert b.shape == () and b.dtype == torch.bfloat16 and b.item() == 1.5


@pytest.mark.parametrize("tdt", [torch.float64, torch.complex64, torch.uint16, torch.uint32])
def test_torch_to_mlx_unsupported_dtype(tdt):
    with pytest.raises(TypeError, match="no MLX dtype"):
        torch_to_mlx(torch.zeros(3, dtype=tdt))
    with pytest.raises(TypeError):
        torch_dtype_to_mlx(tdt)


@pytest.mark.parametrize("mdt", [mx.uint16, mx.uint32, mx.uint64, mx.float64, mx.complex64], ids=str)
def test_mlx_to_torch_unsupported_dtype(mdt):
    with pytest.raises(TypeError, match="no torch dtype"):
        mlx_to_torch(mx.zeros((3,), dtype=mdt))
    with pytest.raises(TypeError):
        mlx_dtype_to_torch(mdt)


def test_dtype_maps_are_inverse():
    for tdt, mdt in DTYPES:
        assert torch_dtype_to_mlx(tdt) == mdt
        assert mlx_dtype_to_torch(mdt) == tdt
