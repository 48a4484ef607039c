"""Matrix-vector products straight from the compact weight formats, for decode.

Each kernel is written as plain tensor math over the packed weights and compiled by torch.compile (Inductor's C++
backend) into one loop that reads each weight byte once, converts it in registers and accumulates in fp32: no
dequantized copy of the matrix is ever made. Without a working compiler the same math runs eagerly (correct, slow).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("qwenkit.quant")


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32 times int8 grouped weights [N, K] -> [M, N]."""
    n, k = q.shape
    groups = scale.shape[1]
    w = q.view(n, groups, k // groups).float() * scale.view(n, groups, 1)
    if offset is not None:
        w = w + offset.view(n, groups, 1)
    return (x.view(-1, 1, k) * w.view(1, n, k)).sum(-1)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times int4 grouped weights (packed [N, K/2], GGUF Q4_0 nibble order) -> [M, N]."""
    n, half = packed.shape
    k, groups = 2 * half, scale.shape[1]
    p = packed.view(n, groups, 1, k // groups // 2)
    nibbles = torch.cat((p & 15, p >> 4), dim=2)  # low nibbles hold the first half of each group
    w = nibbles.view(n, groups, k // groups).float() * scale.view(n, groups, 1) + offset.view(n, groups, 1)
    return (x.view(-1, 1, k) * w.view(1, n, k)).sum(-1)


_compiled: dict = {}
_compile_failed = False


def compiled(fn):
    """torch.compile'd `fn`, or `fn` itself once compilation has failed on this machine (no C++ compiler)."""
    global _compile_failed
    if _compile_failed:
        return fn
    if fn not in _compiled:
        import torch._dynamo

        # One specialisation per weight shape (a model has a handful): allow enough of them.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[fn]


def run(fn, *args):
    global _compile_failed
    try:
        return compiled(fn)(*args)
    except Exception as e:  # a missing compiler surfaces as one of many backend exception types
        if _compile_failed:
            raise
        _compile_failed = True
        log.warning("torch.compile is unavailable here (%s); quantized layers run uncompiled and slowly", e)
        return fn(*args)
