"""Directions from an OSRM server's route API (teams self-host OSRM; the public demo server has driving only)."""

from __future__ import annotations

from typing import Any

from qwenkit.apps.assistant.builtin.geo import Geocoder
from qwenkit.apps.assistant.services import Service
from qwenkit.apps.assistant.tool import Tool, ToolError

MODES = ("driving", "walking", "cycling")
MAX_STEPS = 12  # turn-by-turn lines given to the model: enough to follow, short enough for a small context


def duration_text(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def distance_text(meters: float) -> str:
    return f"{meters / 1000:.1f} km" if meters >= 1000 else f"{round(meters)} m"


def step_text(step: dict[str, Any]) -> str:
    m = step.get("maneuver") or {}
    kind, modifier, road = m.get("type", ""), m.get("modifier", ""), step.get("name") or ""
    onto = f" onto {road}" if road else ""
    if kind == "depart":
        text = f"Head {modifier or 'off'}{' on ' + road if road else ''}"
    elif kind == "arrive":
        text = "Arrive at your destination" + (f" on the {modifier}" if modifier else "")
    elif kind in ("turn", "end of road", "fork", "on ramp", "off ramp", "merge"):
        text = f"{kind.capitalize()} {modifier}{onto}".replace("  ", " ")
    elif kind in ("roundabout", "rotary"):
        exit_no = m.get("exit")
        text = "At the roundabout take " + (f"exit {exit_no}" if exit_no else "the exit") + onto
    else:
        text = f"Continue {modifier}{onto}".replace("  ", " ").strip()
    if kind != "arrive" and step.get("distance"):
        text += f" ({distance_text(step['distance'])})"
    return text


def directions_tool(osrm: Service, geocoder: Geocoder) -> Tool:
    def run(args: dict[str, Any]) -> str:
        mode = args.get("mode", "driving")
        start, end = geocoder.locate(args["origin"]), geocoder.locate(args["destination"])
        answer = osrm.get_json(
            f"/route/v1/{mode}/{start.lon},{start.lat};{end.lon},{end.lat}",
            {"overview": "false", "steps": "true", "alternatives": "false"},
        )
        if not isinstance(answer, dict) or answer.get("code") != "Ok" or not answer.get("routes"):
            reason = answer.get("message") or answer.get("code") if isinstance(answer, dict) else None
            raise ToolError(f"no {mode} route from {start.name} to {end.name}" + (f": {reason}" if reason else ""))
        route = answer["routes"][0]
        steps = [s for leg in route.get("legs", []) for s in leg.get("steps", [])]
        lines = [f"{i}. {step_text(s)}" for i, s in enumerate(steps[:MAX_STEPS], 1)]
        if len(steps) > MAX_STEPS:
            lines.append(f"... and {len(steps) - MAX_STEPS} more steps")
        return (f"{mode.capitalize()} route from {start.name} to {end.name}: "
                f"{distance_text(route['distance'])}, about {duration_text(route['duration'])}.\n"
                + ("Steps:\n" + "\n".join(lines) if lines else ""))

    return Tool(
        name="get_directions",
        use_when="the user asks how to get somewhere, which way to go, or how far or how long a trip is",
        description="Directions from a start place to an end place: distance, travel time and turn-by-turn steps.",
        parameters={
            "type": "object",
            "properties": {
                "origin": {"type": "string", "description": "start: a place name or address"},
                "destination": {"type": "string", "description": "end: a place name or address"},
                "mode": {"type": "string", "enum": list(MODES), "description": "default driving"},
            },
            "required": ["origin", "destination"],
        },
        run=run,
    )
