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
class SpeculationStats:
    """How speculative decoding went for one answer (qwenkit.engine.speculative)."""

    proposed: int  # tokens guessed (prompt lookup or draft model)
    accepted: int  # of those, tokens the model kept
    decode_passes: int  # model passes after the prompt's; each gave one token of the model's own plus kept guesses

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each decode pass gave (1.0 without speculation)."""
        return (self.decode_passes + self.accepted) / self.decode_passes if self.decode_passes else 1.0


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
    speculation: SpeculationStats | None = None  # on the last response, where the engine speculates

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
            self.speculation = other.speculation
