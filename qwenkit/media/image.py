"""Image input for Qwen2.5-VL and Qwen3-VL: decode untrusted bytes safely, then compute the vision tower's patches.

preprocess() computes what transformers' Qwen2VLImageProcessorPil computes (the image processor both families
use), step for step and dtype for dtype, so pixel_values are bit-identical to it:
  PIL BICUBIC resize of the uint8 RGB image to smart_resize's size -> x float64 * (1/255) -> float32
  -> (x - mean) / std in float32 -> patches in merge-window order, each frame repeated temporal_patch_size times.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from qwenkit.errors import BadCheckpoint, BadImage, UnsupportedModel
from qwenkit.media.sources import sniff_format

MAX_INPUT_PIXELS = 50_000_000  # a decoded image this big is 150 MB of RGB; anything larger is refused unread
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses more, so the model never saw such an image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """How one model family cuts an image into patches (the fields of its preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: one merge window of patches."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, raw: dict) -> ImageSpec:
        """Read a Hugging Face preprocessor_config.json. Missing keys take Qwen2VLImageProcessor's class defaults,
        as transformers would; top-level min_pixels/max_pixels win over size{shortest_edge,longest_edge}, as there."""
        # We implement only the standard pipeline; a config that turns a step off or changes it would be run wrong.
        for key, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                          ("do_convert_rgb", True), ("resample", 3)):
            if raw.get(key, want) not in (want, None):
                raise UnsupportedModel(f"preprocessor_config.json: {key}={raw[key]!r} is not supported "
                                       f"(qwenkit implements {key}={want!r})")
        if not math.isclose(raw.get("rescale_factor") or 1 / 255, 1 / 255, rel_tol=1e-6):
            raise UnsupportedModel(f"preprocessor_config.json: rescale_factor={raw['rescale_factor']!r} is not "
                                   "supported (qwenkit implements 1/255)")
        size = raw.get("size") or {}
        d = cls()

        def pick(*values):
            return next(v for v in values if v is not None)

        try:
            spec = cls(
                patch_size=int(pick(raw.get("patch_size"), d.patch_size)),
                temporal_patch_size=int(pick(raw.get("temporal_patch_size"), d.temporal_patch_size)),
                merge_size=int(pick(raw.get("merge_size"), d.merge_size)),
                min_pixels=int(pick(raw.get("min_pixels"), size.get("shortest_edge"), d.min_pixels)),
                max_pixels=int(pick(raw.get("max_pixels"), size.get("longest_edge"), d.max_pixels)),
                image_mean=tuple(float(v) for v in pick(raw.get("image_mean"), d.image_mean)),
                image_std=tuple(float(v) for v in pick(raw.get("image_std"), d.image_std)),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise BadCheckpoint(f"preprocessor_config.json: a field has the wrong type ({e})") from None
        if len(spec.image_mean) != 3 or len(spec.image_std) != 3 or min(spec.image_std) <= 0:
            raise BadCheckpoint("preprocessor_config.json: image_mean and image_std must be 3 numbers, std > 0")
        if min(spec.patch_size, spec.temporal_patch_size, spec.merge_size, spec.min_pixels) < 1 \
                or spec.max_pixels < spec.min_pixels:
            raise BadCheckpoint("preprocessor_config.json: patch sizes and pixel bounds must be positive, "
                                "min_pixels <= max_pixels")
        return spec


# What the published checkpoints' preprocessor_config.json say (Qwen/Qwen2.5-VL-*-Instruct and Qwen/Qwen3-VL-*),
# i.e. what transformers' AutoProcessor builds for them. Note Qwen2.5-VL's max_pixels is 28*28*16384, not the class
# default 28*28*1280 that from_preprocessor_config falls back to for a config without the key.
QWEN25_VL = ImageSpec(patch_size=14, min_pixels=3136, max_pixels=12845056)
QWEN3_VL = ImageSpec(patch_size=16, min_pixels=65536, max_pixels=16777216,
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) transformers resizes to: multiples of factor, min_pixels <= h*w <= max_pixels, close to
    the original aspect ratio. Same maths as transformers' smart_resize, rounding (Python's round) included."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadImage(f"{width}x{height} pixels: aspect ratio {max(height, width) / min(height, width):.0f}:1 is "
                       f"over the limit of {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_DECODED = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}  # Pillow's format name -> the name users know


