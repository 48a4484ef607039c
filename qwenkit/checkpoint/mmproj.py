"""llama.cpp's vision projector ("mmproj") GGUF files of Qwen2.5-VL and Qwen3-VL: our vision tower written and read.

llama.cpp keeps a VL model in two files: the language model (general.architecture qwen2vl / qwen3vl, written by
gguf_write.write_gguf, read by ModelConfig.from_gguf_metadata) and the vision tower with its merger in an mmproj
file (general.architecture "clip"). The layout is what llama.cpp's convert_hf_to_gguf.py --mmproj writes
(Qwen2VLVisionModel, Qwen3VLVisionModel) and tools/mtmd reads (clip.cpp; models/qwen2vl.cpp, models/qwen3vl.cpp):

  ours (Hugging Face names, visual.*)          mmproj
  patch_embed.proj.weight [H, C, 2, p, p]      v.patch_embd.weight, v.patch_embd.weight.1: [H, C, p, p] each, the
                                               Conv3d cut into one 2D kernel per temporal slice
  patch_embed.proj.bias (3)                    v.patch_embd.bias
  pos_embed.weight (3)                         v.position_embd.weight (kept F32, as the converter forces it)
  blocks.N.norm1 / norm2                       v.blk.N.ln1 / ln2
  blocks.N.attn.qkv                            v.blk.N.attn_q, attn_k, attn_v: thirds of the rows (2.5);
                                               v.blk.N.attn_qkv (3)
  blocks.N.attn.proj                           v.blk.N.attn_out
  blocks.N.mlp.gate_proj / up_proj / down_proj v.blk.N.ffn_gate / ffn_up / ffn_down (2.5)
  blocks.N.mlp.linear_fc1 / linear_fc2         v.blk.N.ffn_up / ffn_down (3)
  merger.ln_q (2.5) | merger.norm (3)          v.post_ln
  merger.mlp.0 | merger.linear_fc1             mm.0
  merger.mlp.2 | merger.linear_fc2             mm.2
  deepstack_merger_list.K.norm / linear_fc1 /  v.deepstack.L.norm / fc1 / fc2 with L = deepstack_visual_indexes[K]:
    linear_fc2 (3)                             the block the merger reads, not K
(each .weight, and .bias where the layer has one.)

Metadata (gguf.constants.Keys.Clip / ClipVision): clip.projector_type qwen2.5vl_merger | qwen3vl_merger (or
clip.vision.projector_type in mixed-modality files), clip.has_vision_encoder, clip.vision.{image_size, patch_size,
embedding_length, feed_forward_length, block_count, projection_dim (the decoder's width), attention.head_count,
attention.layer_norm_epsilon, image_mean, image_std, spatial_merge_size}, clip.use_silu (2.5) / clip.use_gelu (3);
Qwen2.5-VL's clip.vision.n_wa_pattern (block i attends in full iff (i + 1) % n == 0) and clip.vision.window_size;
Qwen3-VL's clip.vision.is_deepstack_layers (one bool per block). What the files leave out is implied: 3 input
channels (the patch kernel's shape), a temporal patch of 2 (two kernels; llama.cpp supports no other), the table
size (v.position_embd's rows), rotary theta 10000 (llama.cpp's graphs hard-code it). The image processor's pixel
bounds are not written by llama.cpp's converter; we write clip.vision.image_min_pixels / image_max_pixels and fall
back to the family's released preprocessor_config.json where they are absent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.checkpoint.gguf import GGUFFile
from qwenkit.checkpoint.loader import fill, gguf_copier
from qwenkit.checkpoint.names import Target
from qwenkit.errors import BadCheckpoint, BadRequest, UnsupportedModel
from qwenkit.media.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QWEN3_VL, QWEN25_VL, ImageSpec
from qwenkit.model.config import VisionConfig

MMPROJ_ARCHITECTURE = "clip"
PROJECTOR_TYPES = {"qwen2_5_vl": "qwen2.5vl_merger", "qwen3_vl": "qwen3vl_merger"}
FAMILY_OF = {v: k for k, v in PROJECTOR_TYPES.items()}
# The language model architecture each tower pairs with (qwenkit.model.config.GGUF_VL_ARCHITECTURES).
LANGUAGE_ARCHITECTURE = {"qwen2_5_vl": "qwen2vl", "qwen3_vl": "qwen3vl"}
DEFAULT_SPECS = {"qwen2_5_vl": QWEN25_VL, "qwen3_vl": QWEN3_VL}
# What llama.cpp's graphs assume and the file does not say.
TEMPORAL_PATCH = 2
VISION_ROPE_THETA = 10000.0
DEFAULT_WINDOW = 112  # Qwen2.5-VL's window in pixels, in every release
# Our towers normalise with eps 1e-6, as transformers' do; llama.cpp's converter copies the text model's rms_norm_eps
# into attention.layer_norm_epsilon (1e-6 in every release), so the key is written but not read.
NORM_EPS = 1e-6
# hidden_act <-> llama.cpp's activation flags (its GELU is the tanh approximation).
_ACT_FLAG = {"silu": "clip.use_silu", "gelu_pytorch_tanh": "clip.use_gelu", "gelu_tanh": "clip.use_gelu"}
_DEFAULT_ACT = {"qwen2_5_vl": "silu", "qwen3_vl": "gelu_pytorch_tanh"}

PATCH = "v.patch_embd.weight"
POSITION = "v.position_embd.weight"
_TOP = {
    "visual.patch_embed.proj.bias": "v.patch_embd.bias",
    "visual.pos_embed.weight": POSITION,
    "visual.merger.ln_q.weight": "v.post_ln.weight",
    "visual.merger.norm.weight": "v.post_ln.weight",
    "visual.merger.norm.bias": "v.post_ln.bias",
    "visual.merger.mlp.0.weight": "mm.0.weight",
    "visual.merger.mlp.0.bias": "mm.0.bias",
    "visual.merger.mlp.2.weight": "mm.2.weight",
    "visual.merger.mlp.2.bias": "mm.2.bias",
    "visual.merger.linear_fc1.weight": "mm.0.weight",
    "visual.merger.linear_fc1.bias": "mm.0.bias",
    "visual.merger.linear_fc2.weight": "mm.2.weight",
    "visual.merger.linear_fc2.bias": "mm.2.bias",
}
_BLOCK_PARTS = {
    "norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down",
}
_DEEPSTACK_PARTS = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}
_BLOCK = re.compile(r"^visual\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DEEPSTACK = re.compile(r"^visual\.deepstack_merger_list\.(\d+)\.(\w+)\.(weight|bias)$")


def mmproj_names(param: str, vision: VisionConfig) -> list[tuple[str, tuple]]:
    """The mmproj tensors a tower parameter (visual.*) is stored as, each with the part of the parameter it holds
    (an index into it; () for the whole). KeyError for a parameter llama.cpp has no tensor for."""
    if param == "visual.patch_embed.proj.weight":
        return [(PATCH, (slice(None), slice(None), 0)), (PATCH + ".1", (slice(None), slice(None), 1))]
    if param in _TOP:
        return [(_TOP[param], ())]
    m = _BLOCK.match(param)
    if m:
        n, part, kind = m.groups()
        if part == "attn.qkv" and vision.family == "qwen2_5_vl":  # llama.cpp's qwen2vl graph takes q, k, v apart
            h = vision.hidden_size
            return [(f"v.blk.{n}.attn_{x}.{kind}", (slice(i * h, (i + 1) * h),)) for i, x in enumerate("qkv")]
        if part == "attn.qkv":
            return [(f"v.blk.{n}.attn_qkv.{kind}", ())]
        if part in _BLOCK_PARTS:
            return [(f"v.blk.{n}.{_BLOCK_PARTS[part]}.{kind}", ())]
    m = _DEEPSTACK.match(param)
    if m and m.group(2) in _DEEPSTACK_PARTS and int(m.group(1)) < len(vision.deepstack_visual_indexes):
        layer = vision.deepstack_visual_indexes[int(m.group(1))]
        return [(f"v.deepstack.{layer}.{_DEEPSTACK_PARTS[m.group(2)]}.{m.group(3)}", ())]
    raise KeyError(param)


def window_pattern(vision: VisionConfig) -> int:
    """Qwen2.5-VL's full-attention blocks as llama.cpp's n_wa_pattern n: block i attends in full iff (i + 1) % n == 0
    (n = depth + 1: none do). UnsupportedModel where the blocks are not spaced that way."""
    full = list(vision.fullatt_block_indexes)
    n = full[0] + 1 if full else vision.depth + 1
    if _full_blocks(n, vision.depth) != full:
        raise UnsupportedModel(f"llama.cpp cannot express full attention in blocks {full} of {vision.depth} "
                               "(it takes every n-th block)")
    return n


def _full_blocks(n: int, depth: int) -> list[int]:
    return [i for i in range(depth) if n == 0 or (i + 1) % n == 0]  # n = 0: no window attention at all


# ---- writing -------------------------------------------------------------------------------------------------------

def write_mmproj(model, path: Path, spec: ImageSpec, ftype: str = "f32") -> Path:
    """Write `model`'s vision tower as llama.cpp's mmproj file for it. spec: the image processor's settings (the
    checkpoint's image_spec()). ftype: "f32", or "f16" (matrices and kernels in half precision; norms, biases and
    the position table in F32, as llama.cpp's converter writes them)."""
    import gguf

    vision = model.config.vision
    if vision is None or model.visual is None:
        raise BadRequest("write_mmproj: the model has no vision tower")
    if ftype not in ("f32", "f16"):
        raise BadRequest(f"write_mmproj: ftype must be 'f32' or 'f16', got {ftype!r}")
    if (spec.patch_size, spec.temporal_patch_size, spec.merge_size) != (
            vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size):
        raise BadRequest("write_mmproj: the image spec's patch sizes do not match the vision tower's")
    if vision.temporal_patch_size != TEMPORAL_PATCH or vision.rope_theta != VISION_ROPE_THETA:
        raise UnsupportedModel("llama.cpp's Qwen VL towers take temporal patches of 2 and rotary theta 10000 only")
    flag = _ACT_FLAG.get(vision.hidden_act)
    if flag is None:
        raise UnsupportedModel(f"llama.cpp has no {vision.hidden_act!r} activation for a Qwen VL tower")

    w = gguf.GGUFWriter(str(path), MMPROJ_ARCHITECTURE)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR_TYPES[vision.family])
    w.add_vision_projection_dim(vision.out_hidden_size)
    # The converter's image_size: 560 for Qwen2.5-VL (its default), the position table's side in pixels for
    # Qwen3-VL. llama.cpp sizes images by pixel bounds for both; we do not read it.
    side = math.isqrt(vision.num_position_embeddings)
    w.add_vision_image_size(side * vision.patch_size if vision.family == "qwen3_vl" else 560)
    w.add_vision_patch_size(vision.patch_size)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_block_count(vision.depth)
    w.add_vision_head_count(vision.num_heads)
    w.add_vision_attention_layernorm_eps(NORM_EPS)
    w.add_vision_spatial_merge_size(vision.spatial_merge_size)
    w.add_vision_image_mean([float(v) for v in spec.image_mean])
    w.add_vision_image_std([float(v) for v in spec.image_std])
    w.add_vision_min_pixels(spec.min_pixels)
    w.add_vision_max_pixels(spec.max_pixels)
    w.add_bool(flag, True)
    if vision.family == "qwen2_5_vl":
        w.add_vision_n_wa_pattern(window_pattern(vision))
        w.add_vision_window_size(vision.window_size)
    elif vision.deepstack_visual_indexes:
        w.add_vision_is_deepstack_layers([i in vision.deepstack_visual_indexes for i in range(vision.depth)])

    for name, param in model.visual.state_dict().items():
        array = param.detach().float().numpy()
        for gguf_name, index in mmproj_names("visual." + name, vision):
            part = np.ascontiguousarray(array[index] if index else array)
            if ftype == "f16" and part.ndim >= 2 and gguf_name != POSITION:
                part = part.astype(np.float16)
            w.add_tensor(gguf_name, part)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ---- reading -------------------------------------------------------------------------------------------------------

