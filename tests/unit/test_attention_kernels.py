"""The kernels of csrc/attention.c: attention over a paged KV pool (qwenkit.kernels.attention), and RMSNorm
(qwenkit.kernels.norm).

References: the model's own PyTorch ops for the q/k norms and RoPE, and float64 SDPA over the keys each row may see
(5e-5 absolute on outputs up to ~5: float32 scores and an exp accurate to 2e-7); keys stored within one float16
rounding of torch's (a float32 ulp of the C norm may move it), values bit for bit as torch rounds them.
"""

from __future__ import annotations

import pytest
import torch

from qwenkit.kernels.attention import Slots, paged_attention
from qwenkit.kernels.library import available
from qwenkit.kernels.norm import rms_norm
from qwenkit.model.attention import causal_mask
from qwenkit.model.rope import apply_rotary

pytestmark = pytest.mark.skipif(not available(), reason="the CPU kernels are not built for this machine")


def scattered_batch(lengths: list[int], rows: list[int], n_slots: int, seed: int = 0):
    """Sequences of `lengths` tokens whose last `rows` are new, each at random distinct slots of the pool: the
    flat batch's Slots, the segments (rows, context slots) and the position of every new row."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(n_slots, generator=g)
    segments, offset = [], 0
    for length, r in zip(lengths, rows):
        segments.append((r, free[offset : offset + length]))
        offset += length
    slots = Slots(torch.cat([s[-r:] for r, s in segments]), torch.cat([s for _, s in segments]),
                  torch.cat([torch.full((r,), sum(len(s) for _, s in segments[:i])) for i, (r, _) in
                             enumerate(segments)]),
                  torch.cat([torch.arange(len(s) - r + 1, len(s) + 1) for r, s in segments]))
    positions = torch.cat([torch.arange(len(s) - r, len(s)) for r, s in segments])
    return slots, segments, positions


BLOCK = 4  # the pools' block size: slot s is position s % BLOCK of block s // BLOCK


def at(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The pool's [KV, len(slots), D] view of these slots (a copy)."""
    return pool[slots // BLOCK, :, slots % BLOCK].transpose(0, 1)


def reference(q, k, v, h, kv, d, wq, wk, eps, cos, sin, pool_k, pool_v, segments, window, keys=None):
    """The model's torch ops: norm and rotate, store in the pools (copies), then float64 attention per segment
    (over `keys` instead of the stored ones when given)."""
    n = q.shape[0]
    q, k, v = q.view(n, h, d), k.view(n, kv, d), v.reshape(n, kv, d)
    if wq is not None:
        q, k = torch.nn.functional.rms_norm(q, (d,), wq, eps), torch.nn.functional.rms_norm(k, (d,), wk, eps)
    q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
    pool_k, pool_v = pool_k.clone(), pool_v.clone()
    write = torch.cat([s[-r:] for r, s in segments])
    pool_k[write // BLOCK, :, write % BLOCK] = k.to(pool_k.dtype)
    pool_v[write // BLOCK, :, write % BLOCK] = v.to(pool_v.dtype)
    outs, first, attend_k = [], 0, pool_k if keys is None else keys
    for r, s in segments:
        keys, values = at(attend_k, s)[None].double(), at(pool_v, s)[None].double()
        pos = torch.arange(len(s))
        mask = causal_mask(pos[-r:, None], pos[None, :], window)
        qs = q[first : first + r].transpose(0, 1)[None].double()
        out = torch.nn.functional.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, enable_gqa=True)
        outs.append(out[0].transpose(0, 1).reshape(r, h * d))
        first += r
    return torch.cat(outs), pool_k, pool_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,kv,d,qk_norm,window", [(16, 8, 128, True, None), (14, 2, 64, False, None),
                                                   (6, 2, 40, True, 5), (14, 2, 64, False, 16)])
