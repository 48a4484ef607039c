"""`qwenkit assistant`: the agent at a terminal. The answer streams to stdout; tool activity, reasoning and notices
go to stderr, one line each; drafts are shown at the end of a turn, never sent."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qwenkit.apps.backend import add_arguments as backend_arguments
from qwenkit.errors import BadConfig
from qwenkit.media.sources import SourcePolicy, data_url

SERVICE_FLAGS = {"osrm": "--osrm-url", "nominatim": "--nominatim-url", "searxng": "--searxng-url",
                 "open_meteo": "--open-meteo-url"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="one question ('-' reads it from stdin); omit for a conversation")
    backend_arguments(p, model_help="the model: in this process (default qwen2.5-coder:0.5b), or with --base-url "
                      "the name that server knows it by")
    for name, flag in SERVICE_FLAGS.items():
        p.add_argument(flag, dest=f"{name}_url", metavar="URL",
                       help=f"{name} API base URL (default: $QWENKIT_{name.upper()}_URL or the public service)")
    p.add_argument("--service-timeout", type=float, default=8.0, help="seconds per service request (default 8)")
    p.add_argument("--mcp", action="append", default=[], metavar="CMD_OR_URL",
                   help="an MCP server: a command line (stdio) or an http(s) URL (streamable HTTP); repeatable")
    p.add_argument("--no-builtin-tools", action="store_true", help="only the MCP servers' tools")
    p.add_argument("--max-steps", type=int, default=6, help="model calls per question, at most (default 6)")
    p.add_argument("--no-plan", action="store_true",
                   help="let the model call tools freely, instead of first choosing the tools the question needs "
                   "and then calling each under its schema")
    p.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a tool call may take (default 30)")
    p.add_argument("--yes", action="store_true", help="approve tools that act on the world without asking")
    p.add_argument("--trace", metavar="FILE", help="write every turn's trace (steps, calls, results) as JSON")
    p.add_argument("--system", help="replace the system prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="a photo the question is about (JPEG, PNG or WebP; repeatable; needs a vision-language "
                   "model, e.g. --model qwen2.5-vl:3b)")


def run(args: argparse.Namespace) -> int:
    from qwenkit.apps.assistant.agent import DEFAULT_SYSTEM, Agent
    from qwenkit.apps.backend import open_from_args
    from qwenkit.apps.assistant.builtin import builtin_tools
    from qwenkit.apps.assistant.mcp_tools import MCPConnection
    from qwenkit.apps.assistant.services import services_from_env
    from qwenkit.hub import DEFAULT_MODEL

    if args.max_steps < 1:
        raise BadConfig(f"--max-steps must be at least 1, got {args.max_steps}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.image and prompt is None:
        raise BadConfig("--image needs a question (the conversation mode takes text only)")
    images = [data_url(Path(p), p, SourcePolicy()) for p in args.image]  # read now: a bad file fails before loading
    drafts: list[dict[str, Any]] = []
    tools = [] if args.no_builtin_tools else builtin_tools(
        services_from_env({k: getattr(args, f"{k}_url") for k in SERVICE_FLAGS}, args.service_timeout), drafts)
    connections = []
    chat = None
    try:
        for target in args.mcp:
            conn = MCPConnection(target).start()
            connections.append(conn)
            tools += conn.tools({t.name for t in tools})
        chat = open_from_args(args, DEFAULT_MODEL)
        agent = Agent(chat, tools, system=args.system or DEFAULT_SYSTEM, max_steps=args.max_steps,
                      confirm=_confirmer(args.yes), tool_timeout=args.tool_timeout, drafts=drafts,
                      plan=not args.no_plan, temperature=args.temperature)
        turns = []
        if prompt is not None:
            turns.append(_turn(agent, prompt, images))
        else:
            print(f"assistant ready with {len(tools)} tools: {', '.join(t.name for t in tools)}. "
                  "Empty line or Ctrl-D to quit.", file=sys.stderr)
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    break
                if not line:
                    break
                turns.append(_turn(agent, line))
        if args.trace:
            Path(args.trace).write_text(json.dumps(turns, ensure_ascii=False, indent=2))
        return 0 if all(t["stopped"] != "error" for t in turns) else 1
    finally:
        if chat is not None:
            chat.close()
        for conn in connections:
            conn.close()


def _turn(agent: Any, prompt: str, images: list[str] = ()) -> dict[str, Any]:
    drafts_before = len(agent.drafts)
    at_line_start = True
    for event in agent.stream(prompt, images):
        if event.kind == "content":
            sys.stdout.write(event.text)
            sys.stdout.flush()
            at_line_start = event.text.endswith("\n")
        elif event.kind == "reasoning":
            sys.stderr.write(event.text)
        elif event.kind == "plan":
            print(f"[plan] {event.text or 'no tool needed'}", file=sys.stderr)
        elif event.kind == "tool_call":
            args = event.arguments if isinstance(event.arguments, str) else json.dumps(event.arguments,
                                                                                      ensure_ascii=False)
            print(f"[tool] {event.name} {args}", file=sys.stderr)
        elif event.kind == "tool_result":
            first = event.text.splitlines()[0] if event.text else ""
            print(f"[tool] {event.name} -> {first[:160]}" + (f" ({event.seconds:.2f} s)" if event.seconds else ""),
                  file=sys.stderr)
        elif event.kind in ("notice", "error"):
            print(f"[{event.kind}] {event.text}", file=sys.stderr)
    if not at_line_start:
        print()
    for d in agent.drafts[drafts_before:]:
        print(f"\n[draft, not sent] to {d['to']} ({d['channel']}): {d['text']}")
    return {"prompt": prompt, "stopped": agent.stopped, "trace": agent.trace,
            "drafts": agent.drafts[drafts_before:]}


def _confirmer(always: bool):
    def confirm(tool: Any, arguments: dict[str, Any]) -> bool:
        if always:
            return True
        if not sys.stdin.isatty():
            print(f"[tool] {tool.name} acts on the world and needs confirmation: refused (not a terminal; "
                  "--yes approves)", file=sys.stderr)
            return False
        answer = input(f"Allow {tool.name} {json.dumps(arguments, ensure_ascii=False)}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    return confirm