@dataclass
class Mmproj:
    """An open mmproj file: the tower's config and image settings (read from the header when opened), and its
    tensors, loaded into a model's tower by fill()."""

    path: Path
    vision: VisionConfig
    spec: ImageSpec
    projection_dim: int  # the decoder width the merger outputs
    file: GGUFFile

    @property
    def language_architecture(self) -> str:
        return LANGUAGE_ARCHITECTURE[self.vision.family]

    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.file.tensors.values())

    def fill(self, model) -> None:
        """Fill model.visual (built from self.vision, on uninitialised storage) from the file, one tensor at a time
        straight from the memory map, as the decoder is filled."""
        if model.visual is None or model.config.vision != self.vision:
            raise ValueError(f"{self.path}: the model's vision config is not this file's")
        targets = {name: target for name, (target, _) in _layout(self.vision).items()}
        shapes = lambda n: self.file.tensors[n].shape  # noqa: E731
        fill(model, list(self.file.tensors), targets.get, shapes, gguf_copier(self.file), str(self.path),
             scope=lambda p: p.startswith("visual."), what=f"a {self.vision.family} vision tower")

    def close(self) -> None:
        self.file.close()


def open_mmproj(path: Path) -> Mmproj:
    """Open an mmproj file and read its header; the tensors stay on disk until fill. Every tensor the tower needs
    must be there with its shape, and no other: else BadCheckpoint naming the file and the tensor, before any
    memory is spent on the model."""
    path = Path(path)
    file = GGUFFile(path)
    try:
        vision, spec, projection_dim = _read_header(file, path)
        _check_tensors(file, vision, path)
    except BaseException:
        file.close()
        raise
    return Mmproj(path, vision, spec, projection_dim, file)


