"""The 4-bit tensor-core product (``vllm_metal.quant_kernel``) against float64 NumPy and MLX's op.

Each case quantizes a random weight with ``mx.quantize`` (as ``mlx_lm.convert -q`` does) and
multiplies random activations by it: the kernel's product must be as close to the float64
product of the dequantized weight as ``mx.quantized_matmul``'s is (both round to the activations'
dtype). Cases cover 1-255 rows (one and several 32-token launch rows, partial 8-token tiles),
output columns that leave a threadgroup partly empty, group sizes 64 and 128, bf16/fp16
activations with bf16/fp16/fp32 scales, and each threadgroup layout (row tiles x K ranges).

The kernel needs MLX on CUDA (``scripts/gpu/run.sh qkernel``); elsewhere only what it refuses is
checked, and the runner's greedy tokens with it are ``test_quantized``'s (bf16 case, run on CUDA).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from vllm_metal import quant_kernel

on_cuda = pytest.mark.skipif(not quant_kernel.on_cuda(),
                             reason="the 4-bit kernel runs on MLX's CUDA GPU (scripts/gpu/run.sh qkernel)")


def _layer(n: int, k: int, group: int, scale_dtype: mx.Dtype, seed: int):
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.05
    wq, scales, biases = mx.quantize(w.astype(scale_dtype), group_size=group, bits=4)
    dense = np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=4).astype(mx.float32),
                     dtype=np.float64)
    return wq, scales, biases, dense


CASES = [  # (rows, n, k, group, activations, scales, row tiles per threadgroup or None: the kernel's choice)
    (1, 64, 256, 64, mx.bfloat16, mx.bfloat16, None),
    (5, 1040, 512, 64, mx.bfloat16, mx.bfloat16, None),
    (8, 4096, 4096, 64, mx.bfloat16, mx.bfloat16, None),
    (9, 4096, 4096, 128, mx.bfloat16, mx.bfloat16, 1),
    (16, 1024, 4096, 64, mx.float16, mx.float16, None),
    (17, 2048, 1024, 64, mx.bfloat16, mx.float32, 2),
    (32, 14336, 4096, 64, mx.bfloat16, mx.bfloat16, None),
    (33, 4096, 14336, 64, mx.bfloat16, mx.bfloat16, 4),
    (64, 1040, 2048, 128, mx.float16, mx.float32, 4),
    (100, 2048, 2048, 64, mx.bfloat16, mx.bfloat16, 2),
    (255, 512, 1024, 64, mx.bfloat16, mx.bfloat16, None),
]


@on_cuda
@pytest.mark.parametrize(("rows", "n", "k", "group", "dtype", "scale_dtype", "wr"), CASES,
                         ids=[f"{c[0]}x{c[2]}->{c[1]}-g{c[3]}-{c[4]}-{c[5]}-wr{c[6]}" for c in CASES])
def test_kernel_matches_float64_as_closely_as_mlx(rows, n, k, group, dtype, scale_dtype, wr):
    wq, scales, biases, dense = _layer(n, k, group, scale_dtype, seed=rows + n + k)
    x = mx.random.normal((rows, k), key=mx.random.key(rows)).astype(dtype)
    want = np.array(x.astype(mx.float32), dtype=np.float64) @ dense.T
    got = quant_kernel.q4_matmul(x, wq, scales, biases, group, wr=wr)
    mlx = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=4)
    assert got.shape == (rows, n) and got.dtype == dtype
    err = np.abs(np.array(got.astype(mx.float32), dtype=np.float64) - want).max()
    mlx_err = np.abs(np.array(mlx.astype(mx.float32), dtype=np.float64) - want).max()
    assert err <= max(2 * mlx_err, 1e-3 * np.abs(want).max()), (err, mlx_err)


@on_cuda
def test_kernel_keeps_leading_dims_and_every_row_its_own():
    """A packed step's (T, 1, K) rows: each row's output is its product alone."""
    wq, scales, biases, _ = _layer(256, 512, 64, mx.bfloat16, seed=3)
    x = mx.random.normal((19, 1, 512), key=mx.random.key(4)).astype(mx.bfloat16)
    packed = quant_kernel.q4_matmul(x, wq, scales, biases, 64)
    rows = mx.concatenate([quant_kernel.q4_matmul(x[i:i + 1], wq, scales, biases, 64) for i in range(19)])
    assert packed.shape == (19, 1, 256)
    assert mx.allclose(packed.astype(mx.float32), rows.astype(mx.float32), atol=1e-2, rtol=1e-2).item()


@pytest.mark.parametrize(("shape", "group", "bits", "mode", "named"), [
    ((256, 64), 64, 8, "affine", "8-bit"),
    ((256, 64), 32, 4, "affine", "group size 32"),
    ((256, 64), 32, 4, "mxfp4", "mxfp4"),
    ((250, 64), 64, 4, "affine", "(250, 64)"),
    ((256, 60), 64, 4, "affine", "(256, 60)"),
])
def test_kernel_refuses_what_it_cannot_take(shape, group, bits, mode, named):
    with pytest.raises(quant_kernel.QuantizedKernelUnsupported, match=named.replace("(", r"\(").replace(")", r"\)")):
        quant_kernel.check(shape, group, bits, mode)
    quant_kernel.check((256, 64), 64, 4, "affine")
    assert quant_kernel.takes(mx.zeros((1, 8), dtype=mx.bfloat16))
    assert not quant_kernel.takes(mx.zeros((1, 8), dtype=mx.float32))
