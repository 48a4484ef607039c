"""Quantized linear layers against their own dequantized fp32 weights, for every format and every kernel.

Tolerance, relative to the output's scale (sum_k |x_k * w_k|):
- fp32 paths (CPUs without native bf16): the layer computes exactly sum_k x_k * w_k, only in another order, so
  the difference is fp32 rounding noise; we allow 1e-5, about 100x the noise seen.
- bf16 paths (CPUs with native bf16, forced here by QWENKIT_BF16=1 so every path runs on any machine): activations
  (and, for prefill, weights) are rounded to bf16, 8 significant bits, i.e. up to 2^-9 each; we allow 1e-2.
- fbgemm (x86; int8 with one scale per row): activations are quantized to 8 bits per call, an error of up to half
  a step of 1/255 of their range each; we allow 1e-2 as well.
Both are far below a real error: one wrong nibble or scale moves an output by several percent of its scale.
"""

import pytest
import torch

from qwenkit.quant.formats import Int4Grouped, Int8Grouped
from qwenkit.quant.fuse import concat_rows
from qwenkit.quant.linear import FUSED_MAX_ROWS, GEMV_MAX_ROWS, QuantEmbedding, QuantLinear, batch_invariant
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


CPUS = {"fp32-cpu": ("0", "0"), "bf16-cpu": ("1", "0"), "x86-fbgemm": ("0", "1"), "bf16-x86-fbgemm": ("1", "1")}


@pytest.fixture(params=list(CPUS), autouse=True)
def cpu(request, monkeypatch):
    bf16, fbgemm = CPUS[request.param]
    if fbgemm == "1" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm engine in this PyTorch build")
    monkeypatch.setenv("QWENKIT_BF16", bf16)
    monkeypatch.setenv("QWENKIT_FBGEMM", fbgemm)
    return request.param


@pytest.fixture
def bf16(cpu) -> bool:
    return cpu.startswith("bf16")


@pytest.fixture
def tolerance(cpu) -> float:
    return 1e-5 if cpu == "fp32-cpu" else 1e-2


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None, tolerance: float = 1e-5) -> None:
    expected = x @ w.T + (bias if bias is not None else 0)
    scale = (x.abs() @ w.abs().T) + 1e-6
    rel = ((got - expected).abs() / scale).max().item()
    assert rel < tolerance, f"max error {rel:.2e} of the output scale"


FORMATS = [("int8", 32), ("int8", 16), ("int8+offset", 32), ("int4", 32), ("int4", 16)]


@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS, 37])  # matrix-vector kernel, its largest batch, prefill path
def test_quant_linear_matches_dequantized_reference(kind, group, rows, tolerance):
    fmt = weights(kind, group)
    bias = torch.randn(N)
    layer = QuantLinear(fmt, bias=bias)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = layer(x)
    check_close(got, x, fmt.dequantize(), bias, tolerance)


@pytest.mark.parametrize("rows", [1, 37])
def test_per_row_int8_and_tinygemm_int4_kernels(rows, cpu, bf16, tolerance):
    """The layouts the fused bf16 kernels use: int8 with one scale per row, int4 in rows of 64."""
    w = torch.randn(128, K, generator=torch.Generator().manual_seed(3))
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(4))
    for fmt in (quantize_int8(w, None), quantize_int4(w, 32)):
        layer = QuantLinear(fmt)
        fbgemm = cpu.endswith("fbgemm") and isinstance(fmt, Int8Grouped)  # int8 decode runs on fbgemm on x86
        assert layer.fused_kernel == (bf16 and isinstance(fmt, Int4Grouped))  # tinygemm
        assert (layer.packed is not None) == fbgemm
        with torch.no_grad():
            check_close(layer(x), x, fmt.dequantize(), None, tolerance)
        assert torch.equal(layer.dequantize(), fmt.dequantize())  # the kernel layout keeps the values


def test_fused_kernels_give_a_row_the_same_result_in_any_batch(cpu):
    """The serving engine batches requests: within batch_invariant(), up to FUSED_MAX_ROWS rows, a row's output must
    not depend on the others (fbgemm would otherwise quantize a whole batch with one range). Exact equality."""
    w = torch.randn(128, K, generator=torch.Generator().manual_seed(5))
    x = torch.randn(FUSED_MAX_ROWS, K, generator=torch.Generator().manual_seed(6))
    x[3] *= 50  # an outlier row, as a few tokens have: it must not cost the others their precision
    for fmt in (quantize_int8(w, None), quantize_int4(w, 32)):
        layer = QuantLinear(fmt)
        if layer.packed is None and not layer.fused_kernel:
            continue  # the compiled fp32 kernels take at most GEMV_MAX_ROWS rows a call
        with torch.no_grad(), batch_invariant():
            batched = layer(x)
            check_close(batched, x, fmt.dequantize(), None, 1e-2)  # the row mapping keeps the results right
            for i in (0, 3, FUSED_MAX_ROWS - 1):
                assert torch.equal(layer(x[i : i + 1])[0], batched[i])
                assert torch.equal(layer(x[i : i + 5])[0], batched[i])


@pytest.mark.parametrize("kind,group", FORMATS + [("int8", None)])  # None: one scale per row (fbgemm on x86)
def test_embedding_rows_are_the_dequantized_rows(kind, group):
    fmt = weights(kind, group)
    ids = torch.tensor([[0, 5, 95], [3, 3, 1]])
    rows = QuantEmbedding(QuantLinear(fmt))(ids)
    assert torch.equal(rows, fmt.dequantize()[ids])


def test_fused_projection_equals_the_separate_ones(tolerance):
    """q/k/v of mixed formats (as a Q4_K_M file mixes Q5_0, Q6_K and Q4_K) fused into one layer."""
    parts = [weights("int8", 32, 1), weights("int4", 32, 2), weights("int8+offset", 16, 3)]
    fused = QuantLinear(concat_rows(parts))
    x = torch.randn(1, K)
    with torch.no_grad():
        got = fused(x)
        expected = torch.cat([QuantLinear(p)(x) for p in parts], dim=-1)
    check_close(got, x, torch.cat([p.dequantize() for p in parts]), None, tolerance)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 if tolerance < 1e-4 else 0.05)


def test_int4_fusion_stays_int4():
    fused = concat_rows([weights("int4", 32, 1), weights("int4", 32, 2)])
    assert isinstance(fused, Int4Grouped) and fused.shape == (2 * N, K)
