#!/usr/bin/env python
"""How well and how fast the assistant picks its tools: 30 fixed tool-use prompts on the real default model.

    python benchmarks/agent.py                          # qwen2.5-coder:0.5b, greedy, 2 threads
    python benchmarks/agent.py --limit 5 --model PATH   # a quick look

Each prompt goes through qwenkit.apps.assistant.Agent (the same loop as `qwenkit assistant`) with all five built-in
tools, whose services are the loopback stand-ins of the tests (tests/fakes/geo_services.py: OSRM, Nominatim,
Open-Meteo and SearXNG APIs). A task counts as correct when the turn made a call to the expected tool whose
arguments pass its JSON Schema and carry the expected values (case-insensitive substrings); for the two-tool tasks,
both calls. Reported: the share of correct tasks, the share whose *first* call was the correct one, the share that
made no call at all, and the median seconds per task (the whole turn, to the final answer). Prints a table and
writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from tests.fakes.geo_services import FakeServices  # noqa: E402

# (prompt, [(tool, {argument: expected substring})...])
TASKS = [
    ("How do I get from the Brandenburg Gate to Alexanderplatz?",
     [("get_directions", {"origin": "brandenburg", "destination": "alexanderplatz"})]),
    ("Give me walking directions from Alexanderplatz to Berlin Hauptbahnhof.",
     [("get_directions", {"origin": "alexanderplatz", "destination": "hauptbahnhof"})]),
    ("How long is the drive from Munich to Salzburg?", [("get_directions", {"origin": "munich", "destination":
                                                                           "salzburg"})]),
    ("Route me from Paris to the Louvre by bike.", [("get_directions", {"origin": "paris", "destination": "louvre"})]),
    ("I need to drive from Amsterdam to Rotterdam. Which way?",
     [("get_directions", {"origin": "amsterdam", "destination": "rotterdam"})]),
    ("Directions from Tokyo Station to Shibuya station please.",
     [("get_directions", {"origin": "tokyo", "destination": "shibuya"})]),
    ("How far is it from San Francisco to Oakland by car?",
     [("get_directions", {"origin": "san francisco", "destination": "oakland"})]),
    ("What's the best route from Zurich to Geneva?", [("get_directions", {"origin": "zurich", "destination": "geneva"})]),
    ("What's the weather in Hangzhou?", [("get_weather", {"location": "hangzhou"})]),
    ("Will it rain in London tomorrow?", [("get_weather", {"location": "london"})]),
    ("Weather forecast for Vienna for the next 3 days.", [("get_weather", {"location": "vienna"})]),
    ("Is it cold in Beijing right now?", [("get_weather", {"location": "beijing"})]),
    ("Do I need an umbrella in Seattle today?", [("get_weather", {"location": "seattle"})]),
    ("How warm is it in Shanghai?", [("get_weather", {"location": "shanghai"})]),
    ("Find a pharmacy near Shibuya station.", [("search_places", {"query": "pharmacy"})]),
    ("Where is the Golden Gate Bridge?", [("search_places", {"query": "golden gate"})]),
    ("Find the Eiffel Tower on the map.", [("search_places", {"query": "eiffel"})]),
    ("Look up where West Lake is.", [("search_places", {"query": "west lake"})]),
    ("Search for Heathrow Airport's location.", [("search_places", {"query": "heathrow"})]),
    ("Search the web for the opening hours of the Louvre.", [("web_search", {"query": "louvre"})]),
    ("Search online for the latest Qwen model release.", [("web_search", {"query": "qwen"})]),
    ("Look up on the web how to say thank you in Mandarin.", [("web_search", {"query": "thank you"})]),
    ("Web search: best dumplings in Shanghai.", [("web_search", {"query": "dumplings"})]),
    ("Search the internet for the population of Hangzhou.", [("web_search", {"query": "population"})]),
    ("Draft a message to Li Wei saying I'll be 10 minutes late.",
     [("draft_message", {"to": "li wei", "text": "late"})]),
    ("Write a text to Anna: the meeting moved to 3 pm.", [("draft_message", {"to": "anna", "text": "3"})]),
    ("Draft an email to my boss that I'm sick today.", [("draft_message", {"to": "boss", "text": "sick"})]),
    ("Prepare a message for Tom saying thanks for dinner.", [("draft_message", {"to": "tom", "text": "dinner"})]),
    ("I'm driving from Munich to Salzburg. How long will it take, and what's the weather at my destination?",
     [("get_directions", {"origin": "munich", "destination": "salzburg"}), ("get_weather", {"location": "salzburg"})]),
    ("Walk me from the Brandenburg Gate to Alexanderplatz, and tell me the weather in Berlin.",
     [("get_directions", {"origin": "brandenburg", "destination": "alexanderplatz"}),
      ("get_weather", {"location": "berlin"})]),
]


def matches(call: dict, tool, expected: dict) -> bool:
    if call["name"] != tool.name or not isinstance(call["arguments"], dict):
        return False
    try:
        tool.check(call["arguments"])
    except Exception:
        return False
    return all(want in str(call["arguments"].get(k, "")).lower() for k, want in expected.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder:0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--limit", type=int, help="only the first N tasks")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from qwenkit.apps.assistant import Agent, Service, builtin_tools, open_chat

    os.environ.setdefault("QWENKIT_TODAY", "2026-11-29")
    fakes = FakeServices()
    services = {n: Service(n, u, timeout=5) for n, u in fakes.urls.items()}
    chat = open_chat(args.model, threads=args.threads)
    rows = []
    try:
        for prompt, expected in TASKS[: args.limit]:
            tools = builtin_tools(services, [])
            by_name = {t.name: t for t in tools}
            agent = Agent(chat, tools, max_steps=args.max_steps, temperature=0)
            start = time.monotonic()
            result = agent.ask(prompt)
            seconds = time.monotonic() - start
            calls = [{"name": c["name"], "arguments": c["arguments"]} for c in result.calls]
            correct = all(any(matches(c, by_name[tool], want) for c in calls) for tool, want in expected)
            first = bool(calls) and matches(calls[0], by_name[expected[0][0]], expected[0][1])
            rows.append({"prompt": prompt, "correct": correct, "first_call_correct": first, "calls": calls,
                         "seconds": round(seconds, 2), "steps": result.steps, "stopped": result.stopped,
                         "answer": result.answer})
            print(f"{'ok ' if correct else 'BAD'} {seconds:5.1f}s {len(calls)} calls  {prompt[:70]}", flush=True)
    finally:
        chat.close()
        fakes.close()

    n = len(rows)
    summary = {
        "model": args.model, "tasks": n, "threads": args.threads, "max_steps": args.max_steps,
        "correct_share": round(sum(r["correct"] for r in rows) / n, 3),
        "first_call_correct_share": round(sum(r["first_call_correct"] for r in rows) / n, 3),
        "no_call_share": round(sum(not r["calls"] for r in rows) / n, 3),
        "median_seconds_per_task": round(statistics.median(r["seconds"] for r in rows), 2),
        "median_steps": statistics.median(r["steps"] for r in rows),
    }
    print(f"\n{'tasks':>6} {'correct':>8} {'first call':>11} {'no call':>8} {'median s/task':>14}")
    print(f"{n:>6} {summary['correct_share']:>8.1%} {summary['first_call_correct_share']:>11.1%} "
          f"{summary['no_call_share']:>8.1%} {summary['median_seconds_per_task']:>14.2f}")
    write_result({"summary": summary, "tasks": rows}, "agent", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
