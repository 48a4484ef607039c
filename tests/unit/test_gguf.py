"""GGUF reading and dequantization: bit-exact against gguf-py, metadata round trips, and hostile files.

Files are written with gguf-py's GGUFWriter (the peer) or assembled byte by byte with struct for the corrupt ones.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch

from qwenkit.checkpoint import quants
from qwenkit.checkpoint.gguf import GGUFFile, GGUFTensor, GGUFValueType
from qwenkit.checkpoint.quants import DEQUANTIZABLE, QUANT_SIZES, GGMLType, dequantize, tensor_nbytes
from qwenkit.errors import BadCheckpoint, QwenkitError, UnsupportedModel

try:
    import gguf
    import gguf.quants as gq
except ImportError:  # the peer is optional; the hostile-file tests below do not need it
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="gguf (gguf-py) not installed")

K_QUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
# Types gguf-py can quantize (so we can feed it real-looking data).
QUANTIZABLE = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
               GGMLType.Q5_1, GGMLType.Q8_0]
# Byte offsets of the fp16 scale fields inside one block, from ggml-common.h (independent of our decoders).
FP16_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2), GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
# Shapes in PyTorch order: a vector, a matrix with several rows, stacked MoE experts.
SHAPES = [(512,), (5, 512), (3, 4, 256)]


def _bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32)


def _random_raw(qtype: GGMLType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random blocks in gguf's byte shape (rows, bytes per row), every fp16 scale a finite random value."""
    bs, ts = QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    raw = rng.integers(0, 256, size=(n // bs, ts), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, ()):
        raw[:, off:off + 2] = (rng.standard_normal(n // bs) * 0.05).astype("<f2").view(np.uint8).reshape(-1, 2)
    return raw.reshape((*shape[:-1], shape[-1] // bs * ts))


def _write(path, tensors: dict[str, tuple[np.ndarray, GGMLType | None]], kv=None, arch="qwen2"):
    w = gguf.GGUFWriter(str(path), arch)
    for key, (val, vtype, sub) in (kv or {}).items():
        w.add_key_value(key, val, vtype, sub_type=sub)
    for name, (arr, raw_dtype) in tensors.items():
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType(int(raw_dtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(arr: np.ndarray, qtype: GGMLType) -> np.ndarray:
    if arr.dtype != np.uint8:  # plain F32 / F16 array written as such
        arr = arr.view(np.uint8)
    return gq.dequantize(arr, gguf.GGMLQuantizationType(int(qtype)))


# ---------------------------------------------------------------------------------------------------------------
# type table


@pytest.mark.peer
@needs_gguf
def test_type_ids_and_sizes_agree_with_gguf():
    assert {t.name: t.value for t in GGMLType} == {t.name: t.value for t in gguf.GGMLQuantizationType}
    assert {t.name: v for t, v in QUANT_SIZES.items()} == {t.name: v for t, v in gguf.GGML_QUANT_SIZES.items()}


def test_tensor_nbytes():
    assert tensor_nbytes(GGMLType.Q4_K, 512) == 288
    assert tensor_nbytes(GGMLType.F32, 3) == 12
    assert tensor_nbytes(GGMLType.Q8_0, 0) == 0
    with pytest.raises(BadCheckpoint):
        tensor_nbytes(GGMLType.Q8_0, 33)


def test_unsupported_types_raise_naming_the_type():
    with pytest.raises(UnsupportedModel, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, 256)
    with pytest.raises(UnsupportedModel, match="99"):
        dequantize(np.zeros(4, np.uint8), 99, 1)
    with pytest.raises(BadCheckpoint):
        dequantize(np.zeros(10, np.uint8), GGMLType.Q8_0, 32)


# ---------------------------------------------------------------------------------------------------------------
# bit-exact dequantization through a real file


@pytest.mark.peer
@needs_gguf
@pytest.mark.parametrize("qtype", sorted(DEQUANTIZABLE), ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_matches_gguf_bit_for_bit(tmp_path, qtype, shape):
    rng = np.random.default_rng(int(qtype) * 100 + len(shape))
    tensors: dict[str, tuple[np.ndarray, GGMLType | None]] = {}
    if qtype in QUANTIZABLE:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        q = gq.quantize(data, gguf.GGMLQuantizationType(int(qtype)))
        tensors["w.quantized"] = (q, None if qtype in (GGMLType.F32, GGMLType.F16) else qtype)
    if qtype in FP16_FIELDS:
        tensors["w.random"] = (_random_raw(qtype, shape, rng), qtype)
    elif qtype == GGMLType.BF16:  # every bit pattern, NaNs and infinities included: BF16 is a bit shuffle
        tensors["w.random"] = (rng.integers(0, 256, size=(*shape[:-1], shape[-1] * 2), dtype=np.uint8), qtype)
    path = _write(tmp_path / "t.gguf", tensors)

    with GGUFFile(path) as f:
        for name, (arr, _) in tensors.items():
            info = f.tensors[name]
            assert info.shape == shape and info.qtype == qtype and info.n_elements == int(np.prod(shape))
            assert info.nbytes == arr.nbytes
            raw = f.raw(name)
            assert not raw.flags.writeable and raw.tobytes() == arr.tobytes()
            ref = _reference(arr, qtype).reshape(shape)
            assert np.isfinite(ref).all() or name == "w.random"
            ours = f.dequantize(name)
            assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
            assert np.array_equal(_bits(ours), _bits(ref)), f"{qtype.name} {name} differs from gguf"
            # into a preallocated float32 tensor, and into bf16 / non-contiguous destinations (chunked path)
            out = torch.full(shape, 7.0)
            assert f.dequantize(name, out=out) is out and np.array_equal(_bits(out), _bits(ref))
            ref_t = torch.from_numpy(ref.copy())
            out16 = torch.empty(shape, dtype=torch.bfloat16)
            f.dequantize(name, out=out16)
            assert torch.equal(out16.view(torch.int16), ref_t.to(torch.bfloat16).view(torch.int16))
            if len(shape) >= 2:
                holder = torch.empty(tuple(reversed(shape)))
                nc = holder.permute(*reversed(range(len(shape))))
                assert not nc.is_contiguous() and tuple(nc.shape) == shape
                f.dequantize(name, out=nc)
                assert np.array_equal(_bits(nc.contiguous()), _bits(ref))


@pytest.mark.peer
@needs_gguf
@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.BF16, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K],
                         ids=lambda t: t.name)
def test_chunk_boundaries(tmp_path, monkeypatch, qtype):
    """Tiny chunks so that every path crosses many chunk boundaries, incl. ones inside a row."""
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 700)
    rng = np.random.default_rng(7)
    shape = (3, 5, 768)
    if qtype == GGMLType.F32:
        arr, raw_dtype = rng.standard_normal(shape).astype(np.float32), None
    elif qtype == GGMLType.BF16:
        arr, raw_dtype = rng.integers(0, 256, size=(3, 5, 768 * 2), dtype=np.uint8), qtype
    else:
        arr, raw_dtype = _random_raw(qtype, shape, rng), qtype
    path = _write(tmp_path / "c.gguf", {"x": (arr, raw_dtype)})
    ref = _reference(arr, qtype).reshape(shape)
    with GGUFFile(path) as f:
        assert np.array_equal(_bits(f.dequantize("x")), _bits(ref))
        out16 = torch.empty(shape, dtype=torch.float16)
        f.dequantize("x", out=out16)
        assert torch.equal(out16.view(torch.int16), torch.from_numpy(ref.copy()).half().view(torch.int16))
        nc = torch.empty(5, 3, 768).transpose(0, 1)
        f.dequantize("x", out=nc)
        assert np.array_equal(_bits(nc.contiguous()), _bits(ref))
        with pytest.raises(BadCheckpoint, match="shape"):
            f.dequantize("x", out=torch.empty(3, 5, 767))


@pytest.mark.peer
@needs_gguf
def test_known_but_unsupported_type_raises_on_dequantize_only(tmp_path):
    raw = np.zeros((2, 66), np.uint8)
    path = _write(tmp_path / "iq.gguf", {"blk.0.ffn_up.weight": (raw, GGMLType.IQ2_XXS)})
    with GGUFFile(path) as f:
        assert f.tensors["blk.0.ffn_up.weight"].shape == (2, 256)
        with pytest.raises(UnsupportedModel) as e:
            f.dequantize("blk.0.ffn_up.weight")
        msg = str(e.value)
        assert msg.startswith(str(path)) and "IQ2_XXS" in msg and "blk.0.ffn_up.weight" in msg


# ---------------------------------------------------------------------------------------------------------------
# metadata


@pytest.mark.peer
@needs_gguf
def test_metadata_round_trip_every_value_type(tmp_path):
    V = gguf.GGUFValueType
    kv = {
        "t.u8": (200, V.UINT8, None), "t.i8": (-100, V.INT8, None),
        "t.u16": (60000, V.UINT16, None), "t.i16": (-30000, V.INT16, None),
        "t.u32": (4_000_000_000, V.UINT32, None), "t.i32": (-2_000_000_000, V.INT32, None),
        "t.u64": (2**63 + 5, V.UINT64, None), "t.i64": (-(2**62), V.INT64, None),
        "t.f32": (0.1, V.FLOAT32, None), "t.f64": (0.1, V.FLOAT64, None),
        "t.true": (True, V.BOOL, None), "t.false": (False, V.BOOL, None),
        "t.str": ("héllo <|im_start|> 世界", V.STRING, None), "t.empty_str": ("", V.STRING, None),
        "t.arr_str": (["a", "", "Ġthe", "\u00e9\u4e16", "x" * 300], V.ARRAY, V.STRING),
        "t.arr_i32": ([1, -2, 3], V.ARRAY, V.INT32), "t.arr_u8": ([0, 255], V.ARRAY, V.UINT8),
        "t.arr_i64": ([-(2**40), 2**40], V.ARRAY, V.INT64), "t.arr_u64": ([2**64 - 1], V.ARRAY, V.UINT64),
        "t.arr_f32": ([0.5, -1.25], V.ARRAY, V.FLOAT32), "t.arr_f64": ([0.1], V.ARRAY, V.FLOAT64),
        "t.arr_bool": ([True, False, True], V.ARRAY, V.BOOL), "t.arr_i16": ([-5], V.ARRAY, V.INT16),
        "t.arr_u16": ([65535], V.ARRAY, V.UINT16), "t.arr_u32": ([7], V.ARRAY, V.UINT32),
        "t.arr_i8": ([-128, 127], V.ARRAY, V.INT8),
        "t.nested": ([[1, 2], [3]], V.ARRAY, V.ARRAY), "t.nested_str": ([["a", "b"], ["c"]], V.ARRAY, V.ARRAY),
        "general.alignment": (64, V.UINT32, None),
    }
    tok = [f"tok{i}" for i in range(5000)]
    kv["tokenizer.ggml.tokens"] = (tok, V.ARRAY, V.STRING)
    kv["tokenizer.ggml.token_type"] = (list(range(5000)), V.ARRAY, V.INT32)
    path = _write(tmp_path / "m.gguf", {"x": (np.arange(8, dtype=np.float32), None)}, kv=kv)
    with GGUFFile(path) as f:
        m = f.metadata
        assert f.version == 3 and f.architecture == "qwen2" and m["general.architecture"] == "qwen2"
        for key, (val, vtype, _) in kv.items():
            if vtype == V.FLOAT32:
                assert m[key] == float(np.float32(val)), key
            elif key == "t.arr_f32":
                assert m[key] == [0.5, -1.25]
            else:
                assert m[key] == val and type(m[key]) is type(val), key
        assert type(m["t.true"]) is bool and all(type(x) is bool for x in m["t.arr_bool"])
        assert f.metadata_types["t.u16"] == GGUFValueType.UINT16
        assert f.metadata_types["t.arr_str"] == (GGUFValueType.ARRAY, GGUFValueType.STRING)
        assert f.alignment == 64 and f.tensors["x"].offset % 64 == 0
        assert np.array_equal(f.dequantize("x").numpy(), np.arange(8, dtype=np.float32))


@pytest.mark.peer
@needs_gguf
def test_invalid_utf8_is_replaced_not_raised(tmp_path):
    path = _write(tmp_path / "u.gguf", {}, kv={"t.bad": (b"ok\xff\xfe", gguf.GGUFValueType.STRING, None)})
    with GGUFFile(path) as f:
        assert f.metadata["t.bad"] == "ok\ufffd\ufffd"
        assert f.tensors == {}


# ---------------------------------------------------------------------------------------------------------------
# hostile files, assembled by hand


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, val: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(val)


def _tinfo(name: str, ne: list[int], type_id: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset)


def _gguf(kvs: list[bytes] | None = None, tinfos: list[bytes] | None = None, data: bytes = b"",
          version: int = 3, magic: bytes = b"GGUF", n_kv: int | None = None, n_tensors: int | None = None,
          align: int = 32) -> bytes:
    kvs = [_kv_str("general.architecture", "qwen2")] if kvs is None else kvs
    tinfos = tinfos or []
    head = magic + struct.pack("<IQQ", version, len(tinfos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tinfos)
    body += b"\0" * (-len(body) % align)
    return body + data


def _valid() -> bytes:
    """Two Q8_0 tensors and one F32, data packed at 32-byte alignment."""
    q8 = np.zeros((2, 34), np.uint8)
    q8[:, :2] = np.array([0.5, 2.0], "<f2").view(np.uint8).reshape(2, 2)
    q8[:, 2:] = np.arange(32, dtype=np.int8).view(np.uint8)
    d0 = q8.tobytes()  # 68 bytes -> padded to 96
    d1 = np.arange(8, dtype="<f4").tobytes()
    tinfos = [_tinfo("blk.0.attn_q.weight", [32, 2], 8, 0), _tinfo("blk.3.ffn_up.weight", [8], 0, 96)]
    return _gguf(tinfos=tinfos, data=d0 + b"\0" * 28 + d1)


def _open_expecting(tmp_path, content: bytes | None, exc=BadCheckpoint, match: str | None = None, name="bad.gguf"):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(QwenkitError) as e:
        GGUFFile(path)
    assert isinstance(e.value, exc), f"{type(e.value).__name__}: {e.value}"
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_valid_hand_built_file(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_valid())
    with GGUFFile(path) as f:
        assert f.version == 3 and f.architecture == "qwen2"
        t = f.tensors["blk.0.attn_q.weight"]
        assert isinstance(t, GGUFTensor) and t.shape == (2, 32) and t.qtype is GGMLType.Q8_0 and t.nbytes == 68
        x = f.dequantize("blk.0.attn_q.weight")
        assert torch.equal(x[0], torch.arange(32.0) * 0.5) and torch.equal(x[1], torch.arange(32.0) * 2)
        assert torch.equal(f.dequantize("blk.3.ffn_up.weight"), torch.arange(8.0))
        with pytest.raises(BadCheckpoint, match="no tensor named nope"):
            f.raw("nope")
    with pytest.raises(ValueError):
        f.raw("blk.3.ffn_up.weight")


def test_missing_empty_and_directory(tmp_path):
    _open_expecting(tmp_path, None, match="no such file", name="missing.gguf")
    _open_expecting(tmp_path, b"", match="0 bytes", name="empty.gguf")
    (tmp_path / "dir.gguf").mkdir()
    _open_expecting(tmp_path, None, match="directory", name="dir.gguf")


def test_wrong_magic_and_versions(tmp_path):
    _open_expecting(tmp_path, b"GGML" + _valid()[4:], match="not a GGUF file")
    _open_expecting(tmp_path, b"PK\x03\x04" + b"\0" * 100, match="not a GGUF file")
    for v in (1, 4, 0xFFFF):
        _open_expecting(tmp_path, _gguf(version=v), match=f"unsupported GGUF version {v}")
    _open_expecting(tmp_path, b"GGUF" + struct.pack(">I", 3) + b"\0" * 40, exc=UnsupportedModel, match="big-endian")
    p = tmp_path / "v2.gguf"
    p.write_bytes(_gguf(version=2))
    with GGUFFile(p) as f:
        assert f.version == 2


def test_truncated_anywhere_in_the_header(tmp_path):
    good = _valid()
    header_end = len(good) - 96 - 32
    for cut in range(0, header_end):
        _open_expecting(tmp_path, good[:cut])


def test_truncated_in_tensor_data(tmp_path):
    good = _valid()
    msg = _open_expecting(tmp_path, good[:-1], match="truncated: tensor blk.3.ffn_up.weight needs bytes")
    assert f"but the file has {len(good) - 1} bytes" in msg
    _open_expecting(tmp_path, good[:-60], match="truncated: tensor blk.3.ffn_up.weight")


@pytest.mark.timeout(60)
def test_absurd_counts_fail_fast(tmp_path):
    tracemalloc.start()
    try:
        _absurd_counts(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"opening hostile files allocated {peak} bytes"


def _absurd_counts(tmp_path):
    _open_expecting(tmp_path, _gguf(n_kv=2**60), match="metadata count")
    _open_expecting(tmp_path, _gguf(n_tensors=2**60), match="tensor count")
    _open_expecting(tmp_path, _gguf(n_kv=2**64 - 1, n_tensors=2**64 - 1))
    # a string whose length runs past the end of the file
    _open_expecting(tmp_path, _gguf(kvs=[struct.pack("<Q", 2**62) + b"general.architecture"]), match="past the end")
    _open_expecting(tmp_path, _gguf(kvs=[_s("k") + struct.pack("<I", 8) + struct.pack("<Q", 10**12) + b"abc"]),
                    match="past the end")
    # arrays claiming far more items than the file could hold, flat and nested
    for item_type in (0, 6, 8, 10, 9):
        kv = _s("k") + struct.pack("<IIQ", 9, item_type, 2**61) + b"\0" * 16
        _open_expecting(tmp_path, _gguf(kvs=[kv]), match="claims")
    nested = _s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 2**50)
    _open_expecting(tmp_path, _gguf(kvs=[nested]), match="claims")
    # a tensor with absurd dimensions
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("w", [2**40, 2**40], 0, 0)]), match="truncated: tensor w")


def test_malformed_structure(tmp_path):
    arch = _kv_str("general.architecture", "qwen2")
    _open_expecting(tmp_path, _gguf(kvs=[arch, _s("k") + struct.pack("<I", 13) + b"\0" * 8]),
                    match="unknown value type 13")
    _open_expecting(tmp_path, _gguf(kvs=[arch, _s("k") + struct.pack("<IIQ", 9, 77, 1) + b"\0" * 8]),
                    match="unknown array item type 77")
    deep = _s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20 + struct.pack("<IQ", 0, 0)
    _open_expecting(tmp_path, _gguf(kvs=[deep]), match="nests arrays")
    _open_expecting(tmp_path, _gguf(kvs=[arch, arch]), match="duplicate metadata key")
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("w", [1, 1, 1, 1, 1], 0, 0)], data=b"\0" * 32),
                    match="5 dimensions")
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("w", [8], 0, 0), _tinfo("w", [8], 0, 32)], data=b"\0" * 64),
                    match="duplicate tensor name w")
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("w", [8], 0, 4)], data=b"\0" * 64), match="alignment")
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("w", [33], 8, 0)], data=b"\0" * 64), match="block size 32")
    al = _s("general.alignment") + struct.pack("<II", 4, 24)
    _open_expecting(tmp_path, _gguf(kvs=[arch, al]), match="power of two")
    _open_expecting(tmp_path, _gguf(tinfos=[_tinfo("blk.0.w", [32], 99, 0)], data=b"\0" * 64),
                    exc=UnsupportedModel, match="blk.0.w has unknown ggml type id 99")


def test_missing_architecture(tmp_path):
    p = tmp_path / "noarch.gguf"
    p.write_bytes(_gguf(kvs=[]))
    with GGUFFile(p) as f:
        with pytest.raises(BadCheckpoint, match="general.architecture"):
            f.architecture


@pytest.mark.timeout(60)
def test_random_corruption_only_raises_qwenkit_errors(tmp_path):
    """Flip bytes of a valid file at random (mostly in the header) and sometimes cut it short: every outcome is a
    clean open or a one-line QwenkitError naming the file."""
    good = bytearray(_valid())
    header_end = len(good) - 96 - 32
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    opened = 0
    for i in range(1500):
        bad = bytearray(good)
        limit = header_end if i % 4 else len(good)
        for pos in rng.integers(0, limit, size=rng.integers(1, 4)):
            bad[pos] = rng.integers(0, 256)
        if i % 5 == 0:
            bad = bad[:rng.integers(0, len(bad))]
        path.write_bytes(bytes(bad))
        try:
            with GGUFFile(path) as f:
                for name in f.tensors:
                    f.raw(name)
                    f.dequantize(name)
                opened += 1
        except QwenkitError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e), str(e)
    assert 0 < opened < 1500
