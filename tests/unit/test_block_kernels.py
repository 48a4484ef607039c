"""The CPU kernels of qwenkit.quant.native (csrc/): GGUF block matmuls and dequantization, decode attention.

References: gguf-py's dequantize (bit for bit), float64 products of the same int8 activations the kernel makes
(tolerance 1e-5 relative: only float32 accumulation order differs), and float64 attention (1e-5 absolute on
outputs of size ~1: float32 scores and an exp accurate to 2e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwenkit.engine.paged import _causal  # noqa: E402
from qwenkit.quant import native  # noqa: E402
from qwenkit.quant.blocks import BlockLinear, BlockWeight  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="the CPU kernels are not built for this machine")

NAMES = {2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
HALF_FIELDS = {2: [0], 6: [0], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}  # byte offsets of fp16 scales per block


def random_blocks(qtype: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any type: random bytes, with the fp16 scales set to finite values."""
    rng = np.random.default_rng(seed)
    per_block, nbytes = native.BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(n, k // per_block, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        d = rng.uniform(-0.02, 0.02, size=(n, k // per_block)).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, k // per_block, 2)
    return raw.reshape(n, -1)


def reference(raw: np.ndarray, qtype: int, n: int, k: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(n, k)


def quantized_activations(x: torch.Tensor) -> np.ndarray:
    """The kernel's int8 activations, dequantized: per 32 values, scale amax / 127, round half to even."""
    xb = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv)
    return (q.astype(np.float64) * (amax / np.float32(127.0)).astype(np.float64)).reshape(x.shape)


def layer(qtype: int, n: int, k: int, seed: int = 0) -> tuple[BlockLinear, np.ndarray, np.ndarray]:
    raw = random_blocks(qtype, n, k, seed)
    return BlockLinear([BlockWeight(torch.from_numpy(raw.copy()), qtype, (n, k))]), raw, reference(raw, qtype, n, k)


@pytest.mark.parametrize("qtype", sorted(NAMES), ids=NAMES.get)
@pytest.mark.parametrize("n", [8, 37])  # whole groups of 8 rows, and a remainder (interleaved types)
def test_dequantize_is_gguf_bit_for_bit(qtype, n):
    k = 512
    lin, raw, ref = layer(qtype, n, k)
    assert np.array_equal(lin.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    assert torch.equal(lin.dequantize(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))
    ids = torch.tensor([[n - 1, 0], [3, n - 1]])
    assert np.array_equal(lin.rows(ids).numpy(), ref[ids.numpy()])
    assert np.array_equal(lin.parts[0].blocks.numpy(), raw)  # interleaving is undone exactly


@pytest.mark.parametrize("qtype", sorted(NAMES), ids=NAMES.get)
def test_matmul_is_exact_on_its_int8_activations(qtype):
    n, k = 45, 768
    lin, _, ref = layer(qtype, n, k, seed=1)
    x = torch.randn(6, k) * torch.linspace(0.1, 3.0, k)
    y = lin(x).double().numpy()
    want = quantized_activations(x) @ ref.astype(np.float64).T
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()
    exact = x.double().numpy() @ ref.astype(np.float64).T  # what the 8-bit activations cost
    assert np.linalg.norm(y - exact) <= 0.02 * np.linalg.norm(exact)


@pytest.mark.parametrize("qtype", sorted(NAMES), ids=NAMES.get)
def test_each_row_is_computed_alone(qtype):
    lin, _, _ = layer(qtype, 24, 256, seed=2)
    x = torch.randn(9, 256)
    batched = lin(x)
    for m in (1, 2, 3, 4, 5):
        assert torch.equal(lin(x[:m]), batched[:m])
    assert torch.equal(torch.cat([lin(x[i:i + 1]) for i in range(9)]), batched)


def test_joined_layers_of_mixed_types_equal_the_parts():
    k = 256
    layers = [layer(t, n, k, seed=s)[0] for t, n, s in ((6, 40, 3), (8, 13, 4), (12, 16, 5))]
    joined = BlockLinear.joined(layers)
    assert joined.out_features == 69 and joined.kind == "Q5_0+Q8_0+Q4_K"
    x = torch.randn(3, k)
    assert torch.equal(joined(x), torch.cat([lyr(x) for lyr in layers], dim=-1))
    assert torch.equal(joined.dequantize(), torch.cat([lyr.dequantize() for lyr in layers]))
    assert torch.equal(joined.rows(torch.tensor([68, 0, 45])), joined.dequantize()[[68, 0, 45]])


def test_long_inputs_use_the_dequantized_matrix():
    lin, _, ref = layer(8, 16, 256, seed=6)
    x = torch.randn(100, 256)  # past FUSED_MAX_ROWS: float activations, bf16 or fp32 weights
    exact = x.double().numpy() @ ref.astype(np.float64).T
    assert np.linalg.norm(lin(x).double().numpy() - exact) <= 0.01 * np.linalg.norm(exact)


def test_bad_input_is_refused():
    raw = torch.from_numpy(random_blocks(8, 4, 64))
    with pytest.raises(ValueError, match="needs contiguous uint8"):
        BlockWeight(raw[:, :-1], 8, (4, 64))
    with pytest.raises(ValueError, match="no block kernel"):
        BlockWeight(raw, 3, (4, 64))
    lin = BlockLinear([BlockWeight(raw, 8, (4, 64))])
    with pytest.raises(ValueError, match="row id out of range"):
        lin.rows(torch.tensor([4]))
    with pytest.raises(ValueError, match="different input widths"):
        BlockLinear([BlockWeight(raw, 8, (4, 64)), BlockWeight(torch.from_numpy(random_blocks(8, 4, 32)), 8, (4, 32))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,kv,d,length", [(1, 14, 2, 64, 515), (1, 16, 8, 128, 33), (2, 6, 2, 40, 17)])
def test_decode_attention(dtype, b, h, kv, d, length):
    cache_k, cache_v = torch.randn(b, kv, length + 9, d).to(dtype), torch.randn(b, kv, length + 9, d).to(dtype)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # views into a larger cache, as decode passes them
    q = torch.randn(b, h, 1, d) * 2
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    got = native.attend(q, k, v)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-5
    assert native.attend(q.double(), k, v) is None  # not the kernel's: the caller's path runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,length,window", [(40, 40, None), (7, 300, None), (33, 90, 16), (5, 5, 2)])
def test_prompt_rows_attend_causally_each_alone(dtype, rows, length, window):
    """A chunk of new tokens: each row sees its causal (windowed) keys, and equals itself computed alone, bit for
    bit; that is what keeps a prefix-cache hit from changing the sampled text."""
    h, kv, d = 14, 2, 64
    k, v = torch.randn(1, kv, length, d).to(dtype), torch.randn(1, kv, length, d).to(dtype)
    q = torch.randn(1, h, rows, d) * 2
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=_causal(rows, length, window), enable_gqa=True)
    got = native.attend(q, k, v, window)
    assert (got.double() - want).abs().max() < 1e-5
    for r in (0, rows // 2, rows - 1):
        end = length - rows + r + 1
        alone = native.attend(q[:, :, r : r + 1], k[:, :, :end], v[:, :, :end], window)
        assert torch.equal(alone[:, :, 0], got[:, :, r])
    assert native.attend(q, k[:, :, : rows - 1], v[:, :, : rows - 1]) is None  # more rows than positions



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,kv,d,qk_norm,window", [(16, 8, 128, True, None), (14, 2, 64, False, None),
                                                   (6, 2, 40, True, 5)])
def test_fused_decode_attention_equals_the_torch_steps(dtype, h, kv, d, qk_norm, window):
    """Norms, RoPE, cache write and attention of one decode step in C, against the model's own torch ops."""
    from qwenkit.model.rope import apply_rotary

    b, pos, capacity, eps = 2, 37, 50, 1e-6
    qkv = torch.randn(b, (h + 2 * kv) * d) * 3
    wq, wk = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if qk_norm else (None, None)
    angles = torch.rand(b, d // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cache_k, cache_v = (torch.randn(b, kv, capacity, d).to(dtype) for _ in range(2))
    want_k, want_v = cache_k.clone(), cache_v.clone()

    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
    q, k, v = q.view(b, h, 1, d), k.view(b, kv, 1, d), v.view(b, kv, 1, d)
    if qk_norm:
        q, k = (torch.nn.functional.rms_norm(t, (d,), w, eps) for t, w in ((q, wq), (k, wk)))
    q, k = (apply_rotary(t, cos[:, None, None], sin[:, None, None]) for t in (q, k))
    want_k[:, :, pos : pos + 1], want_v[:, :, pos : pos + 1] = k.to(dtype), v.to(dtype)
    keys, values = want_k[:, :, : pos + 1].double(), want_v[:, :, : pos + 1].double()
    mask = _causal(1, pos + 1, window)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask, enable_gqa=True)

    got = native.decode_attention(qkv, h, kv, wq, wk, eps, cos, sin, cache_k, cache_v, pos, window)
    assert torch.equal(cache_v, want_v)  # values stored as torch rounds them to float16
    # Keys: the C norm sums its squares in another order (a float32 ulp), which may move a float16 rounding.
    assert (cache_k.double() - want_k.double()).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
    assert (got.double().view(b, h, 1, d) - want).abs().max() < 1e-4
    with pytest.raises(ValueError, match="wrong shape"):
        native.decode_attention(qkv[:, :-1], h, kv, wq, wk, eps, cos, sin, cache_k, cache_v, pos, window)
    with pytest.raises(ValueError, match="wrong shape"):
        native.decode_attention(qkv, h, kv, wq, wk, eps, cos, sin, cache_k, cache_v, capacity, window)


def test_float16_rounding_equals_torch():
    """The cache's float32 -> float16 conversion, on the awkward values: ties, subnormals, overflow, inf, NaN."""
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, float("inf"), -float("inf"), 6e-8, 3e-8,
                            2.9802322e-08, 5.96e-8, 1e-5, -1e-7, 1.00048828125, 1.000732421875, 2049.0, 2051.0])
    values = torch.cat([special, torch.randn(3998) * 10, torch.randn(4000) * 1e-5]).reshape(-1, 8)  # [n, D=8]
    n = values.shape[0]
    qkv = torch.cat([torch.zeros(n, 8), torch.zeros(n, 8), values], 1)  # one q, k and v head per row
    cache_k, cache_v = torch.zeros(n, 1, 1, 8, dtype=torch.float16), torch.zeros(n, 1, 1, 8, dtype=torch.float16)
    ones = torch.ones(n, 8)
    native.decode_attention(qkv, 1, 1, None, None, 0.0, ones, torch.zeros(n, 8), cache_k, cache_v, 0, None)
    assert torch.equal(cache_v.view(n, 8).view(torch.int16), values.half().view(torch.int16))
    nan = torch.full((1, 24), float("nan"))
    native.decode_attention(nan, 1, 1, None, None, 0.0, ones[:1], ones[:1] * 0, cache_k[:1], cache_v[:1], 0, None)
    assert cache_v[:1].isnan().all()


