"""The router: one OpenAI chat stream to the client, served by an ordered list of backends with failover.

Before the first token, a refused connection, a connect or first-token timeout, a 5xx or a 429 moves the request to
the next backend (after this backend's retries with backoff). After it, when the stream is cut or stalls past the
inter-token timeout, the request goes on on the next backend as a continuation: the conversation plus the partial
answer as an open assistant message (`continue_final_message`), so the client's one stream carries on with no text
lost or repeated. The continuation is sent what is left of the client's max_tokens (max_completion_tokens) after the
partial answer; when nothing is left, the answer ends there with finish_reason "length". A backend whose breaker is
open is skipped without waiting: when every remote one is open, the on-device model answers at once (offline mode),
and background probes close the breakers when hosts come back. Deadlines are for moving on: the last backend left
is not abandoned while it is still working (Backend.working: an on-device model prefilling on a slow CPU).

Chunks are rewritten to one id/created/model for the whole stream. A backend serves once it sends text, reasoning or
a tool call; its chunks before that (the role chunk) are held back, so that a host that opens its stream and then
stalls is never named. The first chunk from each backend and the last chunk carry `qwenkit_backends`, the names of
the backends that served so far, in order. Usage after a switch counts the whole answer as completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.route.backends import Backend, BackendError, BackendRejected, make_backend
from qwenkit.route.config import RouteConfig, load_route

log = logging.getLogger("qwenkit.route")


class AllBackendsFailed(QwenkitError):
    """No backend could serve the request (every one failed, timed out or had its breaker open)."""

    def __init__(self, attempts: list[str]):
        super().__init__("no backend could serve the request: " + "; ".join(attempts or ["no backend configured"]))
        self.attempts = attempts


class RoutedStream:
    """An async iterator of chunks; `backends` lists who served so far (known once the first chunk is out)."""

    def __init__(self, router: Router, body: dict[str, Any]):
        self.backends: list[str] = []
        self._gen = router._run(body, self.backends)

    def __aiter__(self) -> AsyncIterator[dict]:
        return self._gen

    async def aclose(self) -> None:
        await self._gen.aclose()


class Router:
    def __init__(self, config: RouteConfig, backends: list[Backend] | None = None):
        self.config = config
        self.backends = backends if backends is not None else [make_backend(b) for b in config.backends]
        self._probe_task: asyncio.Task | None = None

    @classmethod
    def from_file(cls, path: str) -> Router:
        return cls(load_route(path))

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for b in self.backends:
            await b.start()
        if any(b.remote for b in self.backends):
            self._probe_task = asyncio.create_task(self._probe_loop(), name="qwenkit-route-probes")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            try:
                await self._probe_task
            except asyncio.CancelledError:
                pass
            self._probe_task = None
        for b in self.backends:
            await b.close()

    async def probe_once(self) -> None:
        """Probe every remote backend once: success closes an open breaker, failure counts against it."""
        remotes = [b for b in self.backends if b.remote]
        results = await asyncio.gather(*(b.probe() for b in remotes), return_exceptions=True)
        for b, ok in zip(remotes, results):
            was = b.breaker.state
            b.breaker.probe(ok is True)
            if was != "closed" and b.breaker.state == "closed":
                log.info("backend %s is healthy again", b.name)

    async def _probe_loop(self) -> None:
        # Fixed rate, not fixed delay: a slow probe (a frozen host holds it up to its timeout) does not push the
        # next one back, so a recovered host is found within one interval.
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.config.probe_interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time() - self.config.probe_interval)  # after a long stall, do not burst
            try:
                await self.probe_once()
            except Exception:  # noqa: BLE001 - a probe bug must not stop probing
                log.exception("health probe failed")

    # ---- requests --------------------------------------------------------------------------------------------
    def _ordered(self) -> list[Backend]:
        """By priority (file order unless set); among equals, the fastest first token first (untried ones first,
        so that each gets measured)."""
        def key(item: tuple[int, Backend]) -> tuple:
            i, b = item
            priority = b.config.priority if b.config.priority is not None else i * 1000
            return priority, b.latency if b.latency is not None else -1.0, i

        return [b for _, b in sorted(enumerate(self.backends), key=key)]

    def _spent(self, content: str, reasoning: str, calls: dict[int, dict], chunks: int) -> int:
        """Completion tokens a partial answer has used, for what a continuation may still generate.

        The router sees text, not tokens, from remote backends. With an on-device model in this process (the same
        model family as the hosted one, which is what the fallback is for), its tokenizer counts the partial
        answer: re-encoding generated text gives the tokens a Qwen model generated, or slightly fewer. Without one,
        each streamed chunk that carried text counts as one token: qwenkit and vLLM stream about one token per
        chunk (a chunk may hold back a few, e.g. an unfinished UTF-8 character or a stop-string candidate). Either
        way the count is a lower bound, so the larger of the two is used.
        """
        for b in self.backends:
            count = None if b.remote else b.token_counter()
            if count is not None:
                text = [reasoning, content]
                text += [f'<tool_call>\n{{"name": "{c["function"].get("name") or ""}", "arguments": '
                         f'{c["function"].get("arguments") or "{}"}}}\n</tool_call>' for c in calls.values()]
                return max(chunks, sum(count(t) for t in text if t))
        return chunks

    def stream(self, body: dict[str, Any]) -> RoutedStream:
        """Chat completion chunks for `body` (an OpenAI chat request; `stream` is implied)."""
        return RoutedStream(self, body)

    async def complete(self, body: dict[str, Any]) -> tuple[dict, list[str]]:
        """A whole chat.completion (streamed from the backends, so it fails over mid-answer too)."""
        s = self.stream(body)
        acc = _Accumulator()
        async for chunk in s:
            acc.add(chunk)
        return acc.result(), s.backends

    async def _run(self, body: dict[str, Any], served: list[str]) -> AsyncIterator[dict]:
        requested = body.get("model")
        messages = list(body.get("messages") or [])
        single = body.get("n", 1) == 1  # continuation rebuilds one answer; n > 1 fails over before its first token
        stream_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model_name = requested or self.config.served_model_name
        content, reasoning = "", ""  # what the client has received so far (choice 0)
        calls: dict[int, dict] = {}  # choice 0's tool calls so far, by the index the client saw
        offset = 0  # a continuation numbers its tool calls from 0: shifted past the ones already sent
        opened = False  # the role chunk went out
        pending: dict | None = None  # a finish/usage chunk held back: the last one gets qwenkit_backends
        attempts: list[str] = []
        limit_keys = [k for k in ("max_completion_tokens", "max_tokens") if type(body.get(k)) is int]
        limit = body[limit_keys[0]] if limit_keys else None  # max_completion_tokens wins, as in the server
        delivered = 0  # choice 0's chunks that carried text or tool calls (a token count where no tokenizer is)
        exhausted = False  # a backend stopped mid-answer with the client's max_tokens already used up

        def rewrite(chunk: dict) -> dict | None:
            nonlocal opened
            chunk = dict(chunk, id=stream_id, created=created, model=model_name)
            choices = []
            for choice in chunk.get("choices") or []:
                delta = dict(choice.get("delta") or {})
                if delta.get("tool_calls") and offset:
                    delta["tool_calls"] = [dict(c, index=c.get("index", 0) + offset) for c in delta["tool_calls"]]
                if opened and delta.get("role"):  # a continuation's opening chunk: the client has had it
                    delta.pop("role")
                    if delta.get("content") == "":
                        delta.pop("content")
                if delta.get("role"):
                    opened = True
                if not delta and choice.get("finish_reason") is None and choice.get("logprobs") is None:
                    continue
                choices.append(dict(choice, delta=delta))
            if not choices and chunk.get("choices") and not chunk.get("usage"):
                return None
            chunk["choices"] = choices
            return chunk

        order = self._ordered()
        for position, b in enumerate(order):
            if not b.breaker.allow():
                attempts.append(f"{b.name}: skipped (breaker open)")
                continue
            # Deadlines are there to move on to another backend. With none left, a slow backend that is still
            # working (an on-device model prefilling a long prompt on a small CPU) is waited for, not abandoned.
            last = all(later.breaker.state == "open" for later in order[position + 1:])
            tries = 1 + b.config.retries
            for attempt in range(tries):
                if attempt:
                    await asyncio.sleep(b.config.backoff * 2 ** (attempt - 1))
                req = dict(body, stream=True)
                model = b.config.model_for(requested)
                if model is not None:
                    req["model"] = model
                else:
                    req.pop("model", None)
                carried = 0  # completion tokens of the partial answer this backend continues
                if content or reasoning or calls:
                    partial: dict[str, Any] = {"role": "assistant", "content": content}
                    if reasoning:
                        partial["reasoning_content"] = reasoning
                    if calls:
                        partial["tool_calls"] = [calls[i] for i in sorted(calls)]
                    req.update(messages=[*messages, partial], add_generation_prompt=False,
                               continue_final_message=True)
                    carried = self._spent(content, reasoning, calls, delivered)
                    if limit is not None:  # the continuation may only generate what the partial answer left
                        req.update({k: max(limit - carried, 1) for k in limit_keys})
                progressed, finished = False, False
                held: list[dict] = []  # chunks before this backend's first text: the role chunk, say
                offset = len(calls)
                chunks = b.stream(req).__aiter__()
                ahead: asyncio.Future | None = None  # the read in flight; kept across a deadline that is extended
                sent_at = time.monotonic()
                deadline = sent_at + b.config.first_token_timeout
                try:
                    while True:
                        wait = (deadline - time.monotonic()) if not progressed else b.config.inter_token_timeout
                        if ahead is None:
                            ahead = asyncio.ensure_future(chunks.__anext__())
                        if not (await asyncio.wait({ahead}, timeout=max(wait, 0.001)))[0]:
                            if last and b.working():
                                deadline = time.monotonic() + b.config.first_token_timeout
                                continue
                            what = "token" if progressed else "first token"
                            raise BackendError(b.name, f"no {what} within {wait:.1f} s")
                        try:
                            chunk = ahead.result()
                        except StopAsyncIteration:
                            break
                        finally:
                            ahead = None
                        served_now = any(_has_text(c.get("delta") or {}) or c.get("finish_reason") is not None
                                         for c in chunk.get("choices") or [])
                        if not served_now and not (progressed or finished):
                            held.append(chunk)  # the client hears of this backend once it has written something
                            continue
                        announce = not served or served[-1] != b.name
                        if announce:
                            served.append(b.name)
                        ready, held = [*held, chunk], []
                        for raw in ready:
                            out = rewrite(raw)
                            if out is not None and announce:  # who answers, as it starts: apps can say so
                                out["qwenkit_backends"], announce = list(served), False
                            for choice in (out or {}).get("choices") or []:
                                delta = choice.get("delta") or {}
                                if choice.get("index", 0) == 0:
                                    if _has_text(delta):
                                        delivered += 1
                                    content += delta.get("content") or ""
                                    reasoning += delta.get("reasoning_content") or ""
                                    for call in delta.get("tool_calls") or []:
                                        merge_call_delta(calls, call)
                                if not progressed and _has_text(delta):
                                    progressed = True
                                    b.observe_latency(time.monotonic() - sent_at)
                                if choice.get("finish_reason") is not None:
                                    finished = True
                            if out is None:
                                continue
                            if out.get("usage") and carried:
                                out["usage"] = _whole_answer_usage(out["usage"], carried)
                            if pending is not None:
                                yield pending
                                pending = None
                            if any(c.get("finish_reason") for c in out["choices"]) or out.get("usage"):
                                pending = out
                            else:
                                yield out
                    if not finished:
                        raise BackendError(b.name, "the stream ended without a finish reason")
                except BackendError as e:
                    if finished:  # the answer was complete; only its end-of-stream marker was lost
                        log.info("%s after the finish reason: the answer is complete", e)
                    else:
                        b.breaker.failure()
                        attempts.append(str(e))
                        log.warning("%s (%s)", e, "mid-answer: continuing on the next backend"
                                    if content or reasoning else "failing over")
                        if (content or reasoning or calls) and not single:
                            raise AllBackendsFailed(attempts) from None
                        if (content or reasoning or calls) and limit is not None \
                                and self._spent(content, reasoning, calls, delivered) >= limit:
                            exhausted = True  # the answer is as long as the client allowed: nothing to continue
                            break
                        if progressed:
                            break  # this host just dropped a stream: the next backend continues, no retry here
                        continue
                except BackendRejected as e:
                    b.breaker.success()  # it answered: the host is up, the request was at fault
                    if not (content or reasoning or calls) or progressed:
                        raise
                    # A continuation refused (a cloud API without continue_final_message): another backend may
                    # take it; the client's stream is already under way, so failing here would lose the answer.
                    attempts.append(f"{e} (continuation)")
                    break
                finally:
                    if ahead is not None:  # abandoned mid-read: stop that read before closing the stream
                        ahead.cancel()
                        await asyncio.gather(ahead, return_exceptions=True)
                    await chunks.aclose()
                b.breaker.success()
                if pending is None:
                    pending = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
                               "model": model_name, "choices": []}
                pending["qwenkit_backends"] = list(served)
                yield pending
                return
            if exhausted:
                if pending is not None:
                    yield pending
                yield {"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                       "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
                       "qwenkit_backends": list(served)}
                return
        raise AllBackendsFailed(attempts)


def _has_text(delta: dict) -> bool:
    """Whether a chunk's delta carries part of the answer (a backend has served once it sent one)."""
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _whole_answer_usage(usage: dict, carried: int) -> dict:
    """A continuation's usage as the client sees the answer: the partial answer it was given is completion (the
    client received it as such), not prompt. `carried` is the router's count of those tokens (see _spent)."""
    prompt = max(usage.get("prompt_tokens", 0) - carried, 0)
    completion = usage.get("completion_tokens", 0) + carried
    return dict(usage, prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def merge_call_delta(calls: dict[int, dict], delta: dict) -> None:
    """Fold one streamed tool-call delta into the calls so far (servers that stream arguments send pieces)."""
    i = delta.get("index", 0)
    fn = delta.get("function") or {}
    if i not in calls:
        calls[i] = {"id": delta.get("id"), "type": "function",
                    "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""}}
        return
    have = calls[i]["function"]
    if fn.get("name") and not have.get("name"):
        have["name"] = fn["name"]
    have["arguments"] = (have.get("arguments") or "") + (fn.get("arguments") or "")


class _Accumulator:
    """Folds a stream of chunks into one chat.completion (for non-streaming requests)."""

    def __init__(self) -> None:
        self.head: dict = {}
        self.choices: dict[int, dict] = {}
        self.usage: dict | None = None
        self.backends: list[str] = []

    def add(self, chunk: dict) -> None:
        self.head = self.head or {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if "qwenkit_backends" in chunk:
            self.backends = chunk["qwenkit_backends"]
        for c in chunk.get("choices") or []:
            i = c.get("index", 0)
            msg = self.choices.setdefault(i, {"content": "", "reasoning": "", "calls": {}, "finish_reason": None})
            delta = c.get("delta") or {}
            msg["content"] += delta.get("content") or ""
            msg["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                merge_call_delta(msg["calls"], call)
            if c.get("finish_reason") is not None:
                msg["finish_reason"] = c["finish_reason"]

    def result(self) -> dict:
        choices = []
        for i in sorted(self.choices):
            m = self.choices[i]
            calls = [c for _, c in sorted(m["calls"].items())]
            message = {"role": "assistant", "content": m["content"] if m["content"] or not calls else None,
                       "reasoning_content": m["reasoning"] or None}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": m["finish_reason"]})
        out = {**self.head, "object": "chat.completion", "choices": choices, "qwenkit_backends": self.backends}
        if self.usage is not None:
            out["usage"] = self.usage
        return out
