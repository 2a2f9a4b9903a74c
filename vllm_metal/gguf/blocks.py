"""GGUF quantized blocks -> MLX affine quantization, bit for bit.

MLX's affine format stores, per group of ``group_size`` consecutive inputs of a row, a scale and a
bias (``w = scale * q + bias``) and packs the unsigned ``bits``-wide ``q`` as a little-endian bit
stream in uint32 words (element 0 in the lowest bits). Every GGUF type below is that same formula
over 32-element groups, so the conversion only re-packs integers and rewrites ``(d, m)`` as
``(scale, bias)``:

=====  ====  ==================================  ===============================================
type   bits  GGUF value                          MLX scale / bias per 32 elements
=====  ====  ==================================  ===============================================
Q4_0   4     d * (q - 8)                         d / -8d
Q4_1   4     d * q + m                           d / m
Q5_0   5     d * (q - 16)                        d / -16d
Q5_1   5     d * q + m                           d / m
Q8_0   8     d * q  (q signed)                   d / -128d  (q + 128 unsigned)
Q4_K   4     d*sc[j] * q - dmin*mn[j]  (6-bit)   d*sc[j] / -dmin*mn[j]
Q5_K   5     same as Q4_K with 5-bit q           d*sc[j] / -dmin*mn[j]
=====  ====  ==================================  ===============================================

Scales and biases are kept in float16 where float16 holds them exactly (d and m are float16 in
the file; -8d, -16d, -128d are power-of-two multiples) and float32 otherwise (the K-quant
products d*sc need 17 significant bits). Types whose groups are 16 elements (Q2_K, Q3_K, Q6_K)
or whose values are not affine (IQ*, TQ*) have no exact MLX form: ``UnsupportedQuantError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
GROUP = 32
DENSE = (Q.F32, Q.F16, Q.BF16)


class UnsupportedQuantError(ValueError):
    """A GGUF tensor type that MLX's quantization cannot represent exactly."""


@dataclass
class AffineTensor:
    """One weight in MLX's affine layout (what ``mx.quantize`` would return)."""

    weight: np.ndarray  # uint32 (rows, cols * bits / 32)
    scales: np.ndarray  # float16 or float32 (rows, cols / group_size)
    biases: np.ndarray
    bits: int
    group_size: int = GROUP


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-wide integers ``(rows, cols)`` -> MLX's uint32 words, low bits first."""
    rows, cols = q.shape
    if bits == 8:
        packed = q.astype(np.uint8, copy=False)
    elif bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << np.uint8(4))
    else:
        stream = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
        packed = np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint32)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per entry (trailing axis) -> float32 values of those float16s."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _narrow(values: np.ndarray) -> np.ndarray:
    """float16 when every value survives the round trip exactly, else float32."""
    half = values.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), values) else values.astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the 5th bit of element j is bit j of a little-endian uint32."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit sub-block scales and eight 6-bit mins."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 128 bytes -> 8 sub-blocks of 32: per 32-byte chunk, low nibbles then high."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([chunks & np.uint8(0x0F), chunks >> np.uint8(4)], axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _decode(qtype: Q, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Blocks ``(rows, n_blocks, block_bytes)`` -> q ``(rows, n_groups, 32)``, scale, bias, bits."""
    if qtype == Q.Q4_0:
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:18]), d, -8 * d, 4
    if qtype == Q.Q4_1:
        return _nibbles(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4
    if qtype == Q.Q5_0:
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6]) << np.uint8(4)), d, -16 * d, 5
    if qtype == Q.Q5_1:
        q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8]) << np.uint8(4))
        return q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5
    if qtype == Q.Q8_0:
        d = _f16(b[..., 0:2])
        return b[..., 2:34] ^ np.uint8(0x80), d, -128 * d, 8  # int8 + 128 as uint8
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scale_min(b[..., 4:16])
        rows, n_super = b.shape[:2]
        if qtype == Q.Q4_K:
            q, bits = _k_low_nibbles(b[..., 16:144]), 4
        else:
            hi = (b[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)  # (.., 32, 8)
            q, bits = _k_low_nibbles(b[..., 48:176]) | (np.swapaxes(hi, -1, -2) << np.uint8(4)), 5
        shape = (rows, n_super * 8)
        return q.reshape(rows, n_super * 8, 32), (d * sc).reshape(shape), (-(dmin * mn)).reshape(shape), bits
    raise UnsupportedQuantError(qtype.name)


SUPPORTED = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K)


def why_unsupported(qtype: Q) -> str | None:
    """None for a type that loads (dense or exactly quantized), else the reason it cannot."""
    if qtype in DENSE or qtype in SUPPORTED:
        return None
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q6_K):
        return (f"{qtype.name} scales 16-element sub-blocks; MLX's affine groups are 32, 64 or 128 "
                "elements, so it has no exact MLX form")
    return f"{qtype.name} is not an affine (scale * q + bias) format, so it has no exact MLX form"


def to_affine(qtype: Q, raw: np.ndarray, cols: int) -> AffineTensor:
    """Raw GGUF rows ``(rows, row_bytes)`` of ``qtype`` -> the exact MLX affine tensor."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype not in SUPPORTED:
        raise UnsupportedQuantError(why_unsupported(qtype) or qtype.name)
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // block_elems, block_bytes)
    q, scale, bias, bits = _decode(qtype, blocks)
    return AffineTensor(pack(q.reshape(rows, cols), bits), _narrow(scale), _narrow(bias), bits)
