"""What generation yields: one Response per step when streaming, one aggregated Response otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenkit.engine.sampling import TokenLogprob


@dataclass
class ToolCallRecord:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as text (the OpenAI convention)


@dataclass
class ToolCallFailure:
    index: int
    raw: str
    message: str


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Response:
    text: str = ""  # answer text (a delta while streaming)
    reasoning: str = ""  # <think> text (a delta while streaming)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    tool_call_errors: list[ToolCallFailure] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "tool_calls" on the last response
    usage: Usage | None = None  # on the last response
    prompt_tps: float = 0.0  # prefill tokens per second
    generation_tps: float = 0.0  # decode tokens per second
    time_to_first_token: float = 0.0  # seconds
    peak_memory_gb: float = 0.0  # peak resident memory of the process

    def merge(self, other: Response) -> None:
        """Append a streamed step to this aggregate."""
        self.text += other.text
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        self.tool_call_errors += other.tool_call_errors
        self.tokens += other.tokens
        self.logprobs += other.logprobs
        if other.finish_reason is not None:
            self.finish_reason = other.finish_reason
            self.usage = other.usage
            self.prompt_tps, self.generation_tps = other.prompt_tps, other.generation_tps
            self.time_to_first_token, self.peak_memory_gb = other.time_to_first_token, other.peak_memory_gb
