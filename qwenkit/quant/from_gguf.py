"""GGUF quantized tensors -> ``Int8Grouped`` / ``Int4Grouped``, exactly, chunk by chunk, with no fp32 copy.

Each block type maps onto the nearest grouped format so that ``convert(...).dequantize()`` gives the same float32
values as ``qwenkit.checkpoint.quants.dequantize`` (i.e. gguf-py). The per-group scales and offsets are the very
float32 values gguf-py computes (``d``, ``d * sc``, ``dmin * m`` ...), and ``dequantize`` multiplies then adds, so:

======  =========================  ========================================================================
type    format                     value (gguf-py's formula -> ours)
======  =========================  ========================================================================
Q8_0    int8  g=32, no offset      d * q                      -> q * d
Q5_0    int8  g=32, no offset      d * (q - 16)               -> (q - 16) * d
Q5_1    int8  g=32, offset         d * q + m                  -> q * d + m
Q6_K    int8  g=16, no offset      (d * sc) * (q - 32)        -> (q - 32) * (d * sc)
Q5_K    int8  g=32, offset         (d * sc) * q - dmin * m    -> q * (d * sc) + (-(dmin * m))
Q4_0    int4  g=32                 d * (q - 8)                -> q * d + (-8 * d)
Q4_1    int4  g=32                 d * q + m                  -> q * d + m
Q4_K    int4  g=32                 (d * sc) * q - dmin * m    -> q * (d * sc) + (-(dmin * m))
Q3_K    int4  g=16                 dl * (q - 4)               -> (q) * dl + (-4 * dl),  q = q3 + 4 in 0..7
Q2_K    int4  g=16                 dl * q - ml                -> q * dl + (-ml)
======  =========================  ========================================================================

Every row is identical operation for operation except Q4_0 and Q3_K, where ``d * (q - 8)`` becomes
``q * d - 8 * d``: there every product and the difference are exact in float32 (an fp16 ``d`` has 11 significant
bits, times a <= 6-bit ``sc`` and a <= 4-bit ``q`` stays within float32's 24), so the values are still equal; the
one visible difference is the sign of a zero (``+0.0`` where gguf-py gives ``-0.0`` for ``q == 8`` and ``d < 0``).

Work goes in chunks of whole rows (about ``CHUNK_ELEMENTS`` values each) straight from the raw bytes (a memory-map
view is fine) into the preallocated outputs, so the temporaries stay a few MiB whatever the tensor size.
"""

from __future__ import annotations

import numpy as np
import torch

from qwenkit.checkpoint import quants
from qwenkit.checkpoint.quants import (
    _REC_Q2_K, _REC_Q3_K, _REC_Q4_0, _REC_Q4_1, _REC_Q4_K, _REC_Q5_0, _REC_Q5_1, _REC_Q5_K, _REC_Q6_K, _REC_Q8_0,
    QUANT_SIZES, GGMLType, _bit_planes, _crumbs, _half, _k_d_dm, _nibbles, _q5_values, checked_type,
)
from qwenkit.errors import BadCheckpoint
from qwenkit.quant.formats import Int4Grouped, Int8Grouped

__all__ = ["convert", "CONVERTIBLE", "target_format"]

