"""Image loading and preprocessing for Qwen2.5-VL / Qwen3-VL: bit-exact against transformers' Qwen2VLImageProcessorPil
on real photos (tests/fixtures/images, CC0 / public domain), EXIF orientation, and hostile or unsupported files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from qwenkit.errors import BadImage, BadRequest, QwenkitError, UnsupportedModel
from qwenkit.media.image import QWEN3_VL, QWEN25_VL, ImageSpec, load_image, preprocess, smart_resize
from qwenkit.model.vision import num_image_tokens

try:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
except ImportError:  # the peer is optional; the loader tests below do not need it
    Qwen2VLImageProcessorPil = None

needs_transformers = pytest.mark.skipif(Qwen2VLImageProcessorPil is None, reason="transformers not installed")

IMAGES = Path(__file__).resolve().parent.parent / "fixtures" / "images"
FIXTURES = ["chelsea_exif6.jpg", "astronaut_tall.png", "coffee_wide.webp"]

# (name, spec, how the fixture's pixel count must compare with the resized one: "down", "up" or None)
SPECS = [
    ("qwen25", QWEN25_VL, None),
    ("qwen3", QWEN3_VL, None),
    ("max_pixels_downscale", ImageSpec(patch_size=14, max_pixels=28 * 28 * 16), "down"),
    ("min_pixels_upscale", ImageSpec(patch_size=16, min_pixels=512 * 512, max_pixels=1024 * 1024,
                                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)), "up"),
]


def reference(image: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """transformers' output for the same image, the processor built with the spec's fields."""
    processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size, merge_size=spec.merge_size,
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        image_mean=list(spec.image_mean), image_std=list(spec.image_std),
    )
    out = processor(images=image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def load_fixture(name: str) -> Image.Image:
    return load_image((IMAGES / name).read_bytes(), source=name)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height RGB pixels, and no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def bad_image(data: bytes, match: str, **kwargs) -> BadImage:
    with pytest.raises(BadImage, match=match) as info:
        load_image(data, source="image 2 of the request", **kwargs)
    message = str(info.value)
    assert message.startswith("image 2 of the request: ") and "\n" not in message
    e = info.value  # no Pillow traceback chained on
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    return e


# --- parity with transformers -------------------------------------------------------------------------------------


@pytest.mark.peer
@needs_transformers
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("label, spec, scaling", SPECS, ids=[s[0] for s in SPECS])
def test_matches_transformers_bit_for_bit(name, label, spec, scaling):
    image = load_fixture(name)
    pixel_values, grid = preprocess(image, spec)
    ref_values, ref_grid = reference(image, spec)

    assert grid == ref_grid
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == (grid[1] * grid[2], 3 * spec.temporal_patch_size * spec.patch_size**2)
    # Same operations in the same dtypes in the same order (see qwenkit/media/image.py): exactly equal, no tolerance.
    assert np.array_equal(pixel_values.numpy(), ref_values)

    resized = grid[1] * grid[2] * spec.patch_size**2
    if scaling == "down":
        assert resized <= spec.max_pixels < image.width * image.height
    if scaling == "up":
        assert image.width * image.height < spec.min_pixels <= resized


@pytest.mark.peer
@needs_transformers
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparent", "L", "CMYK"])
def test_other_modes_convert_like_transformers(mode):
    """Transparency is composited onto white and grey/CMYK are converted as transformers' convert_to_rgb does: our
    load_image output fed to preprocess equals transformers fed the undecoded-mode image."""
    photo = load_fixture("coffee_wide.webp").resize((160, 90))
    alpha = Image.linear_gradient("L").resize(photo.size)  # from fully transparent to opaque
    if mode == "RGBA":
        image, fmt = photo.copy(), "PNG"
        image.putalpha(alpha)
    elif mode == "LA":
        image, fmt = photo.convert("L"), "PNG"
        image.putalpha(alpha)
    elif mode == "P-transparent":
        image, fmt = photo.quantize(64), "PNG"
        image.info["transparency"] = 0
    elif mode == "L":
        image, fmt = photo.convert("L"), "JPEG"
    else:
        image, fmt = photo.convert("CMYK"), "JPEG"
    data = encode(image, fmt, **({"transparency": 0} if mode == "P-transparent" else {}))
    as_decoded = Image.open(io.BytesIO(data))
    assert as_decoded.mode == image.mode

    ours = load_image(data, source="x")
    assert ours.mode == "RGB"
    pixel_values, grid = preprocess(ours, QWEN25_VL)
    ref_values, ref_grid = reference(as_decoded, QWEN25_VL)
    assert grid == ref_grid and np.array_equal(pixel_values.numpy(), ref_values)


@pytest.mark.peer
@needs_transformers
def test_smart_resize_matches_transformers():
    sizes = [(1, 1), (13, 13), (28, 28), (41, 99), (200, 300), (300, 200), (3, 590), (1080, 1920), (4000, 3000),
             (9999, 61), (12000, 12000)]
    for spec in (QWEN25_VL, QWEN3_VL, ImageSpec()):
        for h, w in sizes:
            assert smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels) == \
                hf_smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels), (spec, h, w)


# --- EXIF, specs, token counts ------------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied():
    data = (IMAGES / "chelsea_exif6.jpg").read_bytes()
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (200, 300) and stored.getexif()[0x0112] == 6  # stored sideways, tagged "rotate 90 CW"

    image = load_image(data, source="chelsea_exif6.jpg")
    assert image.size == (300, 200)
    assert np.array_equal(np.asarray(image), np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)))

    _, grid = preprocess(image, QWEN25_VL)
    assert grid == (1, *(side // 14 for side in smart_resize(200, 300, 28, QWEN25_VL.min_pixels,
                                                             QWEN25_VL.max_pixels)))
    assert grid == (1, 14, 22)  # landscape after rotation: fewer rows than columns


def test_spec_from_preprocessor_config():
    qwen3 = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
             "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
    qwen25 = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
              "processor_class": "Qwen2_5_VLProcessor", "do_rescale": True, "rescale_factor": 0.00392156862745098,
              "resample": 3}
    assert ImageSpec.from_preprocessor_config(qwen3) == QWEN3_VL
    assert ImageSpec.from_preprocessor_config(qwen25) == QWEN25_VL
    assert ImageSpec.from_preprocessor_config({}) == ImageSpec(14, 2, 2, 56 * 56, 28 * 28 * 1280)
    # top-level min/max_pixels win over size, as in transformers' __init__
    both = ImageSpec.from_preprocessor_config({"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 100,
                                               "max_pixels": 10000})
    assert (both.min_pixels, both.max_pixels) == (100, 10000)
    with pytest.raises(UnsupportedModel, match="resample=2"):
        ImageSpec.from_preprocessor_config({"resample": 2})
    with pytest.raises(QwenkitError, match="image_mean"):
        ImageSpec.from_preprocessor_config({"image_mean": [0.5, 0.5]})


def test_num_image_tokens():
    assert num_image_tokens((1, 14, 22), 2) == 77
    _, grid = preprocess(load_fixture("coffee_wide.webp"), QWEN3_VL)
    assert num_image_tokens(grid, QWEN3_VL.merge_size) == grid[1] * grid[2] // 4


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_image_is_a_400_bad_request():
    assert issubclass(BadImage, BadRequest) and issubclass(BadImage, QwenkitError)


def test_not_an_image():
    bad_image(b"", r"^image 2 of the request: not an image \(expected JPEG, PNG or WebP\)$")
    bad_image(b"hello, this is text", "not an image")
    bad_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "PNG truncated or corrupt")  # right magic, garbage after


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_file(name, load_truncated, monkeypatch):
    """Cut in half, the file is refused even when someone has set Pillow's global LOAD_TRUNCATED_IMAGES (with it,
    Pillow itself would silently pad a truncated JPEG or PNG with grey)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = (IMAGES / name).read_bytes()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WebP"}[name.rsplit(".", 1)[1]]
    bad_image(data[: len(data) // 2], rf"^image 2 of the request: {fmt} truncated or corrupt$")
    bad_image(data[:-30], f"{fmt} truncated or corrupt")
    load_image(data + b"\0" * 16, source=name)  # trailing bytes after a complete image are harmless


@pytest.mark.parametrize("fmt, name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_unsupported_format(fmt, name):
    data = encode(Image.new("RGB", (8, 8), (200, 10, 10)), fmt)
    bad_image(data, rf"^image 2 of the request: format {name} not supported \(JPEG, PNG, WebP\)$")


def test_pixel_cap_is_checked_before_decoding():
    # The header claims 8000x8000 and there is no pixel data: "over the limit" (not "truncated") shows the check
    # comes from the header alone, before any decode.
    bad_image(png_header(8000, 8000), r"^image 2 of the request: 8000x8000 pixels is over the limit of 50000000$")
    bad_image(png_header(20000, 20000), "over Pillow's limit")  # past Pillow's own hard limit, raised inside open()
    bad_image((IMAGES / "coffee_wide.webp").read_bytes(), "640x360 pixels is over the limit of 1000$",
              max_pixels_in=1000)
    with pytest.raises(BadImage, match="PNG truncated or corrupt"):  # under the cap it is read, and found empty
        load_image(png_header(80, 80), source="x")


def test_aspect_ratio_over_200():
    data = encode(Image.new("RGB", (1005, 5), (0, 120, 0)), "PNG")
    image = load_image(data, source="strip.png")
    with pytest.raises(BadImage, match=r"^strip.png: 1005x5 pixels: aspect ratio 201:1 is over the limit of 200:1$"):
        preprocess(image, QWEN25_VL, source="strip.png")
    with pytest.raises(BadImage, match="aspect ratio"):
        smart_resize(5, 1005, 28, 3136, 1003520)
    preprocess(Image.new("RGB", (1000, 5)), QWEN25_VL)  # exactly 200:1 is allowed, as in transformers