def _layout(vision: VisionConfig) -> dict[str, tuple[Target, tuple[int, ...]]]:
    """Every mmproj tensor a tower of this config needs: where it goes in the model, and its shape."""
    import torch

    from qwenkit.checkpoint.loader import _skip_init
    from qwenkit.model.vision import VisionTower

    with _skip_init(), torch.device("meta"):
        tower = VisionTower(vision)
    out = {}
    for name, param in tower.named_parameters():
        for gguf_name, index in mmproj_names("visual." + name, vision):
            out[gguf_name] = (Target("visual." + name, index), tuple(param[index].shape if index else param.shape))
    return out


def _check_tensors(file: GGUFFile, vision: VisionConfig, path: Path) -> None:
    layout = _layout(vision)
    what = f"a {vision.family} vision tower"
    missing = [n for n in layout if n not in file.tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise BadCheckpoint(f"{path}: missing tensor(s) {', '.join(missing[:3])}{more} for {what}")
    for name, tensor in file.tensors.items():
        if name not in layout:
            raise BadCheckpoint(f"{path}: unexpected tensor {name} for {what}")
        want = layout[name][1]
        if tensor.shape != want:
            raise BadCheckpoint(f"{path}: tensor {name} has shape {list(tensor.shape)}, expected {list(want)}")


def read_mmproj(path: Path, model=None) -> tuple[VisionConfig, ImageSpec]:
    """The tower's VisionConfig and ImageSpec of an mmproj file; with `model` (built with that VisionConfig), its
    tower's parameters are filled from the file too."""
    mmproj = open_mmproj(path)
    try:
        if model is not None:
            mmproj.fill(model)
        return mmproj.vision, mmproj.spec
    finally:
        mmproj.close()


def _known(values: tuple[float, ...]) -> tuple[float, ...]:
    """The file keeps image_mean / image_std in float32 (llama.cpp reads them so). The processor normalises with
    float32 constants too, so pixels come out the same either way; where the values are the released constants at
    float32 precision they are taken as those, so the spec equals (and hashes like) the folder's."""
    for known in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, (0.5, 0.5, 0.5)):
        if np.array_equal(np.float32(values), np.float32(known)):
            return known
    return values


