"""POST /v1/completions: raw continuation of a prompt (a string, token ids, or a batch of either), no chat template.

Choice i*n + j is the j-th sample of prompt i, as in OpenAI's API. `echo` puts the prompt text before the answer;
`logprobs` (an integer: how many alternatives per token) comes in the legacy shape (tokens, token_logprobs,
top_logprobs, text_offset). Prompt logprobs (echo with logprobs) are not computed, so that combination is refused.
"""

from __future__ import annotations

import dataclasses
import time

from qwenkit.engine.engine import GenerationRequest
from qwenkit.engine.response import Response
from qwenkit.engine.sampling import TokenLogprob
from qwenkit.errors import BadRequest
from qwenkit.serve.format import Job, finite, new_id
from qwenkit.serve.protocol import CompletionRequest


def build_completion_job(service, req: CompletionRequest, timeout: float | None) -> Job:
    model = service.model
    adapter = service.adapter_id(req.model)
    if req.echo and req.logprobs is not None:
        raise BadRequest("echo: prompt logprobs are not supported; use echo or logprobs, not both")
    prompts = req.prompts()
    if not prompts:
        raise BadRequest("prompt: must not be empty")
    requests, echoes, prompt_tokens = [], [], 0
    for prompt in prompts:
        prepared = model.prepare_generate(prompt, **req.sampling_kwargs())
        prompt_tokens += len(prepared.prompt_ids)
        text = prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt, skip_special_tokens=False)
        for j in range(req.n):
            params = prepared.params
            if j and params.seed is not None:
                params = dataclasses.replace(params, seed=params.seed + j)
            requests.append(GenerationRequest(
                prompt_ids=prepared.prompt_ids, params=params, max_new_tokens=prepared.max_new_tokens,
                stop_ids=prepared.stop_ids, timeout=timeout, adapter=adapter,
            ))
            echoes.append(text if req.echo else "")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    formatter = CompletionFormatter(model.tokenizer, req.model or service.config.name, echoes)
    return Job(requests, formatter, prompt_tokens, req.stream, include_usage)


class CompletionFormatter:
    def __init__(self, tokenizer, model_name: str, echoes: list[str]):
        self.tokenizer = tokenizer
        self.model = model_name
        self.echoes = echoes
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self._offsets = [len(e) for e in echoes]  # text_offset of the next token of each choice

    def _object(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}

    def _logprobs(self, index: int, lps: list[TokenLogprob]) -> dict | None:
        if not lps:
            return None

        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            raw = self.tokenizer.token_bytes(lp.token)
            out["tokens"].append(_name(raw))
            out["token_logprobs"].append(finite(lp.logprob))
            out["top_logprobs"].append({_name(self.tokenizer.token_bytes(tok)): finite(v) for tok, v in lp.top}
                                       if lp.top else None)
            out["text_offset"].append(self._offsets[index])
            self._offsets[index] += len(raw.decode("utf-8", errors="replace"))
        return out


    # ---- streaming ---------------------------------------------------------------------------------------------
    def opening_chunks(self) -> list[dict]:
        return [self._object([{"index": i, "text": echo, "logprobs": None, "finish_reason": None}])
                for i, echo in enumerate(self.echoes) if echo]

    def chunk(self, index: int, step: Response) -> dict | None:
        logprobs = self._logprobs(index, step.logprobs)
        if not step.text and logprobs is None and step.finish_reason is None:
            return None
        return self._object([{"index": index, "text": step.text, "logprobs": logprobs,
                              "finish_reason": step.finish_reason}])

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._object([]), "usage": usage}

    # ---- one response ------------------------------------------------------------------------------------------
    def final(self, totals: list[Response], usage: dict) -> dict:
        choices = [
            {"index": i, "text": self.echoes[i] + total.text, "logprobs": self._logprobs(i, total.logprobs),
             "finish_reason": total.finish_reason}
            for i, total in enumerate(totals)
        ]
        return {**self._object(choices), "usage": usage}


def _name(raw: bytes) -> str:
    """A token as the legacy shape names it: its text, or, for a piece of a UTF-8 character, its bytes as
    `bytes:\\xe4\\xbd` (as OpenAI writes them). Decoding such pieces to U+FFFD would give several tokens one name,
    and top_logprobs, a dict keyed by name, would lose alternatives."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
