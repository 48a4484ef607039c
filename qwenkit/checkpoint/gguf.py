"""A defensive reader of GGUF v2/v3 files (llama.cpp's model format).

The file is memory-mapped read-only and never read whole: the header (metadata and tensor infos) is parsed
straight out of the map with every length and count checked against the file size before anything is allocated,
and tensor data is handed out as zero-copy uint8 views or dequantized chunk by chunk into a destination tensor.

Layout (little-endian): ``"GGUF"``, u32 version, u64 tensor_count, u64 kv_count, kv_count x (string key, u32 value
type, value), tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset), padding to
``general.alignment`` (default 32), tensor data. A string is a u64 byte length then UTF-8 bytes; an array is a u32
item type, a u64 count, then the items. ``ne`` lists dimensions innermost first, so the PyTorch shape is reversed.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from qwenkit.checkpoint import quants
from qwenkit.checkpoint.quants import DEQUANTIZABLE, QUANT_SIZES, GGMLType, dequantize as _dequantize
from qwenkit.errors import BadCheckpoint, UnsupportedModel

__all__ = ["GGUFFile", "GGUFTensor", "GGUFValueType", "GGMLType"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8
_COPY_PIECE = 1 << 15  # elements per cast-copy into a CPU destination: at::internal::GRAIN_SIZE, so one thread
# Smallest possible encodings, used to reject counts that could not fit in the rest of the file.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# fixed-size scalar types: (struct format, numpy dtype, size)
_SCALARS: dict[int, tuple[struct.Struct, str, int]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), "<u1", 1),
    GGUFValueType.INT8: (struct.Struct("<b"), "<i1", 1),
    GGUFValueType.UINT16: (struct.Struct("<H"), "<u2", 2),
    GGUFValueType.INT16: (struct.Struct("<h"), "<i2", 2),
    GGUFValueType.UINT32: (struct.Struct("<I"), "<u4", 4),
    GGUFValueType.INT32: (struct.Struct("<i"), "<i4", 4),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), "<f4", 4),
    GGUFValueType.BOOL: (struct.Struct("<B"), "<u1", 1),
    GGUFValueType.UINT64: (struct.Struct("<Q"), "<u8", 8),
    GGUFValueType.INT64: (struct.Struct("<q"), "<i8", 8),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), "<f8", 8),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _min_item_size(vtype: int) -> int:
    if vtype in _SCALARS:
        return _SCALARS[vtype][2]
    return 8 if vtype == GGUFValueType.STRING else 4 + 8  # ARRAY: item type + count


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor's entry in a GGUF file. ``shape`` is in PyTorch order (ggml ``ne`` reversed); ``offset`` is the
    absolute byte offset of its data in the file."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLType
    offset: int
    nbytes: int
    n_elements: int


class _Parser:
    """Cursor over the mapped header; every read is bounds-checked and fails with BadCheckpoint."""

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, what: str) -> BadCheckpoint:
        return BadCheckpoint(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} at offset {self.pos} needs {n} bytes but the file has "
                            f"{self.size} bytes")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what} at offset {self.pos - 8} claims {n} bytes, past the end "
                            f"of the file ({self.size} bytes)")
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        sc = _SCALARS.get(vtype)
        if sc is not None:
            fmt, _, size = sc
            self.need(size, what)
            (v,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += size
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        itype = self.u32(f"item type of {what}")
        if itype not in _SCALARS and itype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise self.fail(f"{what} has unknown array item type {itype}")
        count = self.u64(f"length of {what}")
        if count * _min_item_size(itype) > self.size - self.pos:
            raise self.fail(f"truncated or corrupt: {what} at offset {self.pos - 12} claims {count} items, more than "
                            f"fit in the rest of the file ({self.size} bytes)")
        sc = _SCALARS.get(itype)
        if sc is not None:
            _, dtype, size = sc
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * size
            if itype == GGUFValueType.BOOL:
                return (arr != 0).tolist()
            return arr.tolist()
        if itype == GGUFValueType.STRING:
            return self.string_array(count, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def string_array(self, count: int, what: str) -> list[str]:
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated: {what}[{i}] at offset {pos} runs past the end of the file "
                                f"({size} bytes)")
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise self.fail(f"truncated or corrupt: {what}[{i}] at offset {pos - 8} claims {n} bytes, past the "
                                f"end of the file ({size} bytes)")
            append(buf[pos:end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF v2/v3 file, memory-mapped read-only.

    ``metadata`` maps each key to a Python value (int, float, bool, str, or a list of those / of lists);
    ``tensors`` maps each tensor name to a GGUFTensor. Tensor data is read lazily: ``raw(name)`` gives the bytes
    as a zero-copy view, ``dequantize(name, out=...)`` decodes them to float32 (or into any destination tensor).
    Every problem with the file raises BadCheckpoint (UnsupportedModel for a tensor type or byte order qwenkit
    does not read) with a one-line message that starts with the path.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._mmap: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, GGUFValueType | tuple[GGUFValueType, GGUFValueType]] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self.file_size = 0
        self._open()
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- opening and parsing -----------------------------------------------------------------------------------

    def _open(self) -> None:
        p = self.path
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise BadCheckpoint(f"{p}: no such file") from None
        except OSError as e:
            raise BadCheckpoint(f"{p}: cannot open: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            raise BadCheckpoint(f"{p}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or have no size
            raise BadCheckpoint(f"{p}: not a regular file")
        try:
            f = open(p, "rb")
        except OSError as e:
            raise BadCheckpoint(f"{p}: cannot open: {e.strerror or e}") from None
        with f:
            self.file_size = os.fstat(f.fileno()).st_size
            if self.file_size < 4 + 4 + 8 + 8:
                raise BadCheckpoint(f"{p}: not a GGUF file: only {self.file_size} bytes")
            try:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise BadCheckpoint(f"{p}: cannot memory-map: {e}") from None
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)

    def _parse(self) -> None:
        assert self._mmap is not None
        p = _Parser(self.path, self._mmap, self.file_size)
        try:
            self._parse_header(p)
        except (struct.error, ValueError, OverflowError, IndexError) as e:  # safety net: any slip is a bad file
            raise BadCheckpoint(f"{self.path}: malformed GGUF header near offset {p.pos}: {e}") from None

    def _parse_header(self, p: _Parser) -> None:
        path = self.path
        magic = bytes(self._mmap[0:4])  # type: ignore[index]
        if magic != GGUF_MAGIC:
            raise BadCheckpoint(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        p.pos = 4
        version = p.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise UnsupportedModel(f"{path}: big-endian GGUF files are not supported")
            raise BadCheckpoint(f"{path}: unsupported GGUF version {version} (qwenkit reads versions 2 and 3)")
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata count")
        rest = self.file_size - p.pos
        if n_kv * _MIN_KV_BYTES > rest:
            raise BadCheckpoint(f"{path}: corrupt header: metadata count {n_kv} cannot fit in a file of "
                                f"{self.file_size} bytes")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > rest:
            raise BadCheckpoint(f"{path}: corrupt header: tensor count {n_tensors} cannot fit in a file of "
                                f"{self.file_size} bytes")

        metadata = self.metadata
        for i in range(n_kv):
            key = p.string(f"metadata key #{i}")
            if key in metadata:
                raise BadCheckpoint(f"{path}: duplicate metadata key {_show(key)}")
            vtype = p.u32(f"value type of metadata {_show(key)}")
            if vtype not in _SCALARS and vtype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                raise BadCheckpoint(f"{path}: metadata {_show(key)} has unknown value type {vtype}")
            if vtype == GGUFValueType.ARRAY:
                # peek at the item type for metadata_types
                p.need(4, f"item type of metadata {_show(key)}")
                (itype,) = _U32.unpack_from(self._mmap, p.pos)  # type: ignore[arg-type]
                self.metadata_types[key] = (GGUFValueType.ARRAY, _value_type_or_raw(itype))
            else:
                self.metadata_types[key] = GGUFValueType(vtype)
            metadata[key] = p.value(vtype, f"metadata {_show(key)}")

        align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise BadCheckpoint(f"{path}: general.alignment must be a positive power of two, got {align!r}")
        self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = p.string(f"name of tensor #{i}")
            n_dims = p.u32(f"n_dims of tensor {_show(name)}")
            if n_dims > MAX_DIMS:
                raise BadCheckpoint(f"{path}: tensor {_show(name)} has {n_dims} dimensions "
                                    f"(at most {MAX_DIMS} allowed)")
            p.need(8 * n_dims, f"dimensions of tensor {_show(name)}")
            ne = struct.unpack_from(f"<{n_dims}Q", self._mmap, p.pos)  # type: ignore[arg-type]
            p.pos += 8 * n_dims
            type_id = p.u32(f"type of tensor {_show(name)}")
            rel = p.u64(f"data offset of tensor {_show(name)}")
            infos.append((name, ne, type_id, rel))

        self.data_offset = data_offset = -(-p.pos // align) * align
        tensors = self.tensors
        for name, ne, type_id, rel in infos:
            if name in tensors:
                raise BadCheckpoint(f"{path}: duplicate tensor name {_show(name)}")
            try:
                qtype = GGMLType(type_id)
            except ValueError:
                raise UnsupportedModel(f"{path}: tensor {_show(name)} has unknown ggml type id {type_id}") from None
            bs, ts = QUANT_SIZES[qtype]
            if ne and ne[0] % bs:
                raise BadCheckpoint(f"{path}: tensor {_show(name)} has rows of {ne[0]} elements, not a multiple "
                                    f"of the {qtype.name} block size {bs}")
            n_elements = math.prod(ne)
            nbytes = n_elements // bs * ts
            start = data_offset + rel
            if start % align:
                raise BadCheckpoint(f"{path}: tensor {_show(name)} data offset {start} is not a multiple of the "
                                    f"alignment {align}")
            end = start + nbytes
            if end > self.file_size:
                raise BadCheckpoint(f"{path}: truncated: tensor {_show(name)} needs bytes {start}..{end} but the "
                                    f"file has {self.file_size} bytes")
            tensors[name] = GGUFTensor(name=name, shape=tuple(reversed(ne)), qtype=qtype, offset=start,
                                       nbytes=nbytes, n_elements=n_elements)

    # -- public API ----------------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise BadCheckpoint(f"{self.path}: metadata general.architecture is missing")
        return arch

    def _tensor(self, name: str) -> GGUFTensor:
        if self._bytes is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        t = self.tensors.get(name)
        if t is None:
            raise BadCheckpoint(f"{self.path}: no tensor named {_show(name)}")
        return t

    def release(self, name: str) -> None:
        """Drop tensor `name`'s file pages from this process's resident memory once it has been copied out.

        They stay in the page cache, so a re-read is cheap; without this, the mapped pages of tensors already
        loaded count in RSS next to their copies and the load's peak grows past the model's own size.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        t = self._tensor(name)
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only, zero-copy uint8 view into the memory map."""
        t = self._tensor(name)
        return self._bytes[t.offset:t.offset + t.nbytes]  # type: ignore[index]

    def dequantize(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode tensor ``name`` to float32 in its PyTorch shape (bit-identical to ``gguf.quants.dequantize``).

        With ``out`` (a tensor of that shape, any floating dtype and device) the values are written into it and
        ``out`` is returned; decoding runs in bounded chunks so no second full-size copy is ever held.
        """
        t = self._tensor(name)
        if t.qtype not in DEQUANTIZABLE:
            raise UnsupportedModel(f"{self.path}: tensor {_show(name)} has type {t.qtype.name}, which qwenkit "
                                   f"cannot dequantize")
        raw = self.raw(name)
        if out is None:
            out = torch.empty(t.shape, dtype=torch.float32)
            _dequantize(raw, t.qtype, t.n_elements, out=out.numpy())
            return out
        if tuple(out.shape) != t.shape:
            raise BadCheckpoint(f"{self.path}: tensor {_show(name)} has shape {list(t.shape)} but the destination "
                                f"has shape {list(out.shape)}")
        with torch.no_grad():
            if out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous():
                _dequantize(raw, t.qtype, t.n_elements, out=out.detach().numpy())
                return out
            self._dequantize_chunked(t, raw, out)
        return out

    def _dequantize_chunked(self, t: GGUFTensor, raw: np.ndarray, out: torch.Tensor) -> None:
        """Decode through one float32 scratch chunk and cast-copy each chunk into ``out``.

        On CPU the copies go in pieces below torch's parallel grain size: the copy is memory-bound anyway, and on
        a busy machine torch's thread pool turned a 0.1 ms cast-copy into 8 ms (a 0.5B model took 15 s)."""
        bs, ts = QUANT_SIZES[t.qtype]
        n = t.n_elements
        if n == 0:
            return
        piece = _COPY_PIECE if out.device.type == "cpu" else n
        if out.is_contiguous():
            # flat chunks of whole blocks
            step = max(bs, quants.CHUNK_ELEMENTS // bs * bs)
            scratch = np.empty(min(step, n), dtype=np.float32)
            src = torch.from_numpy(scratch)
            flat = out.view(-1)
            for a in range(0, n, step):
                b = min(a + step, n)
                _dequantize(raw[a // bs * ts:b // bs * ts], t.qtype, b - a, out=scratch[:b - a])
                for c in range(a, b, piece):
                    d = min(c + piece, b)
                    flat[c:d].copy_(src[c - a:d - a])
            return
        # a non-contiguous destination: go along dim 0, in groups of slices that hold whole blocks
        rows = t.shape[0]
        per = n // rows
        group = bs // math.gcd(bs, per)
        k = max(group, quants.CHUNK_ELEMENTS // per // group * group)
        scratch = np.empty(min(k, rows) * per, dtype=np.float32)
        src = torch.from_numpy(scratch).view((-1, *t.shape[1:]))
        rows_per_piece = max(1, piece // per)
        for a in range(0, rows, k):
            b = min(a + k, rows)
            _dequantize(raw[a * per // bs * ts:b * per // bs * ts], t.qtype, (b - a) * per,
                        out=scratch[:(b - a) * per])
            for c in range(a, b, rows_per_piece):
                d = min(c + rows_per_piece, b)
                out[c:d].copy_(src[c - a:d - a])

    def close(self) -> None:
        """Release the memory map. Views handed out by ``raw`` keep the mapping alive until they are dropped."""
        self._bytes = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # numpy views still exported; the map goes when the last one is collected
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, version={self.version}, tensors={len(self.tensors)})"


def _show(text: str, limit: int = 100) -> str:
    """A name or key from the file, fit for a one-line message (control characters escaped, length capped)."""
    if len(text) <= limit and text.isprintable():
        return text
    short = repr(text[:limit])
    return short + "..." if len(text) > limit else short


def _value_type_or_raw(v: int) -> GGUFValueType | int:
    try:
        return GGUFValueType(v)
    except ValueError:
        return v
