"""The CPU block kernels of qwenkit.kernels.blocks (csrc/blocks.c): GGUF block matmuls and dequantization.

References: gguf-py's dequantize (bit for bit), and float64 products of the same int8 activations the kernel makes
(tolerance 1e-5 relative: only float32 accumulation order differs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from qwenkit.kernels.blocks import BLOCKS  # noqa: E402
from qwenkit.kernels.library import available  # noqa: E402
from qwenkit.quant.blocks import BlockLinear, BlockWeight  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="the CPU kernels are not built for this machine")

NAMES = {2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
HALF_FIELDS = {2: [0], 6: [0], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}  # byte offsets of fp16 scales per block


def random_blocks(qtype: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any type: random bytes, with the fp16 scales set to finite values."""
    rng = np.random.default_rng(seed)
    per_block, nbytes = BLOCKS[qtype]
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
    with pytest.raises(ValueError, match="row id or slot out of range"):
        lin.rows(torch.tensor([4]))
    with pytest.raises(ValueError, match="different input widths"):
        BlockLinear([BlockWeight(raw, 8, (4, 64)), BlockWeight(torch.from_numpy(random_blocks(8, 4, 32)), 8, (4, 32))])