@pytest.mark.parametrize("dim", [896, 1024, 40])
def test_rms_norm(dim):
    x, w = torch.randn(3, dim) * 4, torch.rand(dim) + 0.5
    want = torch.nn.functional.rms_norm(x.double(), (dim,), w.double(), 1e-6)
    assert (native.rms_norm(x, w, 1e-6).double() - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="float32"):
        native.rms_norm(x, w[:-1], 1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3-headdim", "qwen2-tied-sliding", "qwen3_moe"])
def test_model_decode_steps_through_the_fused_path_equal_the_torch_path(arch, tmp_path):
    """A tiny Q8_0 GGUF on the block kernels: decode steps with KVCache.fused (C norms, RoPE, cache write and
    attention) give the logits of the same cache run through the model's torch ops, within float32 rounding."""
    from qwenkit.engine.cache import KVCache
    from qwenkit.runtime import load
    from tests.tiny_checkpoint import tiny_gguf

    model = load(tiny_gguf(tmp_path, arch, qtype=gguf.GGMLQuantizationType.Q8_0), pull=False).model
    assert any(isinstance(m, BlockLinear) for m in model.modules())
    prompt, steps = torch.tensor([[5, 17, 29, 3, 41, 8, 60, 12, 9, 33, 2, 71]]), [4, 19, 27, 6, 50, 11]
    logits = {}
    for fused in (True, False):
        cache = KVCache(model.config, 1, prompt.shape[1] + len(steps), torch.float16, fused=fused)
        with torch.inference_mode():
            model(prompt, cache=cache, logits="last")
            logits[fused] = torch.stack([model(torch.tensor([[t]]), cache=cache, logits="last")[0] for t in steps])
    assert KVCache.for_model(model, 1, 4).fused
    assert (logits[True] - logits[False]).abs().max() < 1e-4 * logits[False].abs().max()
