"""Rotary position embeddings: default, linear and YaRN, rotate-half style with cos/sin computed in fp32."""

from __future__ import annotations

import math

import torch

from qwenkit.errors import UnsupportedModel
from qwenkit.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq[head_dim // 2], attention_scaling) for the config's RoPE variant.

    The formulas follow the YaRN paper and match transformers' modeling_rope_utils, so logits agree with it.
    """
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "yarn":
        return _yarn(config, scaling)
    raise UnsupportedModel(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, yarn)")


def _yarn(config: ModelConfig, scaling: dict) -> tuple[torch.Tensor, float]:
    dim = config.head_dim
    base = config.rope_theta
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor") or config.max_position_embeddings / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength completes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where high-frequency dims are kept (extrapolated), 0 where they are interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class Rotary(torch.nn.Module):
    """Computes cos/sin for given positions; applied to q and k of shape [B, heads, T, head_dim].

    Positions are [B, T], or [3, B, T] for a vision-language model's multimodal positions (temporal, height,
    width): each frequency then takes its angle from one of the three axes, as config.mrope_section assigns
    them. Text tokens have the same position on all three axes, which gives plain RoPE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # A plain attribute on the CPU, not a buffer: models are built on the meta device and then filled from the
        # checkpoint, and a buffer would come out of that uninitialised.
        self.inv_freq, self.attention_scaling = inverse_frequencies(config)
        self.axis_of = None if config.mrope_section is None else mrope_axes(config.mrope_section,
                                                                            config.mrope_interleaved)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq  # [B, T, dim/2] or [3, B, T, dim/2], fp32
        if positions.dim() == 3:
            # Exact: each angle is multiplied by one 1 and two 0s.
            pick = torch.nn.functional.one_hot(self.axis_of, 3).T.to(freqs.device, freqs.dtype)  # [3, dim/2]
            freqs = (freqs * pick[:, None, None, :]).sum(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]  # broadcast over heads


def mrope_axes(section: list[int], interleaved: bool) -> torch.Tensor:
    """Which position axis (0 temporal, 1 height, 2 width) drives each of the head_dim / 2 frequencies.

    Qwen2.5-VL gives the axes runs of section[0], section[1], section[2] frequencies; Qwen3-VL interleaves them
    (T H W T H W ..., the temporal axis taking what is left), as transformers' rotary embeddings do."""
    total = sum(section)
    if not interleaved:
        return torch.cat([torch.full((n,), axis, device="cpu") for axis, n in enumerate(section)])
    axes = torch.zeros(total, dtype=torch.long, device="cpu")
    for axis in (1, 2):
        axes[axis : section[axis] * 3 : 3] = axis
    return axes


def multimodal_positions(tokens: list[int], grids: list[tuple[int, int, int]], image_token_id: int,
                         merge: int) -> tuple[torch.Tensor, int]:
    """Rotary positions [3, T] of a prompt whose images appear as runs of image_token_id (one run per grid, in
    order), and the delta that positions of later tokens add to their index (transformers' get_rope_index).

    A text token's position follows the previous token's on all three axes; an image's tokens take
    (start, start + row, start + column) over its merged grid, and the text after it goes on from start + the
    larger side."""
    out = torch.empty(3, len(tokens), dtype=torch.long)
    images = iter(grids)
    at = pos = 0
    while at < len(tokens):
        if tokens[at] != image_token_id:
            out[:, at] = pos
            at, pos = at + 1, pos + 1
            continue
        t, h, w = next(images, (None, None, None))
        if t is None:
            raise ValueError("more image placeholder runs than images")
        h, w = h // merge, w // merge
        n = t * h * w
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        out[:, at : at + n] = grid.reshape(3, n) + pos
        at, pos = at + n, pos + max(h, w)
    return out, pos - len(tokens)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