def test_paged_attention_equals_the_torch_steps(dtype, h, kv, d, qk_norm, window):
    """Prompt chunks and decode rows of four sequences in one call, their keys scattered over the pool: norms,
    RoPE, the pool writes and causal (windowed) attention, against the torch ops; and every row equals itself
    computed alone, bit for bit (what keeps batching and the prefix cache from changing a sampled token)."""
    lengths, rows, n_slots, eps = [515, 40, 7, 33], [1, 40, 3, 1], 700, 1e-6
    slots, segments, positions = scattered_batch(lengths, rows, n_slots)
    n = sum(rows)
    qkv = torch.randn(n, (h + 2 * kv) * d) * 3
    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)  # views of one fused projection, as the model passes them
    wq, wk = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if qk_norm else (None, None)
    angles = positions[:, None] * torch.rand(d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    pool_k = torch.randn(n_slots // BLOCK, kv, BLOCK, d).to(dtype)
    pool_v = torch.randn(n_slots // BLOCK, kv, BLOCK, d).to(dtype)

    before = pool_k.clone()
    got = paged_attention(q, k, v, h, kv, wq, wk, eps, cos, sin, pool_k, pool_v, slots, window)
    _, want_k, want_v = reference(q, k, v, h, kv, d, wq, wk, eps, cos, sin, before, pool_v, segments, window)
    assert torch.equal(pool_v, want_v)  # values stored as torch rounds them
    # Keys: the C norm sums its squares in another order (a float32 ulp), which may move a float16 rounding; the
    # attention is then checked over the keys the kernel stored.
    assert (pool_k.double() - want_k.double()).abs().max() < (2e-3 if dtype == torch.float16 else 1e-5)
    want, _, _ = reference(q, k, v, h, kv, d, wq, wk, eps, cos, sin, before, pool_v, segments, window, pool_k)
    assert (got.double() - want).abs().max() < 5e-5

    for row in (0, 1, 20, 40, 42, 44):  # each row again, alone, over the pool as the full call left it
        one = Slots(slots.write[row : row + 1], slots.context, slots.starts[row : row + 1],
                    slots.lengths[row : row + 1])
        alone = paged_attention(q[row : row + 1], k[row : row + 1], v[row : row + 1], h, kv, wq, wk, eps,
                                cos[row : row + 1], sin[row : row + 1], pool_k, pool_v, one, window)
        assert torch.equal(alone[0], got[row])


def test_bad_input_is_refused():
    slots, _, _ = scattered_batch([5], [5], 8)
    q, k = torch.randn(5, 64), torch.randn(5, 64)
    pool = torch.zeros(8 // BLOCK, 1, BLOCK, 64)
    cos = sin = torch.zeros(5, 64)
    with pytest.raises(ValueError, match="float32"):
        paged_attention(q.double(), k, k, 1, 1, None, None, 0.0, cos, sin, pool, pool, slots, None)
    with pytest.raises(ValueError, match="pools"):
        paged_attention(q, k, k, 1, 1, None, None, 0.0, cos, sin, pool.double(), pool.double(), slots, None)
    bad = Slots(slots.write, slots.context + 8, slots.starts, slots.lengths)
    with pytest.raises(ValueError, match="slot out of range"):
        paged_attention(q, k, k, 1, 1, None, None, 0.0, cos, sin, pool, pool, bad, None)
    with pytest.raises(ValueError, match="runs past the slot list"):
        Slots(slots.write, slots.context[:3], slots.starts, slots.lengths)
    with pytest.raises(ValueError, match="power of two"):
        odd = torch.zeros(2, 1, 3, 64)
        paged_attention(q, k, k, 1, 1, None, None, 0.0, cos, sin, odd, odd, slots, None)


def test_float16_rounding_equals_torch():
    """The pool's float32 -> float16 conversion, on the awkward values: ties, subnormals, overflow, inf, NaN."""
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, float("inf"), -float("inf"), 6e-8, 3e-8,
                            2.9802322e-08, 5.96e-8, 1e-5, -1e-7, 1.00048828125, 1.000732421875, 2049.0, 2051.0])
    values = torch.cat([special, torch.randn(3998) * 10, torch.randn(4000) * 1e-5]).reshape(-1, 8)  # [n, D=8]
    n = values.shape[0]
    pool_k, pool_v = torch.zeros(n, 1, 1, 8, dtype=torch.float16), torch.zeros(n, 1, 1, 8, dtype=torch.float16)
    each = torch.arange(n)
    slots = Slots(each, each, each, torch.ones(n, dtype=torch.long))  # every row a one-token sequence
    zeros, ones = torch.zeros(n, 8), torch.ones(n, 8)
    paged_attention(zeros, zeros, values, 1, 1, None, None, 0.0, ones, zeros, pool_k, pool_v, slots, None)
    assert torch.equal(pool_v.view(n, 8).view(torch.int16), values.half().view(torch.int16))
    nan = torch.full((1, 8), float("nan"))
    paged_attention(nan, nan, nan, 1, 1, None, None, 0.0, ones[:1], zeros[:1], pool_k, pool_v,
                    Slots(each[:1], each[:1], each[:1], torch.ones(1, dtype=torch.long)), None)
    assert pool_v[0].isnan().all()


@pytest.mark.parametrize("dim", [896, 1024, 40])
def test_rms_norm(dim):
    """The hidden-state norm the model runs where the kernels are built: float64 reference within 1e-5, each row
    equal to itself normed alone."""
    x, w = torch.randn(3, dim) * 4, torch.rand(dim) + 0.5
    want = torch.nn.functional.rms_norm(x.double(), (dim,), w.double(), 1e-6)
    got = rms_norm(x, w, 1e-6)
    assert (got.double() - want).abs().max() < 1e-5
    assert torch.equal(rms_norm(x[1:2], w, 1e-6)[0], got[1])
    with pytest.raises(ValueError, match="float32"):
        rms_norm(x, w[:-1], 1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3-headdim", "qwen2-tied-sliding", "qwen3_moe"])
def test_model_steps_through_the_kernel_equal_the_torch_path(arch):
    """A tiny float32 model: a prompt chunk and decode steps over the paged float16 pool (scattered slots) with the
    attention kernel give the logits of the same steps through the model's torch ops, within float32 rounding.
    (A float model: on quantized weights, a last-bit difference may move an int8 activation rounding.)"""
    from tests.paged_steps import PagedSequence
    from tests.tiny_checkpoint import tiny_model

    model = tiny_model(arch)
    prompt, steps = [5, 17, 29, 3, 41, 8, 60, 12, 9, 33, 2, 71], [4, 19, 27, 6, 50, 11]
    logits = {}
    for native in (True, False):
        slots = torch.randperm(32, generator=torch.Generator().manual_seed(1))  # scattered over the pool
        sequence = PagedSequence(model, 32, torch.float16, block_size=4, slots=slots)
        sequence.pool.native = native
        logits[native] = torch.stack([sequence(prompt)[0]] + [sequence([t], generated=True)[0] for t in steps])
    assert (logits[True] - logits[False]).abs().max() < 1e-4 * logits[False].abs().max()
