"""Shared pieces of the OpenAI response shapes: ids, usage, the job both endpoints hand to the streaming loop."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol

from qwenkit.engine.engine import GenerationRequest
from qwenkit.engine.response import Response, Usage

_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens with this floor too


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(prompt_tokens: int, finals: list[Usage | None]) -> dict:
    """Usage of a whole request: each distinct prompt once (n choices share it), every choice's completion."""
    return usage_dict(prompt_tokens, sum(u.completion_tokens for u in finals if u is not None))


class Formatter(Protocol):
    """Turns the engine's Responses into one endpoint's JSON objects (chat.completion or text_completion)."""

    def opening_chunks(self) -> list[dict]: ...

    def chunk(self, index: int, step: Response) -> dict | None: ...

    def usage_chunk(self, usage: dict) -> dict: ...

    def final(self, totals: list[Response], usage: dict) -> dict: ...


@dataclass
class Job:
    """What a completion request turned into: the engine requests (one per choice, in choice order) and how to
    present their output."""

    requests: list[GenerationRequest]
    formatter: Formatter
    prompt_tokens: int  # distinct prompt tokens, for usage
    stream: bool
    include_usage: bool
