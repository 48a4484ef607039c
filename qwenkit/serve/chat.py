"""POST /v1/chat/completions: from the request to engine requests, and from engine Responses to OpenAI objects.

tool_choice:
- "auto" (the default when tools are given): tools go into the prompt, generation is free, and the stream parser
  turns `<tool_call>` blocks into tool_calls.
- "none": tools are left out of the prompt and the `<tool_call>` token is masked, so the answer is always a message
  (vLLM renders the tools and skips parsing, which lets the model write calls that come back as raw text).
- "required" / a named function: decoding is constrained by the grammar of Qwen tool calls over the given
  tools' parameter schemas (a named function: exactly one call of it), so the calls always parse and validate.
parallel_tool_calls=false keeps one call (constrained to one where a grammar applies, the first one under auto).
response_format json_object / json_schema constrains the answer to JSON (valid under the schema).
A `<tool_call>` block the model wrote but that does not parse is returned as content, verbatim.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from qwenkit.engine.engine import GenerationRequest
from qwenkit.engine.response import Response
from qwenkit.engine.sampling import TokenLogprob
from qwenkit.errors import BadRequest
from qwenkit.media.sources import SourcePolicy
from qwenkit.serve.format import Job, finite, new_id
from qwenkit.serve.protocol import ChatCompletionRequest, JsonObjectFormat, JsonSchemaFormat, NamedToolChoice


class BannedTokens:
    """A constraint (the Sampler's mask/accept protocol) that never lets the given tokens be sampled."""

    def __init__(self, ids: set[int]):
        self.ids = torch.tensor(sorted(ids), dtype=torch.long)

    def mask(self, logits: torch.Tensor) -> None:
        logits[self.ids[self.ids < logits.shape[-1]]] = float("-inf")

    def accept(self, token: int) -> None:
        pass


def build_chat_job(service, req: ChatCompletionRequest, timeout: float | None) -> Job:
    """Render, tokenize and (when asked) compile a grammar: blocking work, run off the event loop."""
    model = service.model
    adapter = service.adapter_id(req.model)
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise BadRequest("tool_choice: tools must be given unless tool_choice is 'none'")
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    json_format = isinstance(req.response_format, (JsonObjectFormat, JsonSchemaFormat))
    if forced and json_format:
        raise BadRequest("response_format: a JSON answer cannot be combined with a required tool call")

    thinking = req.chat_template_kwargs.enable_thinking if req.chat_template_kwargs else None
    prepared = model.prepare_chat(
        [m.to_template() for m in req.messages],
        tools=tools if choice != "none" else None,
        enable_thinking=thinking,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        image_sources=SourcePolicy.server(service.config.allow_image_urls),
        **req.sampling_kwargs(),
    )

    grammar, banned = None, None
    if json_format:
        fmt = req.response_format
        schema = fmt.json_schema.schema_ if isinstance(fmt, JsonSchemaFormat) else None
        if isinstance(fmt, JsonSchemaFormat) and schema is None:
            schema = {}  # OpenAI allows a json_schema without a schema: any JSON value
        grammar = service.grammar().json(schema, thinking=prepared.thinking)
    elif forced:
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        parallel = req.parallel_tool_calls and name is None
        grammar = service.grammar().tool_calls(tools, name=name, parallel=parallel, thinking=prepared.thinking)
    elif choice == "none" and tools:
        call_id = model.tokenizer.token_to_id("<tool_call>")
        banned = BannedTokens({call_id}) if call_id is not None else None

    requests = []
    for i in range(req.n):
        params = prepared.params
        if i and params.seed is not None:  # n choices of a seeded request differ, and repeat as a whole
            params = dataclasses.replace(params, seed=params.seed + i)
        requests.append(GenerationRequest(
            prompt_ids=prepared.prompt_ids, params=params, max_new_tokens=prepared.max_new_tokens,
            stop_ids=prepared.stop_ids, parser=prepared.new_parser(seed=params.seed),
            constraint=grammar.constraint() if grammar is not None else banned, timeout=timeout,
            adapter=adapter, images=prepared.images,
        ))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    formatter = ChatFormatter(model.tokenizer, req.model or service.config.name, req.n, req.parallel_tool_calls)
    return Job(requests, formatter, len(prepared.prompt_ids), req.stream, include_usage)


class ChatFormatter:
    def __init__(self, tokenizer, model_name: str, n: int, parallel_tool_calls: bool):
        self.tokenizer = tokenizer
        self.model = model_name
        self.n = n
        self.parallel = parallel_tool_calls
        self.id = new_id("chatcmpl")
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    # ---- pieces of a message -----------------------------------------------------------------------------------
    def _calls(self, step: Response) -> list[dict]:
        return [
            {"index": c.index, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in step.tool_calls if self.parallel or c.index == 0
        ]

    @staticmethod
    def _content(step: Response) -> str:
        # Malformed calls come back verbatim, where the text was, rather than vanishing.
        return step.text + "".join(f"<tool_call>{f.raw}</tool_call>" for f in step.tool_call_errors)

    def _logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if not lps:
            return None

        def entry(token: int, logprob: float) -> dict:
            raw = self.tokenizer.token_bytes(token)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": finite(logprob), "bytes": list(raw)}

        return {"content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ]}

    # ---- streaming ---------------------------------------------------------------------------------------------
    def opening_chunks(self) -> list[dict]:
        return [self._object("chat.completion.chunk", [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]) for i in range(self.n)]

    def chunk(self, index: int, step: Response) -> dict | None:
        delta: dict = {}
        if step.reasoning:
            delta["reasoning_content"] = step.reasoning
        content = self._content(step)
        if content:
            delta["content"] = content
        calls = self._calls(step)
        if calls:
            delta["tool_calls"] = calls
        logprobs = self._logprobs(step.logprobs)
        if not delta and logprobs is None and step.finish_reason is None:
            return None
        return self._object("chat.completion.chunk", [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": step.finish_reason}
        ])

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._object("chat.completion.chunk", []), "usage": usage}

    # ---- one response ------------------------------------------------------------------------------------------
    def final(self, totals: list[Response], usage: dict) -> dict:
        choices = []
        for i, total in enumerate(totals):
            calls = self._calls(total)
            content = self._content(total)
            message = {
                "role": "assistant",
                "content": content if content or not calls else None,
                "reasoning_content": total.reasoning or None,
            }
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "logprobs": self._logprobs(total.logprobs),
                            "finish_reason": total.finish_reason})
        return {**self._object("chat.completion", choices), "usage": usage}

