"""The assistant on the real default model (Qwen2.5-Coder-0.5B Q4_K_M), with its tools talking to loopback servers
that speak OSRM's, Nominatim's and Open-Meteo's real APIs: `qwenkit assistant` as a subprocess for a directions
question, and qwenkit.apps.assistant.Agent in-process for a question that needs two tools. Greedy decoding, and
QWENKIT_TODAY pins the date in the system prompt, so each run sends the same tokens."""

import json
import os
import subprocess
import sys

import pytest

from qwenkit.apps.assistant import Agent, Service, builtin_tools, open_chat
from tests.fakes.geo_services import FakeServices, haversine_m

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
TODAY = "2026-11-29"


@pytest.fixture(scope="module")
def fakes():
    f = FakeServices()
    yield f
    f.close()


def test_cli_directions_question_calls_the_directions_tool_and_answers_from_it(default_gguf, fakes, tmp_path):
    trace_file = tmp_path / "trace.json"
    flags = [a for name, url in fakes.urls.items() for a in (f"--{name.replace('_', '-')}-url", url)]
    proc = subprocess.run(
        [sys.executable, "-m", "qwenkit", "assistant", "How do I get from the Brandenburg Gate to Alexanderplatz?",
         "--model", str(default_gguf), "--threads", "2", "--trace", str(trace_file), *flags],
        capture_output=True, text=True, timeout=600, env={**os.environ, "QWENKIT_TODAY": TODAY})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (turn,) = json.loads(trace_file.read_text())
    calls = [e for e in turn["trace"] if e["kind"] == "tool_call"]
    assert [c["name"] for c in calls] == ["get_directions"]  # and no weather "just in case"
    assert "[plan] get_directions" in proc.stderr  # the tools were chosen first, and the user sees the choice
    args = calls[0]["arguments"]
    assert "brandenburg" in args["origin"].lower() and "alexanderplatz" in args["destination"].lower()
    results = [e for e in turn["trace"] if e["kind"] == "tool_result"]
    assert not results[0].get("error") and results[0]["text"].startswith(("Driving route", "Walking route"))
    # the answer uses the tool's result: the route's distance, as the tool computed it
    km = haversine_m(52.5162746, 13.3777041, 52.5219184, 13.4132147) * 1.3 / 1000
    assert f"{km:.1f}" in proc.stdout
    assert "[tool] get_directions" in proc.stderr  # tool activity is shown to the user
    # the whole trace is recorded: every model step with its timing and backend, the call, the result, the answer
    steps = [e for e in turn["trace"] if e["kind"] == "model"]
    assert steps[0]["backends"] == ["device"] and all(s["seconds"] > 0 for s in steps)
    assert turn["trace"][-1]["kind"] == "answer" and turn["trace"][-1]["text"] in proc.stdout


def test_agent_weather_at_the_end_of_a_route_makes_two_calls(default_gguf, fakes, monkeypatch):
    monkeypatch.setenv("QWENKIT_TODAY", TODAY)
    services = {n: Service(n, u, timeout=5) for n, u in fakes.urls.items()}
    chat = open_chat(str(default_gguf), threads=2)
    try:
        agent = Agent(chat, builtin_tools(services, []), temperature=0)
        result = agent.ask("I'm driving from Munich to Salzburg. How long will it take, and what's the weather at "
                           "my destination?")
    finally:
        chat.close()
    calls = {c["name"]: c["arguments"] for c in result.calls}
    assert "munich" in calls["get_directions"]["origin"].lower()
    assert "salzburg" in calls["get_directions"]["destination"].lower()
    assert "salzburg" in calls["get_weather"]["location"].lower()
    assert all(not e.get("error") for e in result.trace if e["kind"] == "tool_result")
    assert result.answer and result.steps <= 6


def test_agent_calls_only_the_tools_a_request_needs(default_gguf, fakes, monkeypatch):
    """The choice of tools comes first: a place question calls the place search alone, a weather question the
    weather alone (in Chinese, answered in Chinese), and a sum no tool at all."""
    monkeypatch.setenv("QWENKIT_TODAY", TODAY)
    services = {n: Service(n, u, timeout=5) for n, u in fakes.urls.items()}
    chat = open_chat(str(default_gguf), threads=2)
    try:
        asked = {prompt: Agent(chat, builtin_tools(services, []), temperature=0).ask(prompt)
                 for prompt in ("西湖在什么地方？", "杭州明天天气如何？", "What's 144 divided by 12?")}
    finally:
        chat.close()
    place, weather, arithmetic = asked.values()
    assert [c["name"] for c in place.calls] == ["search_places"] and "西湖" in place.calls[0]["arguments"]["query"]
    assert [c["name"] for c in weather.calls] == ["get_weather"]
    assert "杭州" in weather.calls[0]["arguments"]["location"]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in weather.answer)
    assert not arithmetic.calls and "12" in arithmetic.answer
    for result in asked.values():
        assert result.stopped == "answered" and result.answer.strip()
