"""Qwen2.5-VL and Qwen3-VL against transformers, on tiny random checkpoints and real photos.

The same folder (tests.tiny_vision, written by qwenkit) is opened by transformers' from_pretrained and by
qwenkit.load. The prompt is a chat with two photos of different sizes and aspect ratios, prepared by qwenkit
(template, image reading, preprocessing and the widening of each image's placeholder), then given to both.

Tolerance: fp32 vision features and logits within 1e-4 max abs difference, as in test_model_parity: both sides run
the same fp32 math in another order (SDPA vs eager attention, a linear layer vs Conv3d for the patch embedding,
F.interpolate vs a gathered sum for Qwen3-VL's position table), which leaves ~1e-5 here, while a wrong position,
window or merge order moves features by 1e-1.
"""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit.engine.multimodal import MultimodalPrompt
from qwenkit.model.qwen import ImageRows
from tests.tiny_vision import IMAGE_PAD, tiny_vl_folder, two_photo_chat

pytestmark = pytest.mark.peer
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def pair(request, tmp_path_factory):
    folder = tiny_vl_folder(tmp_path_factory.mktemp(request.param), request.param)
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[request.param]
    reference = cls.from_pretrained(folder, dtype=torch.float32).eval()
    return reference, qwenkit.load(str(folder), quant="none")


def reference_inputs(prepared) -> dict:
    ids = torch.tensor([prepared.prompt_ids])
    return dict(input_ids=ids, pixel_values=torch.cat([im.pixel_values for im in prepared.images]),
                image_grid_thw=torch.tensor([im.grid for im in prepared.images]),
                mm_token_type_ids=(ids == IMAGE_PAD).int(), attention_mask=torch.ones_like(ids))


def test_two_photos_of_different_shapes_are_prepared(pair):
    _, ours = pair
    prepared = ours.prepare_chat(two_photo_chat())
    grids = [im.grid for im in prepared.images]
    assert len(grids) == 2 and grids[0] != grids[1]
    assert (grids[0][1] > grids[0][2]) != (grids[1][1] > grids[1][2])  # one wide (the rotated cat), one tall
    assert prepared.prompt_ids.count(IMAGE_PAD) == sum(t * h * w // 4 for t, h, w in grids)


def test_vision_features_and_logits_match_transformers(pair):
    reference, ours = pair
    prepared = ours.prepare_chat(two_photo_chat())
    inputs = reference_inputs(prepared)
    mm = MultimodalPrompt(prepared.prompt_ids, prepared.images, ours.config)
    with torch.no_grad():
        expected = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        features = mm.encode(ours.model.visual)
        diff = (features.embeds - torch.cat(expected.pooler_output)).abs().max().item()
        assert diff < 1e-4, f"vision features differ by {diff:.2e}"
        if getattr(expected, "deepstack_features", None):
            for got, want in zip(features.deepstack, expected.deepstack_features, strict=True):
                want = torch.cat(want) if isinstance(want, (tuple, list)) else want  # per image in some versions
                assert (got - want).abs().max().item() < 1e-4
        logits = ours.model(inputs["input_ids"], images=ImageRows(mm.rows, features),
                            rope_positions=mm.rope(0, len(prepared.prompt_ids))[:, None])
        diff = (logits - reference(**inputs).logits).abs().max().item()
    assert diff < 1e-4, f"logits differ by {diff:.2e}"


def test_32_greedy_tokens_through_the_engine_match_transformers(pair):
    """The engine path users run: chunked prefill across the image tokens, multimodal positions kept across decode
    steps, paged attention."""
    reference, ours = pair
    prepared = ours.prepare_chat(two_photo_chat(), temperature=0)
    prepared.stop_ids, prepared.max_new_tokens = set(), NEW_TOKENS  # run the full 32 tokens (random weights)
    inputs = reference_inputs(prepared)
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0)[0, len(prepared.prompt_ids):].tolist()
    # The prompt's images span several chunks and blocks; keys and values in float32, as the reference keeps them
    # (the default float16 cache flips near-ties of these random weights).
    ours.start_engine(prefill_chunk=24, block_size=8, kv_dtype=torch.float32)
    got = [t for step in ours.stream(ours.request(prepared)) for t in step.tokens]
    assert got == expected
