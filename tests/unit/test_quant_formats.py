"""Grouped int8 / int4 formats: exact conversion from GGUF blocks, nibble layout, quantization error bounds.

Tolerance for GGUF conversion: none. ``convert(...).dequantize()`` must give the same float32 values as
``qwenkit.checkpoint.quants.dequantize`` (itself bit-identical to gguf-py): the scales and offsets are the very
float32 values gguf-py computes and ``dequantize`` multiplies then adds, each rounded once. Bit for bit for every
type except Q4_0 and Q3_K, where ``d * (q - 8)`` is computed as ``q * d + (-8 * d)``: all terms are exact in
float32 (see from_gguf's docstring), so only the sign of a zero may differ (+0.0 for gguf's -0.0).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from qwenkit.checkpoint import quants
from qwenkit.checkpoint.gguf import GGUFFile
from qwenkit.checkpoint.quants import QUANT_SIZES, GGMLType, dequantize
from qwenkit.errors import BadCheckpoint, UnsupportedModel
from qwenkit.quant import formats, quantize as quantize_mod
from qwenkit.quant.formats import Int4Grouped, Int8Grouped
from qwenkit.quant.from_gguf import CONVERTIBLE, convert, target_format
from qwenkit.quant.quantize import quantize_int4, quantize_int8
from tests.unit.test_gguf import QUANTIZABLE, _random_raw, _write, gguf, needs_gguf

if gguf is not None:
    import gguf.quants as gq

EXPECTED = {  # type -> (format, group, has offset)
    GGMLType.Q8_0: (Int8Grouped, 32, False), GGMLType.Q5_0: (Int8Grouped, 32, False),
    GGMLType.Q5_1: (Int8Grouped, 32, True), GGMLType.Q6_K: (Int8Grouped, 16, False),
    GGMLType.Q5_K: (Int8Grouped, 32, True), GGMLType.Q4_0: (Int4Grouped, 32, True),
    GGMLType.Q4_1: (Int4Grouped, 32, True), GGMLType.Q4_K: (Int4Grouped, 32, True),
    GGMLType.Q3_K: (Int4Grouped, 16, True), GGMLType.Q2_K: (Int4Grouped, 16, True),
}
SIGNED_ZERO_ONLY = {GGMLType.Q4_0, GGMLType.Q3_K}


def _assert_same_values(ours: np.ndarray, ref: np.ndarray, qtype: GGMLType) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{qtype.name}: max abs diff {np.abs(ours - ref).max()}"
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    if qtype in SIGNED_ZERO_ONLY:
        assert (ref[differ] == 0).all()
    else:
        assert not differ.any(), f"{qtype.name}: {differ.sum()} values differ in their bits"


def test_every_expected_type_is_convertible():
    assert CONVERTIBLE == set(EXPECTED)
    for qtype, (cls, group, _) in EXPECTED.items():
        assert target_format(qtype) == (cls, group)


@pytest.mark.peer
@needs_gguf
@pytest.mark.parametrize("qtype", sorted(EXPECTED), ids=lambda t: t.name)
def test_convert_gguf_file_matches_dequantize(tmp_path, monkeypatch, qtype):
    rng = np.random.default_rng(int(qtype))
    shape = (6, 768)  # several rows; 3 K-quant blocks / 24 small blocks per row; 24..48 groups per row
    tensors = {"w.random": (_random_raw(qtype, shape, rng), qtype)}
    if qtype in QUANTIZABLE:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        tensors["w.quantized"] = (gq.quantize(data, gguf.GGMLQuantizationType(int(qtype))), qtype)
    path = _write(tmp_path / "q.gguf", tensors)
    cls, group, has_offset = EXPECTED[qtype]
    with GGUFFile(path) as f:
        for name in tensors:
            info = f.tensors[name]
            raw = f.raw(name)
            c = convert(raw, info.qtype, info.shape)
            assert type(c) is cls and c.group == group and c.shape == shape
            assert (c.offset is not None) == has_offset
            assert tuple(c.scale.shape) == (shape[0], shape[1] // group) and c.scale.dtype == torch.float32
            if cls is Int8Grouped:
                assert c.q.dtype == torch.int8 and tuple(c.q.shape) == shape
            else:
                assert c.packed.dtype == torch.uint8 and tuple(c.packed.shape) == (shape[0], shape[1] // 2)
                assert int(c.unpack().max()) <= 15
            assert c.nbytes == sum(t.nbytes for t in (getattr(c, "q", None) if cls is Int8Grouped else c.packed,
                                                      c.scale, c.offset) if t is not None)
            ref = dequantize(raw, info.qtype, info.n_elements).reshape(shape)
            ours = c.dequantize().numpy()
            _assert_same_values(ours, ref, qtype)
            # and against the peer itself
            peer = gq.dequantize(np.asarray(raw).reshape(shape[0], -1), gguf.GGMLQuantizationType(int(qtype)))
            assert np.array_equal(ours, peer.reshape(shape))
            # tiny chunks: conversion and dequantization cross many chunk boundaries, same result
            monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 700)
            monkeypatch.setattr(formats, "DEQUANT_CHUNK_ELEMENTS", 1000)
            c2 = convert(raw, info.qtype, info.shape)
            assert torch.equal(c2.scale, c.scale)
            assert torch.equal(c2.q if cls is Int8Grouped else c2.packed, c.q if cls is Int8Grouped else c.packed)
            assert np.array_equal(c2.dequantize().numpy().view(np.uint32), ours.view(np.uint32))
            monkeypatch.undo()



@pytest.mark.parametrize("fbgemm", [True, False])
@pytest.mark.parametrize("qtype", sorted(EXPECTED), ids=lambda t: t.name)
def test_auto_keeps_gguf_values_exact_without_block_kernels(tmp_path, qtype, fbgemm):
    """Where no C block kernel runs (not built, QWENKIT_KERNELS=none, a type they lack), `auto` takes the file's
    own groups, fbgemm or not: re-quantizing Q5_0/Q6_K/Q8_0 rows to int8 made greedy answers drift."""
    from qwenkit.quant.apply import gguf_format
    from qwenkit.quant.plan import FOUR_BIT, KernelPlan

    shape = (8, 256)
    path = _write(tmp_path / "q.gguf", {"w": (_random_raw(qtype, shape, np.random.default_rng(int(qtype))), qtype)})
    plan = KernelPlan(variant=None, bf16=False, fbgemm=fbgemm, vnni=True, threads=1)
    with GGUFFile(path) as f:
        got = gguf_format(f, "w", "auto", plan)
        ref = dequantize(f.raw("w"), qtype, shape[0] * shape[1]).reshape(shape)
    assert isinstance(got, EXPECTED[qtype][0]) and got.group == EXPECTED[qtype][1]
    assert np.array_equal(got.dequantize().numpy(), ref)
    # and the plan that `info --kernels` prints says so
    assert plan.linear(qtype.name, "auto")[0].startswith("int4 groups" if qtype.name in FOUR_BIT else "int8 groups")


def test_the_plan_says_auto_keeps_types_without_an_exact_form_in_float():
    from qwenkit.quant.plan import KernelPlan

    plan = KernelPlan(variant=None, bf16=False, fbgemm=True, vnni=True, threads=1)
    for name in ("IQ4_NL", "IQ2_XS", "Q8_1", "F16"):
        assert GGMLType[name] not in CONVERTIBLE
        assert plan.linear(name, "auto") == ("matmul fp32 (torch)", "matmul fp32 (torch)")

def test_q4_0_nibble_layout_is_kept():
    rng = np.random.default_rng(1)
    shape = (3, 96)
    raw = _random_raw(GGMLType.Q4_0, shape, rng)  # (3, 3 blocks * 18 bytes)
    blocks = raw.reshape(3, 3, 18)
    c = convert(raw, GGMLType.Q4_0, shape)
    assert isinstance(c, Int4Grouped) and c.group == 32
    assert np.array_equal(c.packed.numpy().reshape(3, 3, 16), blocks[:, :, 2:])  # qs bytes unchanged
    d = blocks[:, :, :2].copy().view("<f2")[..., 0].astype(np.float32)
    assert np.array_equal(c.scale.numpy(), d) and np.array_equal(c.offset.numpy(), -8 * d)
    # element j of a group is byte j's low nibble, element j + 16 its high nibble
    q = c.unpack().numpy().reshape(3, 3, 32)
    assert np.array_equal(q[..., :16], blocks[:, :, 2:] & 0x0F)
    assert np.array_equal(q[..., 16:], blocks[:, :, 2:] >> 4)


def test_int4_layout_by_hand():
    # g = 16: byte j of a group holds element j (low) and element j + 8 (high)
    q = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16  # two groups of 0..15
    packed = (q.reshape(1, 2, 16)[..., :8] | (q.reshape(1, 2, 16)[..., 8:] << 4)).reshape(1, 16)
    c = Int4Grouped(torch.from_numpy(packed), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), 16)
    assert torch.equal(c.unpack(), torch.from_numpy(q))
    expect = torch.cat([torch.arange(16.0) * 1 + 0.5, torch.arange(16.0) * 2 - 1]).view(1, 32)
    assert torch.equal(c.dequantize(), expect)
    assert c.shape == (1, 32) and c.nbytes == 16 + 8 + 8


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q6_K, GGMLType.Q4_K],
                         ids=lambda t: t.name)
def test_conversion_needs_no_fp32_copy(qtype):
    """A tensor 16 MiB in fp32: the conversion's temporaries beyond its outputs stay under 2 MiB."""
    shape = (2048, 2048)
    raw = _random_raw(qtype, shape, np.random.default_rng(3)).reshape(-1)
    tracemalloc.start()
    try:
        c = convert(raw, qtype, shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - c.nbytes < 2 << 20, f"{(peak - c.nbytes) / 2**20:.1f} MiB of temporaries"


def test_unsupported_types_raise_naming_the_type():
    for qtype in (GGMLType.IQ2_XXS, GGMLType.Q8_K, GGMLType.F16, GGMLType.Q8_1):
        bs, ts = QUANT_SIZES[qtype]
        with pytest.raises(UnsupportedModel, match=qtype.name):
            convert(np.zeros(ts * 256 // bs, np.uint8), qtype, (1, 256))
    with pytest.raises(UnsupportedModel, match="99"):
        convert(np.zeros(4, np.uint8), 99, (1, 1))


def test_convert_bad_shapes():
    with pytest.raises(BadCheckpoint, match="blocks of 256"):
        convert(np.zeros(144 * 2, np.uint8), GGMLType.Q4_K, (1, 384))  # 384 is not a whole number of Q4_K blocks
    with pytest.raises(BadCheckpoint, match="needs 68 bytes, got 34"):
        convert(np.zeros(34, np.uint8), GGMLType.Q8_0, (2, 32))
    with pytest.raises(BadCheckpoint, match="2-D"):
        convert(np.zeros(68, np.uint8), GGMLType.Q8_0, (1, 2, 32))


# ---------------------------------------------------------------------------------------------------------------
# quantization


def _weights(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[1, 3] = 4.0  # an outlier
    w[2] = 0.0  # an all-zero row (scale 0)
    w[3, :] = -0.25  # a constant row
    return torch.from_numpy(w)


def _per_element(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("group", [None, 32, 64, 256])
def test_quantize_int8_round_trip(group):
    w = _weights(np.random.default_rng(5), 7, 256)
    c = quantize_int8(w, group)
    g = 256 if group is None else group
    assert isinstance(c, Int8Grouped) and c.group == g and c.offset is None and c.shape == (7, 256)
    assert tuple(c.scale.shape) == (7, 256 // g) and c.nbytes == 7 * 256 + 7 * (256 // g) * 4
    assert int(c.q.abs().max()) == 127 and int(c.q.min()) >= -127
    deq = c.dequantize()
    gmax = _per_element(w.abs().view(7, -1, g).amax(-1), g)
    s = _per_element(c.scale, g)
    assert torch.all((w - deq).abs() <= s / 2 + 1e-6 * gmax + 1e-30)
    assert torch.equal(deq[2], w[2]) and torch.equal(deq[3], w[3])  # zero row; constant row maps to -127 * s
    # bf16 input, and tiny chunks, give the same as float32 input in one chunk
    w16 = w.bfloat16()
    assert torch.equal(quantize_int8(w16, group).q, quantize_int8(w16.float(), group).q)


def test_quantize_chunked_equals_whole(monkeypatch):
    w = _weights(np.random.default_rng(6), 9, 128)
    a8, a4 = quantize_int8(w, 32), quantize_int4(w, 32)
    monkeypatch.setattr(quantize_mod, "CHUNK_ELEMENTS", 200)  # one row per chunk
    b8, b4 = quantize_int8(w, 32), quantize_int4(w, 32)
    assert torch.equal(a8.q, b8.q) and torch.equal(a8.scale, b8.scale)
    assert torch.equal(a4.packed, b4.packed) and torch.equal(a4.scale, b4.scale) and torch.equal(a4.offset, b4.offset)


@pytest.mark.parametrize("group", [16, 32, 128])
def test_quantize_int4_round_trip(group):
    w = _weights(np.random.default_rng(7), 5, 256)
    c = quantize_int4(w, group)
    assert isinstance(c, Int4Grouped) and c.group == group and c.shape == (5, 256)
    assert tuple(c.packed.shape) == (5, 128) and tuple(c.offset.shape) == (5, 256 // group)
    q = c.unpack()
    assert int(q.max()) <= 15
    deq = c.dequantize()
    gmax = _per_element(w.abs().view(5, -1, group).amax(-1), group)
    s = _per_element(c.scale, group)
    assert torch.all((w - deq).abs() <= s / 2 + 1e-6 * gmax + 1e-30)
    assert torch.equal(deq[2], w[2]) and torch.equal(deq[3], w[3])  # constant groups come back exactly
    # each group's minimum is q = 0 (exact) and its maximum q = 15
    wg, qg = w.view(5, -1, group), q.view(5, -1, group)
    live = c.scale > 0
    assert torch.all(qg.gather(-1, wg.argmin(-1, keepdim=True))[..., 0][live] == 0)
    assert torch.all(qg.gather(-1, wg.argmax(-1, keepdim=True))[..., 0][live] == 15)
    assert torch.equal(c.offset, wg.amin(-1))


def test_quantize_bad_shapes():
    w = torch.randn(5, 100)
    with pytest.raises(ValueError, match="K=100 is not a multiple of the group size 32"):
        quantize_int8(w, 32)
    with pytest.raises(ValueError, match="K=100 is not a multiple of the group size 32"):
        quantize_int4(w, 32)
    with pytest.raises(ValueError, match="even"):
        quantize_int4(torch.randn(2, 30), 15)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(64))
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_int4(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    assert quantize_int8(torch.randn(3, 100)).group == 100  # per row: any K


def test_format_constructors_check_shapes():
    with pytest.raises(ValueError, match="not a multiple"):
        Int8Grouped(torch.zeros(2, 48, dtype=torch.int8), torch.zeros(2, 1), None, 32)
    with pytest.raises(ValueError, match="scale must be float32"):
        Int8Grouped(torch.zeros(2, 64, dtype=torch.int8), torch.zeros(2, 3), None, 32)
    with pytest.raises(ValueError, match="offset"):
        Int4Grouped(torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(2, 2), torch.zeros(2, 1), 32)
    with pytest.raises(ValueError, match="uint8"):
        Int4Grouped(torch.zeros(2, 32, dtype=torch.int8), torch.zeros(2, 2), torch.zeros(2, 2), 32)
