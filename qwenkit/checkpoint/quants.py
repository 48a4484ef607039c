"""ggml tensor types: ids, block sizes, and bit-exact numpy dequantization.

The ids and block sizes are those of llama.cpp's ggml (copied from gguf-py's ``GGMLQuantizationType`` and
``GGML_QUANT_SIZES`` so that names agree; a unit test keeps them in sync). ``dequantize`` reproduces
``gguf.quants.dequantize`` bit for bit: every float operation is done in float32 in the same order and on the
same operands as gguf-py does it (no fused multiply-add, no reassociation), only vectorised differently and run
over bounded chunks of blocks, writing straight into a preallocated output.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from qwenkit.errors import BadCheckpoint, UnsupportedModel

__all__ = [
    "GGMLType",
    "QUANT_SIZES",
    "DEQUANTIZABLE",
    "CHUNK_ELEMENTS",
    "block_size",
    "tensor_nbytes",
    "dequantize",
]


class GGMLType(IntEnum):
    """ggml tensor type ids, as stored in a GGUF tensor info (same names and values as gguf-py)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


QK_K = 256

# type -> (elements per block, bytes per block)
QUANT_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: (256, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: (256, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (256, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: (256, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: (256, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: (256, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.NVFP4: (64, 4 + 32),
    GGMLType.Q1_0: (128, 2 + 16),
}

# Elements dequantized per step; bounds the temporaries to a few MiB whatever the tensor size.
CHUNK_ELEMENTS = 1 << 18

_F32 = np.float32


def block_size(qtype: GGMLType) -> int:
    return QUANT_SIZES[GGMLType(qtype)][0]


def tensor_nbytes(qtype: GGMLType, n_elements: int) -> int:
    """Bytes that ``n_elements`` values of type ``qtype`` occupy (a whole number of blocks)."""
    bs, ts = QUANT_SIZES[GGMLType(qtype)]
    if n_elements < 0 or n_elements % bs:
        raise BadCheckpoint(f"{n_elements} elements is not a whole number of {GGMLType(qtype).name} blocks of {bs}")
    return n_elements // bs * ts


# ---------------------------------------------------------------------------------------------------------------
# Block decoders. Each takes ``r``, a structured (record) view of a chunk of raw blocks with shape (nb,), and
# ``o``, the float32 output for those blocks with shape (nb, block_size), and fills ``o``. The comments name the
# gguf-py expression each float operation reproduces.


def _rec(*fields: tuple) -> np.dtype:
    return np.dtype(list(fields))


def _half(field: np.ndarray) -> np.ndarray:
    """fp16 field (nb,) -> float32 (nb, 1); exact, like gguf's ``d.view(np.float16).astype(np.float32)``."""
    return field.astype(_F32)[:, None]


def _nibbles(qs: np.ndarray, nb: int, groups: int, width: int) -> np.ndarray:
    """(nb, groups*width) bytes -> uint8 (nb, groups, 2, width): low nibbles then high nibbles of each group."""
    q = np.empty((nb, groups, 2, width), dtype=np.uint8)
    src = qs.reshape((nb, groups, width))
    np.bitwise_and(src, np.uint8(0x0F), out=q[:, :, 0])
    np.right_shift(src, np.uint8(4), out=q[:, :, 1])
    return q


def _crumbs(qs: np.ndarray, nb: int, groups: int) -> np.ndarray:
    """(nb, groups*32) bytes -> uint8 (nb, groups, 4, 32): bits 0-1, 2-3, 4-5, 6-7 of each group of 32 bytes
    (gguf: ``(qs.reshape((nb, -1, 1, 32)) >> [0, 2, 4, 6]) & 3``). One scalar shift per position: numpy's
    broadcast shift by an array is much slower."""
    q = np.empty((nb, groups, 4, 32), dtype=np.uint8)
    src = np.ascontiguousarray(qs).reshape((nb, groups, 32))
    np.copyto(q[:, :, 0], src)
    for k in (1, 2, 3):
        np.right_shift(src, np.uint8(2 * k), out=q[:, :, k])
    np.bitwise_and(q, np.uint8(3), out=q)
    return q


def _bit_planes(mask: np.ndarray, nb: int, value: int) -> np.ndarray:
    """(nb, 32) bytes -> uint8 (nb, 8, 32) view: [j, l] = ``value`` if bit j of byte l is set, else 0
    (gguf: ``((m >> [0..7]) & 1) * value``)."""
    bits = np.unpackbits(np.ascontiguousarray(mask).reshape(-1), bitorder="little")
    np.multiply(bits, np.uint8(value), out=bits)
    return bits.reshape((nb, 32, 8)).transpose((0, 2, 1))


_REC_Q8_0 = _rec(("d", "<f2"), ("qs", "i1", (32,)))


def _deq_q8_0(r: np.ndarray, o: np.ndarray) -> None:
    # gguf: x.view(int8).astype(f32) * d
    np.multiply(r["qs"], _half(r["d"]), out=o, dtype=_F32)


_REC_Q4_0 = _rec(("d", "<f2"), ("qs", "u1", (16,)))


def _deq_q4_0(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    q = _nibbles(r["qs"], nb, 1, 16).reshape((nb, 32)).view(np.int8)
    np.subtract(q, np.int8(8), out=q)
    # gguf: d * (nibble.astype(int8) - 8).astype(f32)
    np.multiply(_half(r["d"]), q, out=o, dtype=_F32)


_REC_Q4_1 = _rec(("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,)))


def _deq_q4_1(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    q = _nibbles(r["qs"], nb, 1, 16).reshape((nb, 32))
    # gguf: (d * q.astype(f32)) + m
    np.multiply(_half(r["d"]), q, out=o, dtype=_F32)
    np.add(o, _half(r["m"]), out=o)


def _q5_values(r: np.ndarray, nb: int) -> np.ndarray:
    """uint8 (nb, 32) 5-bit values of a Q5_0/Q5_1 block: nibble | (bit i of the little-endian qh) << 4."""
    q = _nibbles(r["qs"], nb, 1, 16).reshape((nb, 32))
    hb = np.unpackbits(np.ascontiguousarray(r["qh"]).reshape(-1), bitorder="little")  # bit i of qh at index i
    np.multiply(hb, np.uint8(16), out=hb)  # << 4 (numpy's uint8 multiply is vectorised, its shift is not)
    np.bitwise_or(q, hb.reshape((nb, 32)), out=q)
    return q


_REC_Q5_0 = _rec(("d", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (16,)))


def _deq_q5_0(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    q = _q5_values(r, nb).view(np.int8)
    np.subtract(q, np.int8(16), out=q)
    # gguf: d * (q.astype(int8) - 16).astype(f32)
    np.multiply(_half(r["d"]), q, out=o, dtype=_F32)


_REC_Q5_1 = _rec(("d", "<f2"), ("m", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (16,)))


def _deq_q5_1(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    q = _q5_values(r, nb)
    # gguf: (d * q.astype(f32)) + m
    np.multiply(_half(r["d"]), q, out=o, dtype=_F32)
    np.add(o, _half(r["m"]), out=o)


_REC_Q2_K = _rec(("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2"))


def _deq_q2_k(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    sc = r["scales"]
    # gguf: dl = d * (scales & 0xF).astype(f32); ml = dmin * (scales >> 4).astype(f32)
    dl = np.multiply(_half(r["d"]), sc & np.uint8(0x0F), dtype=_F32).reshape((nb, 16, 1))
    ml = np.multiply(_half(r["dmin"]), sc >> np.uint8(4), dtype=_F32).reshape((nb, 16, 1))
    q = _crumbs(r["qs"], nb, 2).reshape((nb, 16, 16))
    o3 = o.reshape((nb, 16, 16))
    # gguf: dl * q.astype(f32) - ml
    np.multiply(dl, q, out=o3, dtype=_F32)
    np.subtract(o3, ml, out=o3)


_REC_Q3_K = _rec(("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2"))
_SH_Q3_L = np.array([0, 4], dtype=np.uint8).reshape((1, 2, 1))
_SH_Q3_H = np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 4, 1))


def _deq_q3_k(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    scales = r["scales"]
    lsc = (scales[:, :8].reshape((nb, 1, 8)) >> _SH_Q3_L).reshape((nb, 16))
    hsc = (scales[:, 8:].reshape((nb, 1, 4)) >> _SH_Q3_H).reshape((nb, 16))
    sc = (lsc & np.uint8(0x0F)) | ((hsc & np.uint8(0x03)) * np.uint8(16))
    sc = sc.view(np.int8)
    np.subtract(sc, np.int8(32), out=sc)
    # gguf: dl = d * (scales.astype(int8) - 32).astype(f32)
    dl = np.multiply(_half(r["d"]), sc, dtype=_F32).reshape((nb, 16, 1))
    q = _crumbs(r["qs"], nb, 2).reshape((nb, 8, 32)).view(np.int8)
    # gguf: ql - ((hmask bit ^ 1) << 2) == ql + 4 * bit - 4, in int8 (values -4..3)
    np.add(q, _bit_planes(r["hmask"], nb, 4).view(np.int8), out=q)
    np.subtract(q, np.int8(4), out=q)
    # gguf: dl * q.astype(f32)
    np.multiply(dl, q.reshape((nb, 16, 16)), out=o.reshape((nb, 16, 16)), dtype=_F32)


def _k_scale_min(scales: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit (scale, min) pairs of Q4_K/Q5_K -> two uint8 (nb, 8) arrays."""
    s = scales.reshape((nb, 3, 4))
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.empty((nb, 8), dtype=np.uint8)
    mn = np.empty((nb, 8), dtype=np.uint8)
    np.bitwise_and(d, np.uint8(0x3F), out=sc[:, :4])
    np.bitwise_or(md & np.uint8(0x0F), (d >> np.uint8(2)) & np.uint8(0x30), out=sc[:, 4:])
    np.bitwise_and(m, np.uint8(0x3F), out=mn[:, :4])
    np.bitwise_or(md >> np.uint8(4), (m >> np.uint8(2)) & np.uint8(0x30), out=mn[:, 4:])
    return sc, mn


def _k_d_dm(r: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    sc, mn = _k_scale_min(r["scales"], nb)
    # gguf: d = d * sc.astype(f32); dm = dmin * m.astype(f32)
    d = np.multiply(_half(r["d"]), sc, dtype=_F32).reshape((nb, 8, 1))
    dm = np.multiply(_half(r["dmin"]), mn, dtype=_F32).reshape((nb, 8, 1))
    return d, dm


_REC_Q4_K = _rec(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,)))


def _deq_q4_k(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    d, dm = _k_d_dm(r, nb)
    q = _nibbles(r["qs"], nb, 4, 32).reshape((nb, 8, 32))
    o3 = o.reshape((nb, 8, 32))
    # gguf: d * q.astype(f32) - dm
    np.multiply(d, q, out=o3, dtype=_F32)
    np.subtract(o3, dm, out=o3)


_REC_Q5_K = _rec(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (32,)), ("qs", "u1", (128,)))


def _deq_q5_k(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    d, dm = _k_d_dm(r, nb)
    q = _nibbles(r["qs"], nb, 4, 32).reshape((nb, 8, 32))
    np.bitwise_or(q, _bit_planes(r["qh"], nb, 16), out=q)  # q | qh_bit << 4
    o3 = o.reshape((nb, 8, 32))
    # gguf: d * q.astype(f32) - dm
    np.multiply(d, q, out=o3, dtype=_F32)
    np.subtract(o3, dm, out=o3)


_REC_Q6_K = _rec(("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2"))


def _deq_q6_k(r: np.ndarray, o: np.ndarray) -> None:
    nb = r.shape[0]
    # gguf: d = (d * scales.astype(f32))
    dsc = np.multiply(_half(r["d"]), r["scales"], dtype=_F32).reshape((nb, 16, 1))
    q = _nibbles(r["ql"], nb, 2, 64).reshape((nb, 8, 32))
    qh = _crumbs(r["qh"], nb, 2).reshape((nb, 8, 32))
    np.multiply(qh, np.uint8(16), out=qh)  # << 4
    np.bitwise_or(q, qh, out=q)
    qi = q.view(np.int8)
    np.subtract(qi, np.int8(32), out=qi)
    # gguf: d * (q.astype(int8) - 32).astype(f32)
    np.multiply(dsc, qi.reshape((nb, 16, 16)), out=o.reshape((nb, 16, 16)), dtype=_F32)


_BLOCK_DECODERS = {
    GGMLType.Q8_0: (_REC_Q8_0, _deq_q8_0),
    GGMLType.Q4_0: (_REC_Q4_0, _deq_q4_0),
    GGMLType.Q4_1: (_REC_Q4_1, _deq_q4_1),
    GGMLType.Q5_0: (_REC_Q5_0, _deq_q5_0),
    GGMLType.Q5_1: (_REC_Q5_1, _deq_q5_1),
    GGMLType.Q2_K: (_REC_Q2_K, _deq_q2_k),
    GGMLType.Q3_K: (_REC_Q3_K, _deq_q3_k),
    GGMLType.Q4_K: (_REC_Q4_K, _deq_q4_k),
    GGMLType.Q5_K: (_REC_Q5_K, _deq_q5_k),
    GGMLType.Q6_K: (_REC_Q6_K, _deq_q6_k),
}
for _t, (_r, _) in _BLOCK_DECODERS.items():
    assert _r.itemsize == QUANT_SIZES[_t][1], _t

DEQUANTIZABLE: frozenset[GGMLType] = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, *_BLOCK_DECODERS})


def _deq_float(raw: np.ndarray, qtype: GGMLType, out: np.ndarray) -> None:
    """F32 / F16 / BF16, element-wise, in chunks (F32 is a straight copy out of ``raw``)."""
    n = out.shape[0]
    if qtype == GGMLType.F32:
        np.copyto(out, raw.view("<f4"))
        return
    if qtype == GGMLType.F16:
        np.copyto(out, raw.view("<f2"), casting="safe")  # gguf: view(float16).astype(float32), exact
        return
    # BF16, gguf: (int16 -> int32 << 16).view(float32): the bf16 bits become the high half of the f32 bits
    src = raw.view("<u2")
    bits = out.view(np.uint32)
    for a in range(0, n, CHUNK_ELEMENTS):
        b = min(a + CHUNK_ELEMENTS, n)
        np.copyto(bits[a:b], src[a:b], casting="safe")
        np.left_shift(bits[a:b], np.uint32(16), out=bits[a:b])


def checked_type(qtype: GGMLType | int, allowed: frozenset, reason: str) -> GGMLType:
    """`qtype` as a GGMLType if it is in `allowed`; else UnsupportedModel saying `reason` ({names}: the allowed)."""
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        raise UnsupportedModel(f"unknown ggml tensor type id {int(qtype)}") from None
    if qtype not in allowed:
        names = ", ".join(t.name for t in sorted(allowed))
        raise UnsupportedModel(f"ggml tensor type {qtype.name} {reason.format(names=names)}")
    return qtype


def dequantize(raw: np.ndarray, qtype: GGMLType | int, n_elements: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode ``n_elements`` values of ggml type ``qtype`` from the bytes ``raw`` into float32.

    ``raw`` is a 1-D uint8 array (e.g. a view into a memory map) of exactly ``tensor_nbytes(qtype, n_elements)``
    bytes. Returns a flat float32 array of ``n_elements``; with ``out`` (a C-contiguous float32 array of
    ``n_elements``, any shape) the values are written into it and ``out`` is returned. Equal bit for bit to
    ``gguf.quants.dequantize``. Raises UnsupportedModel for a type it cannot decode.
    """
    qtype = checked_type(qtype, DEQUANTIZABLE, "is not supported (qwenkit reads {names})")
    n_elements = int(n_elements)
    nbytes = tensor_nbytes(qtype, n_elements)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raw = raw.reshape(-1).view(np.uint8)
    if raw.shape[0] != nbytes:
        raise BadCheckpoint(f"{qtype.name} data of {n_elements} elements needs {nbytes} bytes, got {raw.shape[0]}")
    if out is None:
        flat = np.empty(n_elements, dtype=_F32)
        result = flat
    else:
        if out.dtype != _F32 or out.size != n_elements or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"out must be a writable C-contiguous float32 array of {n_elements} elements, got "
                             f"{out.dtype} {out.shape}")
        flat = out.reshape(-1)
        result = out
    if n_elements == 0:
        return result

    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        _deq_float(raw, qtype, flat)
        return result

    rec_dtype, decode = _BLOCK_DECODERS[qtype]
    bs, ts = QUANT_SIZES[qtype]
    n_blocks = n_elements // bs
    step = max(1, CHUNK_ELEMENTS // bs)
    blocks_out = flat.reshape((n_blocks, bs))
    for a in range(0, n_blocks, step):
        b = min(a + step, n_blocks)
        decode(raw[a * ts:b * ts].view(rec_dtype), blocks_out[a:b])
    return result
