"""A GGUF file's metadata and tensor table, read in one pass; tensor data as memory-mapped views.

gguf-py's ``GGUFReader`` builds a numpy view per array element of the metadata, which takes
seconds for a 50k-token vocabulary (and tens of seconds for 150k); the loader needs only the
scalar keys and the tensor table, so this reader skips the big arrays (it records their length).
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SMALL_ARRAY = 64  # arrays up to this length are read; longer ones are kept as their length


class GgufFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: dims[0] is the contiguous (input) dimension
    offset: int  # absolute, in bytes

    @property
    def rows(self) -> int:
        return int(np.prod(self.dims[1:], dtype=np.int64)) if len(self.dims) > 1 else 1

    @property
    def n_bytes(self) -> int:
        elems, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.dims, dtype=np.int64)) // elems * size


class GgufFile:
    """``metadata`` (key -> value; long arrays -> their length) and ``tensors`` of one file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            self._buf = buf
            self._pos = 0
            self._parse()
            del self._buf

    def _parse(self) -> None:
        magic, version = self._take("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise GgufFormatError(f"{self.path.name}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_kv = self._take("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._take("<I")
            self.metadata[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._take("<I")
            dims = self._take(f"<{n_dims}Q")
            qtype, offset = self._take("<IQ")
            infos.append((name, GGMLQuantizationType(qtype), tuple(int(d) for d in dims), offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors = [TensorInfo(n, t, d, data_start + o) for n, t, d, o in infos]

    def _take(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._take("<Q")
        s = self._buf[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise GgufFormatError(f"{self.path.name}: unknown metadata value type {vtype}")
        etype, count = self._take("<IQ")
        if count <= SMALL_ARRAY:
            return [self._value(etype) for _ in range(count)]
        if etype == _STRING:
            for _ in range(count):
                (n,) = self._take("<Q")
                self._pos += n
        elif etype in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[etype])
        else:
            for _ in range(count):
                self._value(etype)
        return count

    @cached_property
    def _map(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def data(self, t: TensorInfo) -> np.ndarray:
        """Read-only view of a tensor: quantized as raw rows ``(rows, row_bytes)`` uint8; F32/F16
        as floats and BF16 as uint16, shaped ``(rows, dims[0])`` (or ``(dims[0],)`` for 1-D)."""
        raw = self._map[t.offset:t.offset + t.n_bytes]
        shape = tuple(reversed(t.dims))
        if t.qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        if t.qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            return raw.view(np.float16 if t.qtype == GGMLQuantizationType.F16 else np.uint16).reshape(shape)
        return raw.reshape(t.rows, -1)
