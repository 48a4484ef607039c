"""Joining compact weights along the output dimension (q/k/v into one projection, gate/up into one).

Weights of different formats are first brought to a common one without loss: int4 values are valid int8 values,
a larger group is a smaller group with repeated scales, and a missing offset is a zero offset.
"""

from __future__ import annotations

import math

import torch

from qwenkit.quant.formats import Int4Grouped, Int8Grouped


def _as_int8(w: Int8Grouped | Int4Grouped) -> Int8Grouped:
    if isinstance(w, Int8Grouped):
        return w
    return Int8Grouped(w.unpack().to(torch.int8), w.scale, w.offset, w.group)


def _regroup(w, group: int):
    if w.group == group:
        return w
    r = w.group // group
    offset = None if w.offset is None else w.offset.repeat_interleave(r, dim=1)
    if isinstance(w, Int8Grouped):
        return Int8Grouped(w.q, w.scale.repeat_interleave(r, dim=1), offset, group)
    # Int4 nibble order depends on the group: unpack and repack through int8 instead.
    return _regroup(_as_int8(w), group)


def concat_rows(weights: list[Int8Grouped | Int4Grouped]) -> Int8Grouped | Int4Grouped:
    """One weight whose rows are the given weights' rows in order."""
    group = math.gcd(*(w.group for w in weights))
    if all(isinstance(w, Int4Grouped) for w in weights) and len({w.group for w in weights}) == 1:
        return Int4Grouped(
            torch.cat([w.packed for w in weights]),
            torch.cat([w.scale for w in weights]),
            torch.cat([w.offset for w in weights]),
            group,
        )
    parts = [_regroup(_as_int8(w), group) for w in weights]
    if any(p.offset is not None for p in parts):
        offsets = [p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts]
        offset = torch.cat(offsets)
    else:
        offset = None
    return Int8Grouped(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offset, group)