_F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Per-type chunk converters. ``r`` is a record view of nb blocks; ``q`` (int8 (nb, block)) or ``p`` (uint8
# (nb, block // 2)) and ``s`` / ``o`` (float32 (nb, groups per block)) are views into the outputs.


def _q8_0(r, q, s, o):
    np.copyto(q, r["qs"])
    np.copyto(s, r["d"][:, None], casting="same_kind")  # fp16 -> fp32, exact


def _q5_0(r, q, s, o):
    v = _q5_values(r, r.shape[0]).view(np.int8)
    np.subtract(v, np.int8(16), out=q)
    np.copyto(s, r["d"][:, None], casting="same_kind")


def _q5_1(r, q, s, o):
    np.copyto(q, _q5_values(r, r.shape[0]).view(np.int8))
    np.copyto(s, r["d"][:, None], casting="same_kind")
    np.copyto(o, r["m"][:, None], casting="same_kind")


def _q6_k(r, q, s, o):
    nb = r.shape[0]
    np.multiply(_half(r["d"]), r["scales"], out=s, dtype=_F32)  # gguf: d * scales.astype(f32)
    v = _nibbles(r["ql"], nb, 2, 64).reshape((nb, 8, 32))
    qh = _crumbs(r["qh"], nb, 2).reshape((nb, 8, 32))
    np.multiply(qh, np.uint8(16), out=qh)  # << 4
    np.bitwise_or(v, qh, out=v)
    np.subtract(v.view(np.int8), np.int8(32), out=q.reshape((nb, 8, 32)))


def _q5_k(r, q, s, o):
    nb = r.shape[0]
    d, dm = _k_d_dm(r, nb)
    np.copyto(s, d.reshape((nb, 8)))
    np.negative(dm.reshape((nb, 8)), out=o)
    v = _nibbles(r["qs"], nb, 4, 32).reshape((nb, 8, 32))
    np.bitwise_or(v, _bit_planes(r["qh"], nb, 16), out=q.reshape((nb, 8, 32)).view(np.uint8))


def _q4_0(r, p, s, o):
    np.copyto(p, r["qs"])  # same nibble order as ours: no shuffling
    np.copyto(s, r["d"][:, None], casting="same_kind")
    np.multiply(s, _F32(-8.0), out=o)  # exact


def _q4_1(r, p, s, o):
    np.copyto(p, r["qs"])
    np.copyto(s, r["d"][:, None], casting="same_kind")
    np.copyto(o, r["m"][:, None], casting="same_kind")


def _q4_k(r, p, s, o):
    nb = r.shape[0]
    d, dm = _k_d_dm(r, nb)
    np.copyto(s, d.reshape((nb, 8)))
    np.negative(dm.reshape((nb, 8)), out=o)
    # gguf: 4 runs of 32 bytes; run i holds sub-block 2i in its low nibbles and 2i+1 in its high nibbles.
    # Ours, per sub-block of 32: byte j = element j | element j+16 << 4.
    qs = r["qs"].reshape((nb, 4, 2, 16))
    lo, hi = qs[:, :, 0], qs[:, :, 1]  # bytes 0..15 and 16..31 of each run
    out = p.reshape((nb, 4, 2, 16))
    even, odd = out[:, :, 0], out[:, :, 1]
    np.bitwise_and(lo, np.uint8(0x0F), out=even)
    t = np.multiply(hi, np.uint8(16))  # (hi & 0xF) << 4, wrapping
    np.bitwise_or(even, t, out=even)
    np.right_shift(lo, np.uint8(4), out=odd)
    np.bitwise_and(hi, np.uint8(0xF0), out=t)
    np.bitwise_or(odd, t, out=odd)


def _pack16(v, p, nb):
    """uint8 (nb, 16, 16) values 0..15 in groups of 16 -> p (nb, 128): byte j = v[j] | v[j + 8] << 4."""
    out = p.reshape((nb, 16, 8))
    np.multiply(v[:, :, 8:], np.uint8(16), out=out)
    np.bitwise_or(out, v[:, :, :8], out=out)


def _q3_k(r, p, s, o):
    nb = r.shape[0]
    scales = r["scales"]
    lsc = (scales[:, :8].reshape((nb, 1, 8)) >> quants._SH_Q3_L).reshape((nb, 16))
    hsc = (scales[:, 8:].reshape((nb, 1, 4)) >> quants._SH_Q3_H).reshape((nb, 16))
    sc = ((lsc & np.uint8(0x0F)) | ((hsc & np.uint8(0x03)) * np.uint8(16))).view(np.int8)
    np.subtract(sc, np.int8(32), out=sc)
    np.multiply(_half(r["d"]), sc, out=s, dtype=_F32)  # gguf: dl = d * (sc - 32)
    np.multiply(s, _F32(-4.0), out=o)  # exact
    v = _crumbs(r["qs"], nb, 2).reshape((nb, 8, 32))
    np.add(v, _bit_planes(r["hmask"], nb, 4), out=v)  # q3 + 4 = low 2 bits + 4 * hmask bit, 0..7
    _pack16(v.reshape((nb, 16, 16)), p, nb)


def _q2_k(r, p, s, o):
    nb = r.shape[0]
    sc = r["scales"]
    np.multiply(_half(r["d"]), sc & np.uint8(0x0F), out=s, dtype=_F32)  # gguf: dl
    np.multiply(_half(r["dmin"]), sc >> np.uint8(4), out=o, dtype=_F32)  # gguf: ml
    np.negative(o, out=o)
    _pack16(_crumbs(r["qs"], nb, 2).reshape((nb, 16, 16)), p, nb)


# type -> (record dtype, converter, format class, group, has offset)
_CONVERTERS = {
    GGMLType.Q8_0: (_REC_Q8_0, _q8_0, Int8Grouped, 32, False),
    GGMLType.Q5_0: (_REC_Q5_0, _q5_0, Int8Grouped, 32, False),
    GGMLType.Q5_1: (_REC_Q5_1, _q5_1, Int8Grouped, 32, True),
    GGMLType.Q6_K: (_REC_Q6_K, _q6_k, Int8Grouped, 16, False),
    GGMLType.Q5_K: (_REC_Q5_K, _q5_k, Int8Grouped, 32, True),
    GGMLType.Q4_0: (_REC_Q4_0, _q4_0, Int4Grouped, 32, True),
    GGMLType.Q4_1: (_REC_Q4_1, _q4_1, Int4Grouped, 32, True),
    GGMLType.Q4_K: (_REC_Q4_K, _q4_k, Int4Grouped, 32, True),
    GGMLType.Q3_K: (_REC_Q3_K, _q3_k, Int4Grouped, 16, True),
    GGMLType.Q2_K: (_REC_Q2_K, _q2_k, Int4Grouped, 16, True),
}

CONVERTIBLE: frozenset[GGMLType] = frozenset(_CONVERTERS)


def _qtype(qtype: GGMLType | int) -> GGMLType:
    return checked_type(qtype, CONVERTIBLE, "cannot be converted to a grouped int8/int4 format (convertible: {names})")


def target_format(qtype: GGMLType | int) -> tuple[type, int]:
    """(Int8Grouped or Int4Grouped, group size) that ``convert`` produces for ``qtype``."""
    _, _, cls, group, _ = _CONVERTERS[_qtype(qtype)]
    return cls, group


def convert(raw: np.ndarray, qtype: GGMLType | int, shape: tuple[int, int]) -> Int8Grouped | Int4Grouped:
    """Convert a 2-D GGUF tensor's bytes ``raw`` (uint8, e.g. ``GGUFFile.raw(name)``) of ggml type ``qtype`` and
    PyTorch shape ``shape`` = (N, K) into its grouped format (table in the module docstring).

    The outputs are new tensors (``raw`` may be a read-only memory map and can be released afterwards).
    Raises UnsupportedModel for a type with no exact grouped form, BadCheckpoint for a shape or size mismatch.
    """
    qtype = _qtype(qtype)
    rec, fn, cls, group, has_offset = _CONVERTERS[qtype]
    if len(shape) != 2:
        raise BadCheckpoint(f"{qtype.name}: grouped formats are 2-D, got shape {list(shape)}")
    n, k = (int(x) for x in shape)
    bs, ts = QUANT_SIZES[qtype]
    if n < 0 or k <= 0 or k % bs:
        raise BadCheckpoint(f"{qtype.name}: rows of {k} elements are not a whole number of blocks of {bs}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raw = raw.reshape(-1).view(np.uint8)
    row_bytes = k // bs * ts
    if raw.shape[0] != n * row_bytes:
        raise BadCheckpoint(f"{qtype.name} tensor of shape {[n, k]} needs {n * row_bytes} bytes, got {raw.shape[0]}")

    groups = k // group
    gpb = bs // group  # groups per block
    scale = np.empty((n, groups), dtype=_F32)
    offset = np.empty((n, groups), dtype=_F32) if has_offset else None
    if cls is Int8Grouped:
        vals = np.empty((n, k), dtype=np.int8)
    else:
        vals = np.empty((n, k // 2), dtype=np.uint8)
    vpb = vals.shape[1] * bs // k  # value bytes per block
    step = max(1, quants.CHUNK_ELEMENTS // k)
    for a in range(0, n, step):
        b = min(a + step, n)
        nb = (b - a) * (k // bs)
        r = raw[a * row_bytes:b * row_bytes].view(rec)
        fn(r, vals[a:b].reshape((nb, vpb)), scale[a:b].reshape((nb, gpb)),
           None if offset is None else offset[a:b].reshape((nb, gpb)))

    t_off = None if offset is None else torch.from_numpy(offset)
    if cls is Int8Grouped:
        return Int8Grouped(torch.from_numpy(vals), torch.from_numpy(scale), t_off, group)
    return Int4Grouped(torch.from_numpy(vals), torch.from_numpy(scale), t_off, group)
