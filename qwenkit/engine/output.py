"""Turning one sequence's generated tokens into Responses: UTF-8-safe text, stop strings, and for chat the
reasoning / content / tool-call split, for each sequence of the engine.
"""

from __future__ import annotations

from qwenkit.engine.response import Response, ToolCallFailure, ToolCallRecord, Usage
from qwenkit.engine.sampling import TokenLogprob
from qwenkit.engine.stopstrings import StopStringFilter

_STRUCTURAL_MARKS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


class OutputProcessor:
    """Feed sampled tokens with `push`; call `finish` once. `stopped` turns true when a stop string or stop id ends
    the answer (the caller must then stop generating)."""

    def __init__(self, tokenizer, prompt_tokens: int, stop: list[str], stop_ids: set[int], parser=None):
        from qwenkit.text.tokenizer import IncrementalDecoder

        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stops = StopStringFilter(stop)
        self.stop_ids = stop_ids
        self.parser = parser
        self.structural = {tokenizer.token_to_id(m) for m in _STRUCTURAL_MARKS} - {None} if parser else set()
        self.prompt_tokens = prompt_tokens
        self.count = 0
        self.stopped = False
        self.saw_calls = False

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Response | None:
        """The Response for one sampled token, or None for a stop id (which ends the answer)."""
        self.count += 1
        if token in self.stop_ids:
            self.stopped = True
            return None
        step = Response(tokens=[token], logprobs=[logprob] if logprob else [])
        delta = self.decoder.push(token)
        if token in self.structural:
            self._apply(step, self.stops.flush(), None)  # held text belongs before the structural token
            self._apply(step, delta, token)
        else:
            self._apply(step, self.stops.push(delta), None)
        self.saw_calls |= bool(step.tool_calls)
        self.stopped = self.stops.stopped
        return step

    def finish(self, started: float, first_token: float, last_token: float) -> Response:
        """The last Response: held-back text, finish_reason ("stop", "length" or "tool_calls"), usage and speeds
        from the times (one clock) the request started, its first token came and its last token came."""
        last = Response()
        if not self.stops.stopped:
            self._apply(last, self.stops.push(self.decoder.flush()) + self.stops.flush(), None)
        if self.parser is not None:
            _collect(last, self.parser.finish())
        reason = "stop" if self.stopped else "length"
        if reason == "stop" and (self.saw_calls or last.tool_calls):
            reason = "tool_calls"
        last.finish_reason = reason
        last.usage = Usage(self.prompt_tokens, self.count)
        last.time_to_first_token = first_token - started
        last.prompt_tps = self.prompt_tokens / max(first_token - started, 1e-9)
        if self.count > 1:
            last.generation_tps = (self.count - 1) / max(last_token - first_token, 1e-9)
        return last

    def _apply(self, step: Response, text: str, token: int | None) -> None:
        if self.parser is None:
            step.text += text
        elif text or token is not None:
            _collect(step, self.parser.feed(token, text))


def _collect(step: Response, events) -> None:
    from qwenkit.text import stream as ev

    for e in events:
        if isinstance(e, ev.ReasoningDelta):
            step.reasoning += e.text
        elif isinstance(e, ev.ContentDelta):
            step.text += e.text
        elif isinstance(e, ev.ToolCall):
            step.tool_calls.append(ToolCallRecord(e.index, e.id, e.name, e.arguments))
        elif isinstance(e, ev.ToolCallError):
            step.tool_call_errors.append(ToolCallFailure(e.index, e.raw, e.message))