def _read_header(file: GGUFFile, path: Path) -> tuple[VisionConfig, ImageSpec, int]:
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch != MMPROJ_ARCHITECTURE:
        raise BadCheckpoint(f"{path}: not a vision projector (mmproj) file: general.architecture is {arch!r}, "
                            f"expected {MMPROJ_ARCHITECTURE!r}")
    if meta.get("clip.has_vision_encoder") is not True:
        raise UnsupportedModel(f"{path}: the mmproj file has no vision encoder (clip.has_vision_encoder)")
    projector = meta.get("clip.vision.projector_type", meta.get("clip.projector_type"))  # per modality if mixed
    family = FAMILY_OF.get(projector) if isinstance(projector, str) else None
    if family is None:
        raise UnsupportedModel(f"{path}: projector type {projector!r} is not supported (qwenkit reads "
                               f"{', '.join(PROJECTOR_TYPES.values())})")

    def uint(key: str, default: Any = KeyError) -> int:
        value = meta.get(key, default)
        if value is KeyError:
            raise BadCheckpoint(f"{path}: missing metadata key {key}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadCheckpoint(f"{path}: metadata {key} must be a non-negative integer, got {value!r}")
        return value

    def flag(key: str) -> bool:
        value = meta.get(key, False)
        if not isinstance(value, bool):
            raise BadCheckpoint(f"{path}: metadata {key} must be a boolean, got {value!r}")
        return value

    def floats(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = meta.get(key, default)
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value)):
            raise BadCheckpoint(f"{path}: metadata {key} must be 3 finite numbers, got {value!r}")
        return tuple(float(v) for v in value)

    depth = uint("clip.vision.block_count")
    patch = file.tensors.get(PATCH)
    if patch is None:
        raise BadCheckpoint(f"{path}: missing tensor {PATCH}")
    if len(patch.shape) != 4 or patch.shape[1] != 3:
        raise BadCheckpoint(f"{path}: tensor {PATCH} has shape {list(patch.shape)}, expected [hidden, 3, patch, "
                            f"patch]")
    # The tower is built (on the meta device) before its tensors are checked: its depth must not exceed the file's.
    if depth and f"v.blk.{depth - 1}.ln1.weight" not in file.tensors:
        raise BadCheckpoint(f"{path}: clip.vision.block_count is {depth} but there is no tensor "
                            f"v.blk.{depth - 1}.ln1.weight")
    use_silu, use_gelu = flag("clip.use_silu"), flag("clip.use_gelu")
    if use_silu and use_gelu:
        raise BadCheckpoint(f"{path}: both clip.use_silu and clip.use_gelu are set")
    act = "silu" if use_silu else "gelu_pytorch_tanh" if use_gelu else _DEFAULT_ACT[family]
    fields: dict[str, Any] = dict(
        family=family, depth=depth, hidden_size=uint("clip.vision.embedding_length"),
        intermediate_size=uint("clip.vision.feed_forward_length"), num_heads=uint("clip.vision.attention.head_count"),
        out_hidden_size=uint("clip.vision.projection_dim"), in_channels=3,
        patch_size=uint("clip.vision.patch_size"), temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=uint("clip.vision.spatial_merge_size", 2), hidden_act=act, rope_theta=VISION_ROPE_THETA,
    )
    if family == "qwen2_5_vl":
        fields["window_size"] = uint("clip.vision.window_size", DEFAULT_WINDOW)
        fields["fullatt_block_indexes"] = _full_blocks(uint("clip.vision.n_wa_pattern", 0), depth)
    else:
        table = file.tensors.get(POSITION)
        if table is None:
            raise BadCheckpoint(f"{path}: missing tensor {POSITION}")
        rows = table.shape[0] if len(table.shape) == 2 else 0
        if rows == 0 or math.isqrt(rows) ** 2 != rows:
            raise BadCheckpoint(f"{path}: tensor {POSITION} has shape {list(table.shape)}, expected a square "
                                f"number of rows of the tower's width")
        fields["num_position_embeddings"] = rows
        layers = meta.get("clip.vision.is_deepstack_layers", [])
        if not isinstance(layers, list) or (layers and len(layers) != depth) \
                or not all(isinstance(b, bool) for b in layers):
            raise BadCheckpoint(f"{path}: metadata clip.vision.is_deepstack_layers must be {depth} booleans")
        fields["deepstack_visual_indexes"] = [i for i, b in enumerate(layers) if b]
    try:
        vision = VisionConfig(**fields)
    except BadCheckpoint as e:
        raise BadCheckpoint(f"{path}: {e}") from None

    default = DEFAULT_SPECS[family]
    spec = ImageSpec(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=uint("clip.vision.image_min_pixels", default.min_pixels),
        max_pixels=uint("clip.vision.image_max_pixels", default.max_pixels),
        image_mean=_known(floats("clip.vision.image_mean", default.image_mean)),  # type: ignore[arg-type]
        image_std=_known(floats("clip.vision.image_std", default.image_std)),  # type: ignore[arg-type]
    )
    if min(spec.image_std) <= 0 or not 0 < spec.min_pixels <= spec.max_pixels:
        raise BadCheckpoint(f"{path}: image_std must be positive and 0 < image_min_pixels <= image_max_pixels")
    return vision, spec, vision.out_hidden_size


