"""Streaming a chat answer to the terminal: the answer on stdout, reasoning and statistics on stderr."""

from __future__ import annotations

import sys

from qwenkit.engine.response import Response

DIM, RESET = "\033[2m", "\033[0m"


def stream_answer(model, messages: list[dict], think: bool | None, sampling: dict) -> Response:
    """Print the answer as it is generated and return the aggregated response."""
    dim = sys.stderr.isatty()
    total = Response()
    for step in model.chat(messages, stream=True, enable_thinking=think, **sampling):
        if step.reasoning:
            sys.stderr.write(f"{DIM}{step.reasoning}{RESET}" if dim else step.reasoning)
            sys.stderr.flush()
        if step.text:
            sys.stdout.write(step.text)
            sys.stdout.flush()
        for call in step.tool_calls:
            sys.stdout.write(f"\n[tool call] {call.name}({call.arguments})\n")
        total.merge(step)
    if total.reasoning and not total.reasoning.endswith("\n"):
        sys.stderr.write("\n")  # keep the statistics line apart from reasoning that ended mid-line
    if total.text and not total.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return total


def print_stats(r: Response) -> None:
    u, s = r.usage, r.speculation
    guesses = (f", guesses kept {s.accepted}/{s.proposed} ({100 * s.acceptance_rate:.0f}%), "
               f"{s.tokens_per_pass:.2f} tokens per pass" if s is not None else "")
    print(
        f"[prompt {u.prompt_tokens} tokens at {r.prompt_tps:.1f} tok/s, "
        f"answer {u.completion_tokens} tokens at {r.generation_tps:.1f} tok/s{guesses}, "
        f"finish {r.finish_reason}, peak memory {r.peak_memory_gb:.2f} GB]",
        file=sys.stderr,
    )


def answer_once(model, messages: list[dict], think: bool | None, sampling: dict, stats: bool = True) -> Response:
    r = stream_answer(model, messages, think, sampling)
    if stats:
        print_stats(r)
    return r


def interactive(model, system: str | None, think: bool | None, sampling: dict) -> int:
    """A simple chat loop: /clear forgets the conversation, /bye (or end of input) leaves."""
    tty = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if tty:
        print("Chatting with the model. /clear forgets the conversation, /bye leaves.", file=sys.stderr)
    while True:
        if tty:
            sys.stderr.write(">>> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/bye":
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/clear":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        r = stream_answer(model, history, think, sampling)
        history.append({"role": "assistant", "content": r.text})
