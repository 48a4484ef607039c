"""Quantize float weights [N, K] into the grouped formats, round to nearest, over chunks of rows.

- ``quantize_int8``: symmetric, scale = max|w| / 127 per group, q = round(w / scale) in -127..127, no offset.
  ``group=None`` means one group per row (per output channel).
- ``quantize_int4``: asymmetric, per group scale = (max - min) / 15 and offset = min, q = round((w - min) / scale)
  in 0..15, packed two per byte in the nibble order of ``Int4Grouped``.

Either way every element comes back within half a step: |w - dequantized| <= scale / 2, plus float32 rounding
of a few ulps of the group's largest magnitude. An all-equal group gets scale 0 and comes back exactly.
"""

from __future__ import annotations

import torch

from qwenkit.quant.formats import Int4Grouped, Int8Grouped

__all__ = ["quantize_int8", "quantize_int4", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 18  # input elements per step: bounds the float32 temporaries to a few MiB


def _check(w: torch.Tensor, group: int | None, what: str) -> tuple[int, int, int]:
    """(N, K, group) after checking w is 2-D floating point and K a multiple of the group (None: g = K)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what}: expected a 2-D floating-point tensor [N, K], got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {list(getattr(w, 'shape', []))}")
    n, k = (int(x) for x in w.shape)
    if k == 0:
        raise ValueError(f"{what}: K must be positive, got shape {[n, k]}")
    g = k if group is None else int(group)
    if g <= 0 or k % g:
        raise ValueError(f"{what}: K={k} is not a multiple of the group size {g}")
    return n, k, g


def _chunks(n: int, k: int):
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    for a in range(0, n, step):
        yield a, min(a + step, n)


def _finite(bound: torch.Tensor, what: str, a: int) -> None:
    if not torch.isfinite(bound).all():
        raise ValueError(f"{what}: the weights contain inf or NaN (rows {a} and after)")


@torch.no_grad()
def quantize_int8(w: torch.Tensor, group: int | None = None) -> Int8Grouped:
    """Symmetric int8, round to nearest, one scale per ``group`` columns of each row (None: per row)."""
    n, k, g = _check(w, group, "quantize_int8")
    q = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty((n, k // g), dtype=torch.float32)
    for a, b in _chunks(n, k):
        x = w[a:b].to(device="cpu", dtype=torch.float32).reshape(b - a, k // g, g)
        amax = x.abs().amax(dim=-1)
        _finite(amax, "quantize_int8", a)
        s = scale[a:b]
        torch.div(amax, 127.0, out=s)
        div = torch.where(s > 0, s, torch.ones_like(s))
        y = x / div[..., None]
        y.round_().clamp_(-127, 127)
        q[a:b].view(b - a, k // g, g).copy_(y)
    return Int8Grouped(q, scale, None, g)


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group: int = 32) -> Int4Grouped:
    """Asymmetric 4-bit (min/max per group of ``group`` columns), round to nearest, q in 0..15."""
    n, k, g = _check(w, group, "quantize_int4")
    if g % 2:
        raise ValueError(f"quantize_int4: the group size must be even (two values per byte), got {g}")
    h = g // 2
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scale = torch.empty((n, k // g), dtype=torch.float32)
    offset = torch.empty((n, k // g), dtype=torch.float32)
    for a, b in _chunks(n, k):
        x = w[a:b].to(device="cpu", dtype=torch.float32).reshape(b - a, k // g, g)
        mn, mx = torch.aminmax(x, dim=-1)
        _finite(mx - mn, "quantize_int4", a)
        s, o = scale[a:b], offset[a:b]
        torch.div(mx - mn, 15.0, out=s)
        o.copy_(mn)
        div = torch.where(s > 0, s, torch.ones_like(s))
        y = (x - mn[..., None]).div_(div[..., None])
        y.round_().clamp_(0, 15)
        qb = y.to(torch.uint8)
        p = packed[a:b].view(b - a, k // g, h)
        torch.bitwise_left_shift(qb[..., h:], 4, out=p)
        p.bitwise_or_(qb[..., :h])
    return Int4Grouped(packed, scale, offset, g)
