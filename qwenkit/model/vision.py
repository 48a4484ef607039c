"""The vision towers of Qwen2.5-VL and Qwen3-VL: image patches in, one feature per merged 2x2 patch out.

Both are ViTs over 14x14 (Qwen2.5-VL) or 16x16 (Qwen3-VL) patches with 2D rotary positions, run on all of a
request's images at once (each image attends only within itself), ending in a merger that joins each 2x2 block of
patches into one token of the decoder's width. Where they differ (switched by VisionConfig.family):
- Qwen2.5-VL: RMSNorm and gated SiLU blocks; most blocks attend within windows of window_size pixels, the
  fullatt_block_indexes ones over the whole image.
- Qwen3-VL: LayerNorm and GELU blocks, a learned position table resampled to each image's grid, and DeepStack:
  the blocks in deepstack_visual_indexes also feed a merger of their own, whose features are added to the first
  decoder layers' outputs at the image's tokens.
Parameter names are Hugging Face's (visual.blocks.N.attn.qkv.weight, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.model.config import VisionConfig
from qwenkit.model.norm import RMSNorm
from qwenkit.model.rope import apply_rotary


@dataclass
class VisionFeatures:
    """What the tower gives the decoder for a request's images: one row per image token, in prompt order."""

    embeds: torch.Tensor  # [N, hidden]: replaces the image tokens' embeddings
    deepstack: list[torch.Tensor]  # Qwen3-VL: [N, hidden] each, added after decoder layers 0, 1, ...


def num_image_tokens(grid: tuple[int, int, int], merge: int) -> int:
    """How many image tokens stand for an image of grid (t, h, w) patches: one per merge x merge block."""
    t, h, w = grid
    return t * h * w // (merge * merge)


def _norm(config: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, 1e-6) if config.family == "qwen2_5_vl" else nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel,
                              bias=config.family == "qwen3_vl")

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # A convolution whose stride is its kernel over one kernel-sized input is a matrix product over the
        # flattened patch (channels, time, rows, columns: the processor's order).
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3)  # 3 x [H, N, D]
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        # Each segment (an image, or a window of one) attends only within itself, without masks.
        outs = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None])[0]
                for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        return self.proj(torch.cat(outs, 1).transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gated = config.family == "qwen2_5_vl"
        h, i = config.hidden_size, config.intermediate_size
        if self.gated:
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        else:
            self.linear_fc1, self.linear_fc2 = nn.Linear(h, i), nn.Linear(i, h)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.linear_fc2(self.act(self.linear_fc1(x)))


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    from qwenkit.errors import UnsupportedModel

    raise UnsupportedModel(f"vision_config: unsupported hidden_act {name!r}")


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(config, config.hidden_size), _norm(config, config.hidden_size)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of patches (consecutive rows, as the processor orders them) -> one decoder-width token.
    Qwen2.5-VL names its layers ln_q / mlp.0 / mlp.2; Qwen3-VL norm / linear_fc1 / linear_fc2, and its DeepStack
    mergers normalise after joining the four patches rather than before."""

    def __init__(self, config: VisionConfig, after_join: bool = False):
        super().__init__()
        self.joined = config.hidden_size * config.spatial_merge_size**2
        self.after_join = after_join
        self.sequential = config.family == "qwen2_5_vl"  # Qwen2.5-VL's layers live in an nn.Sequential
        inner = (self.joined, self.joined)
        if self.sequential:
            self.ln_q = _norm(config, config.hidden_size)
            self.mlp = nn.Sequential(nn.Linear(*inner), nn.GELU(), nn.Linear(self.joined, config.out_hidden_size))
        else:
            self.norm = _norm(config, self.joined if after_join else config.hidden_size)
            self.linear_fc1 = nn.Linear(*inner)
            self.linear_fc2 = nn.Linear(self.joined, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequential:
            return self.mlp(self.ln_q(x).reshape(-1, self.joined))
        x = self.norm(x.reshape(-1, self.joined)) if self.after_join else self.norm(x).reshape(-1, self.joined)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        if config.family == "qwen3_vl":
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        if config.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                PatchMerger(config, after_join=True) for _ in config.deepstack_visual_indexes)
        dim = config.head_dim // 2
        # On the CPU even while the model is built on the meta device (see qwenkit.model.rope.Rotary).
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].attn.qkv.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> VisionFeatures:
        """pixel_values [patches, C * T * p * p] of all images (qwenkit.media.image.preprocess, concatenated),
        grids their (t, h, w) in patches -> features for the images' tokens, image after image."""
        config, merge = self.config, self.config.spatial_merge_size
        unit = merge * merge
        x = self.patch_embed(pixel_values)
        if config.family == "qwen3_vl":
            x = x + self._position_table(grids).to(x.dtype)
        cos, sin = self._rotary(grids)
        frames = [h * w for t, h, w in grids for _ in range(t)]
        order = windows = None
        if config.family == "qwen2_5_vl":
            # Window attention: patches regrouped window by window (whole 2x2 blocks move together).
            order, windows = self._windows(grids)
            x = x.reshape(-1, unit, x.shape[-1])[order].reshape(x.shape)
            cos = cos.reshape(-1, unit, cos.shape[-1])[order].reshape(cos.shape)
            sin = sin.reshape(-1, unit, sin.shape[-1])[order].reshape(sin.shape)
        deepstack = []
        for i, block in enumerate(self.blocks):
            full = order is None or i in config.fullatt_block_indexes
            x = block(x, cos, sin, frames if full else windows)
            if i in config.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[config.deepstack_visual_indexes.index(i)](x))
        embeds = self.merger(x)
        if order is not None:
            embeds = embeds[torch.argsort(order)]
        return VisionFeatures(embeds, deepstack)

    def _rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, head_dim] of each patch (in merge-block order): the first half of the angles from its row,
        the second from its column."""
        rows, cols = [], []
        for t, h, w in grids:
            r, c = _merge_order(h, w, self.config.spatial_merge_size)
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        angles = torch.cat([torch.cat(rows)[:, None] * self.inv_freq, torch.cat(cols)[:, None] * self.inv_freq], 1)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def _position_table(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Qwen3-VL: the learned side x side position table resampled (bilinear, corners aligned) to each image's
        grid, in merge-block order."""
        side = int(self.config.num_position_embeddings**0.5)
        table = self.pos_embed.weight.float().T.reshape(1, -1, side, side)
        out = []
        for t, h, w in grids:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [C, h, w]
            r, c = _merge_order(h, w, self.config.spatial_merge_size)
            out.append(grid[:, r, c].T.repeat(t, 1))
        return torch.cat(out)

    def _windows(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
        """Qwen2.5-VL's windows: the order of merged blocks that puts each window's blocks together, and the
        windows' lengths in patches."""
        merge = self.config.spatial_merge_size
        size = self.config.window_size // merge // self.config.patch_size  # a window's side, in merged blocks
        order, lengths, base = [], [], 0
        for t, h, w in grids:
            gh, gw = h // merge, w // merge
            index = torch.arange(t * gh * gw).reshape(t, gh, gw)
            for f in range(t):
                for r0 in range(0, gh, size):
                    for c0 in range(0, gw, size):
                        block = index[f, r0 : r0 + size, c0 : c0 + size].flatten()
                        order.append(block + base)
                        lengths.append(block.numel() * merge * merge)
            base += t * gh * gw
        return torch.cat(order), lengths


def _merge_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch of an h x w grid in the processor's order: 2x2 blocks row by row, and the
    patches of a block row by row."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)

    def blocks(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()

    return blocks(rows), blocks(cols)
