"""Images inside the engine: what a request with images carries, and what its sequence keeps about them.

A prompt with images holds one run of image tokens per image (t * h * w / merge^2 of them). For the model, those
tokens' embeddings are replaced by the vision tower's features, and every token gets multimodal rotary positions
(qwenkit.model.rope.multimodal_positions). The tower runs once per request, when a pass first reaches one of its
image tokens, on all of its images together; the features are dropped once the prompt is computed (a preempted
request encodes again if the prefix cache no longer holds its images' keys and values).

The prefix cache must not confuse two images: every image token is the same id. For hashing, each image's tokens
are replaced by a key drawn from its pixels' digest, so the same image after the same text shares blocks, and a
different image does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenkit.errors import BadRequest
from qwenkit.model.config import ModelConfig
from qwenkit.model.rope import multimodal_positions
from qwenkit.model.vision import VisionFeatures, num_image_tokens


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image of a request (qwenkit.media.image.preprocess)."""

    pixel_values: torch.Tensor  # [patches, C * T * p * p], float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    digest: bytes  # identity of the pixels: the prefix cache's key for its tokens


class MultimodalPrompt:
    def __init__(self, prompt_ids: list[int], images: list[ImageInput], config: ModelConfig):
        if config.vision is None:
            raise BadRequest("this model does not take images")
        merge = config.vision.spatial_merge_size
        self.images = images
        placeholders = [i for i, t in enumerate(prompt_ids) if t == config.image_token_id]
        counts = [num_image_tokens(im.grid, merge) for im in images]
        if len(placeholders) != sum(counts):
            raise BadRequest(f"the prompt has {len(placeholders)} image tokens where its {len(images)} image(s) "
                             f"need {sum(counts)}")
        self.rows = torch.tensor(placeholders, dtype=torch.long)  # prompt index of each image token, in order
        self.positions, self.delta = multimodal_positions(prompt_ids, [im.grid for im in images],
                                                          config.image_token_id, merge)
        self.keys = list(prompt_ids)
        at = 0
        for image, n in zip(images, counts):
            key = -1 - int.from_bytes(image.digest[:7], "little")  # negative: never a real token id
            for row in placeholders[at : at + n]:
                self.keys[row] = key
            at += n
        self.features: VisionFeatures | None = None

    def rope(self, first: int, end: int) -> torch.Tensor:
        """Rotary positions [3, end - first] of tokens [first, end): the prompt's own, then index + delta."""
        prompt = self.positions.shape[1]
        head = self.positions[:, first:min(end, prompt)]
        tail = torch.arange(max(first, prompt), max(end, prompt)) + self.delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    def image_rows(self, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens [first, end): the offsets (from first) of the image tokens among them, and their rows in the
        features."""
        lo, hi = torch.searchsorted(self.rows, torch.tensor([first, end])).tolist()
        return self.rows[lo:hi] - first, torch.arange(lo, hi)

    def encode(self, tower) -> VisionFeatures:
        """The features of all of the request's images (the vision tower runs on first use)."""
        if self.features is None:
            pixels = torch.cat([im.pixel_values for im in self.images]).to(tower.dtype)
            self.features = tower(pixels, [im.grid for im in self.images])
        return self.features