class _EndTrackingReader(io.BytesIO):
    """Remembers whether the decoder asked for bytes past the end. A complete JPEG, PNG or WebP never does, a truncated
    one always does: this catches truncation even when some other code in the process has set Pillow's global
    ImageFile.LOAD_TRUNCATED_IMAGES, which makes load() pad a truncated image with grey instead of raising."""

    ran_out = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if size != 0 and not chunk:
            self.ran_out = True
        return chunk


def load_image(data: bytes, *, source: str, max_pixels_in: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode untrusted image bytes (JPEG, PNG or WebP) into an upright RGB image.

    source names the image in error messages (a path, or "image 2 of the request"). Every failure is a BadImage with
    a one-line message; nothing Pillow raises gets through. The pixel count is checked from the header, before
    anything is decoded. Animated PNG/WebP give their first frame, as transformers does.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise BadImage(f"{source}: not an image (expected JPEG, PNG or WebP)")
    if fmt not in _DECODED:
        raise BadImage(f"{source}: format {fmt} not supported (JPEG, PNG, WebP)")
    name = _DECODED[fmt]
    reader = _EndTrackingReader(data)
    # Pillow raises anything from OSError to SyntaxError, struct.error or IndexError on hostile input, hence the
    # broad excepts: each one only turns "Pillow could not read this" into a message naming the image.
    try:
        img = Image.open(reader, formats=[fmt])  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own hard limit (about 179 megapixels), hit inside open()
        raise BadImage(f"{source}: over Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels") from None
    except Exception:
        raise BadImage(f"{source}: {name} truncated or corrupt") from None
    width, height = img.size
    if width * height > max_pixels_in:
        raise BadImage(f"{source}: {width}x{height} pixels is over the limit of {max_pixels_in}")
    try:
        img.load()  # the full decode, so that a broken file fails here and not in the middle of a batch
        if reader.ran_out:
            raise OSError("image data ends early")
        img = ImageOps.exif_transpose(img)  # phone photos are stored sideways with an EXIF orientation tag
    except Exception:
        raise BadImage(f"{source}: {name} truncated or corrupt") from None
    return to_rgb(img)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb makes it: transparency is composited onto white (a plain convert('RGB')
    would keep whatever colour hides under transparent pixels, often black); other modes are converted directly."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, spec: ImageSpec, *, source: str = "image") -> tuple[torch.Tensor,
                                                                                      tuple[int, int, int]]:
    """pixel_values float32 [grid_h*grid_w, 3*temporal_patch_size*patch_size**2] and grid_thw (1, grid_h, grid_w),
    bit-identical to transformers' Qwen2VLImageProcessorPil with the same spec."""
    image = to_rgb(image)  # a no-op copy for load_image's output
    try:
        height, width = smart_resize(image.height, image.width, spec.factor, spec.min_pixels, spec.max_pixels)
    except BadImage as e:
        raise BadImage(f"{source}: {e}") from None
    # transformers resizes even when the size is unchanged; PIL then returns an identical copy, so no shortcut needed.
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))  # (H, W, 3) uint8
    # Rescale in float64, then round to float32, then normalize in float32: transformers' exact steps. Multiplying by
    # 1/255 is not always the same float as dividing by 255, so we multiply as it does.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(spec.image_mean, dtype=np.float32)) / np.array(spec.image_std, dtype=np.float32)

    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    patches = torch.from_numpy(x).permute(2, 0, 1)  # (C, H, W)
    patches = patches.reshape(3, grid_h // m, m, p, grid_w // m, m, p)
    # Patches in merge-window order (each m x m window's patches consecutive, as the merger expects), each patch laid
    # out channel, time, row, column; a still image is its own video of t identical frames.
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
    return patches.reshape(grid_h * grid_w, 3 * t * p * p), (1, grid_h, grid_w)
