"""Pydantic models of the OpenAI API requests the server accepts (and vLLM's /tokenize and /detokenize).

Every model forbids unknown fields (vLLM silently ignores them; a misspelt `max_token` should not go unnoticed) and
validates strictly: a string where a number belongs is an error, not a coercion. Value ranges are checked once, by
SamplingParams, so they cannot drift from what the engine accepts. Role-specific rules of messages (a tool message
needs content, only assistants carry tool calls) are checked by the chat template's normalisation (text.chat).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from qwenkit.errors import BadRequest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- messages ------------------------------------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str  # a data: URL (or http(s) with --allow-image-urls)
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; the model's own limits apply


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(Strict):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # present when a client echoes back accumulated stream deltas


class Message(Strict):
    """One message of any role. The fields OpenAI clients echo back from a response (refusal, annotations, audio,
    function_call: all null here) are accepted so `messages.append(response.choices[0].message)` works."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    def to_template(self) -> dict[str, Any]:
        """The plain dict the chat template takes (OpenAI's `developer` role is the system role of open models)."""
        out = self.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio", "function_call"})
        if out["role"] == "developer":
            out["role"] = "system"
        for call in out.get("tool_calls", []):
            call.pop("index", None)
        return out


# ---- tools and output formats ------------------------------------------------------------------------------------
class FunctionDef(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: bool = False


class ChatTemplateKwargs(Strict):
    enable_thinking: bool | None = None


# ---- sampling, shared by both completion endpoints ----------------------------------------------------------------
class Sampling(Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as in OpenAI's API) -> bias in [-100, 100]
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored: an opaque end-user id

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams (None values fall back to the model's defaults)."""
        keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "max_tokens", "stop_token_ids")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise BadRequest("logit_bias: keys must be token ids (integers as strings)") from None
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return out


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # vLLM's prefill options: continue the last assistant message (the router's mid-stream failover sends the
    # partial answer this way) instead of opening a new turn.
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins over the deprecated max_tokens
            out["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            out["logprobs"] = True
            out["top_logprobs"] = self.top_logprobs or 0
        return out


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None  # legacy completions: how many alternatives per token (0: the chosen one only)
    suffix: None = None  # accepted only as null: fill-in-the-middle is not supported

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        if self.logprobs is not None:
            out["logprobs"] = True
            out["top_logprobs"] = self.logprobs
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one string or token list, or a batch of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


# ---- vLLM's tokenizer endpoints ----------------------------------------------------------------------------------
class TokenizeCompletion(Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # Qwen tokenizers add none; accepted for vLLM compatibility
    return_token_strs: bool = False


class TokenizeChat(Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: ChatTemplateKwargs | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# Known OpenAI fields this server does not implement: rejected with a clearer message than "unknown field".
UNSUPPORTED_FIELDS = frozenset({
    "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
    "reasoning_effort", "best_of", "store", "metadata", "service_tier", "verbosity", "prompt_cache_key",
})
