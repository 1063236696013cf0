"""The GGUF container: header, metadata key/values and tensor table, read from a memory map.

A small struct-based reader (GGUF v2/v3, little-endian; the `gguf` package's GGUFReader is correct
but takes seconds on a 49k-token vocabulary). The file may come from anyone, so every count and
length is checked against the bytes the file actually has before anything is allocated for it:
truncation anywhere, flipped bits, a string length of 2^40 or 2^40 tensors are a one-line
:class:`~llamalab.errors.WeightsError`. Numeric arrays stay numpy arrays (one copy of their
bytes); arrays of arrays nest at most 8 deep.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.config import describe
from llamalab.errors import WeightsError
from llamalab.formats.ggml_types import GGML_TYPE_INFO

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
              7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# Bounds on what a header may claim (real files: < 100 keys, a few thousand tensors, arrays never nested)
_MAX_KEYS, _MAX_TENSORS, _MAX_NESTING, _MAX_DIMS = 1 << 16, 1 << 20, 8, 4
_MIN_KEY_BYTES, _MIN_TENSOR_BYTES = 13, 24  # name length + type + a 1-byte value; name length + dims + type + offset


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first): reversed GGUF ne
    type: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: Any  # mmap (kept open while tensors are read)

    def raw(self, t: TensorInfo) -> np.ndarray:
        return np.frombuffer(self.buffer, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        try:
            self.buffer.close()
        except BufferError:  # numpy views still alive; the mmap is freed with them
            pass


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        self.size = len(buf)

    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            self.truncated()

    def truncated(self) -> None:
        raise WeightsError(f"truncated GGUF file {self.path}: header/metadata runs past the end of the file")

    def scalar(self, t: int) -> Any:
        fmt = _SCALAR[t]
        n = struct.calcsize(fmt)
        self.need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar(10)
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> list[str]:
        """An array of strings (the vocabulary, the merges): a tight loop, the hot spot of parsing."""
        self.need(count * 8)
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out = []
        append = out.append
        try:  # a length running past the end shows as a short slice, then a failing unpack or pos > size
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                append(buf[pos:pos + n].decode("utf-8", errors="replace"))
                pos += n
        except (struct.error, OverflowError):
            self.truncated()
        if pos > self.size:
            self.truncated()
        self.pos = pos
        return out

    def value(self, t: int, depth: int = 0) -> Any:
        """One metadata value: a Python scalar or str, a list of str, a numpy array, or a list of arrays."""
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            et = self.scalar(4)
            count = self.scalar(10)
            if et == _STRING:
                return self.strings(count)
            if et in _NP_SCALAR:  # numbers stay one numpy array (a Python list costs ~15x the bytes)
                dt = np.dtype(_NP_SCALAR[et]).newbyteorder("<")
                self.need(count * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr
            if et == _ARRAY:
                if depth >= _MAX_NESTING:
                    raise WeightsError(f"corrupt GGUF file {self.path}: metadata arrays nested more than "
                                       f"{_MAX_NESTING} deep")
                self.need(count * 12)  # each element array has at least a type and a count
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise WeightsError(f"corrupt GGUF file {self.path}: unknown array element type {et}")
        if t in _SCALAR:
            return self.scalar(t)
        raise WeightsError(f"corrupt GGUF file {self.path}: unknown metadata value type {t}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data stays memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise WeightsError(f"{path} is empty, not a GGUF file") from None
    cur = _Cursor(buf, path)
    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.scalar(4)
    if version not in (2, 3):
        raise WeightsError(f"{path}: unsupported GGUF version {version} (big-endian or too new?)")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
    if n_tensors > _MAX_TENSORS or n_kv > _MAX_KEYS:
        raise WeightsError(f"corrupt GGUF file {path}: implausible counts ({n_tensors:,} tensors, {n_kv:,} keys)")
    if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KEY_BYTES > cur.size - cur.pos:
        raise WeightsError(f"truncated or corrupt GGUF file {path}: the header announces {n_tensors:,} tensors and "
                           f"{n_kv:,} keys, more than the file's {cur.size:,} bytes hold")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar(4)
        if n_dims > _MAX_DIMS:
            raise WeightsError(f"corrupt GGUF file {path}: tensor {name!r} has {n_dims:,} dimensions")
        ne = [cur.scalar(10) for _ in range(n_dims)]
        ttype = cur.scalar(4)
        offset = cur.scalar(10)
        infos.append((name, ne, ttype, offset))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise WeightsError(f"corrupt GGUF file {path}: general.alignment must be a power-of-two integer, got "
                           f"{describe(align)}")
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, ne, ttype, offset in infos:
        if name in tensors:
            raise WeightsError(f"corrupt GGUF file {path}: tensor {name!r} appears twice")
        qtype = GGML_TYPE_INFO.get(ttype)
        if qtype is None:
            raise WeightsError(f"{path}: tensor {name} has unknown GGML type {ttype}")
        block, type_size = qtype.block, qtype.type_size
        n = math.prod(ne)
        if ne and ne[0] % block:
            raise WeightsError(f"corrupt GGUF file {path}: tensor {name} row of {ne[0]} is not a whole number of "
                               f"{qtype.name} blocks")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise WeightsError(f"truncated GGUF file {path}: tensor {name} ends at byte {start + nbytes:,} but the "
                               f"file has {len(buf):,} bytes")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), ttype, start, nbytes)
    return GGUFFile(path, meta, tensors, buf)
