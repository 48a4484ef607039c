"""Quantized linear layers against their own dequantized fp32 weights, for every format and both kernels.

Tolerance: the layer computes exactly sum_k x_k * w_k with w_k the dequantized weight, only in another order
(and the compiled kernel may use fused multiply-adds), so the difference is fp32 rounding noise: we allow
1e-5 relative to the output's scale (sum_k |x_k * w_k|), about 100x the noise seen and far below any real
error (one wrong nibble or scale moves an output by ~1e-2 relative).
"""

import pytest
import torch

from qwenkit.quant.formats import Int4Grouped, Int8Grouped
from qwenkit.quant.fuse import concat_rows
from qwenkit.quant.linear import GEMV_MAX_ROWS, QuantEmbedding, QuantLinear
from qwenkit.quant.quantize import quantize_int4, quantize_int8

N, K = 96, 256


def weights(kind: str, group: int, seed: int = 0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    if kind == "int4":
        return quantize_int4(w, group)
    fmt = quantize_int8(w, group)
    if kind == "int8+offset":  # GGUF Q5_1 / Q5_K carry an offset per group
        offset = torch.randn(fmt.scale.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.01
        fmt = Int8Grouped(fmt.q, fmt.scale, offset, group)
    return fmt


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    expected = x @ w.T + (bias if bias is not None else 0)
    scale = (x.abs() @ w.abs().T) + 1e-6
    rel = ((got - expected).abs() / scale).max().item()
    assert rel < 1e-5, f"max error {rel:.2e} of the output scale"


FORMATS = [("int8", 32), ("int8", 16), ("int8+offset", 32), ("int4", 32), ("int4", 16)]


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS, 37])  # matrix-vector kernel, its largest batch, prefill path
def test_quant_linear_matches_dequantized_reference(kind, group, rows):
    fmt = weights(kind, group)
    bias = torch.randn(N)
    layer = QuantLinear(fmt, bias=bias)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = layer(x)
    check_close(got, x, fmt.dequantize(), bias)


@pytest.mark.parametrize("kind,group", FORMATS)
def test_embedding_rows_are_the_dequantized_rows(kind, group):
    fmt = weights(kind, group)
    ids = torch.tensor([[0, 5, 95], [3, 3, 1]])
    rows = QuantEmbedding(QuantLinear(fmt))(ids)
    assert torch.equal(rows, fmt.dequantize()[ids])


def test_fused_projection_equals_the_separate_ones():
    """q/k/v of mixed formats (as a Q4_K_M file mixes Q5_0, Q6_K and Q4_K) fused into one layer."""
    parts = [weights("int8", 32, 1), weights("int4", 32, 2), weights("int8+offset", 16, 3)]
    fused = QuantLinear(concat_rows(parts))
    x = torch.randn(1, K)
    with torch.no_grad():
        got = fused(x)
        expected = torch.cat([QuantLinear(p)(x) for p in parts], dim=-1)
    check_close(got, x, torch.cat([p.dequantize() for p in parts]))
    assert torch.allclose(got, expected, rtol=0, atol=1e-4)


def test_int4_fusion_stays_int4():
    fused = concat_rows([weights("int4", 32, 1), weights("int4", 32, 2)])
    assert isinstance(fused, Int4Grouped) and fused.shape == (2 * N, K)