# ---- pairing with the language model --------------------------------------------------------------------------------

IMAGE_PAD, VISION_START = "<|image_pad|>", "<|vision_start|>"


def attach_tower(config, meta: dict[str, Any], mmproj: Mmproj, source: str) -> None:
    """Make a VL language GGUF's decoder config (ModelConfig.from_gguf_metadata of `meta`) the whole model's: the
    tower from the mmproj, and the image placeholder tokens found by their text in the GGUF's vocabulary (the file
    records no ids; llama.cpp's mtmd finds its markers by text too). BadCheckpoint where the two files do not pair."""
    family = mmproj.vision.family
    arch = meta.get("general.architecture")
    if arch != mmproj.language_architecture:
        raise BadCheckpoint(f"{mmproj.path}: a {PROJECTOR_TYPES[family]} projector goes with a "
                            f"{mmproj.language_architecture} language model, but {source} is {arch!r}")
    if mmproj.projection_dim != config.hidden_size:
        raise BadCheckpoint(f"{mmproj.path}: the projector outputs {mmproj.projection_dim} features, but the "
                            f"decoder of {source} is {config.hidden_size} wide")
    deepstack = meta.get(f"{arch}.n_deepstack_layers")
    if family == "qwen3_vl" and deepstack is not None and deepstack != len(mmproj.vision.deepstack_visual_indexes):
        raise BadCheckpoint(f"{source}: {arch}.n_deepstack_layers is {deepstack!r}, but {mmproj.path} has "
                            f"{len(mmproj.vision.deepstack_visual_indexes)} DeepStack layers")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise BadCheckpoint(f"{source}: no tokenizer.ggml.tokens to find the image tokens in")
    ids = {}
    for text in (IMAGE_PAD, VISION_START):
        try:
            ids[text] = tokens.index(text)
        except ValueError:
            raise BadCheckpoint(f"{source}: the vocabulary has no {text} token for images") from None
        if ids[text] >= config.vocab_size:
            raise BadCheckpoint(f"{source}: token {text} (id {ids[text]}) is past the embedding's "
                                f"{config.vocab_size} rows")
    config.vision = mmproj.vision
    config.image_token_id, config.vision_start_token_id = ids[IMAGE_PAD], ids[VISION_START]
