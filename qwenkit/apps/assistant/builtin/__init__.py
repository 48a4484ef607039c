"""The built-in tools: directions (OSRM), place search (Nominatim), web search (SearXNG), weather (Open-Meteo) and a
message drafter. Each is present when its service is configured (see services.py)."""

from __future__ import annotations

from typing import Any

from qwenkit.apps.assistant.builtin.directions import directions_tool
from qwenkit.apps.assistant.builtin.drafts import draft_message_tool
from qwenkit.apps.assistant.builtin.geo import Geocoder, search_places_tool
from qwenkit.apps.assistant.builtin.weather import weather_tool
from qwenkit.apps.assistant.builtin.websearch import web_search_tool
from qwenkit.apps.assistant.services import Service
from qwenkit.apps.assistant.tool import Tool


def builtin_tools(services: dict[str, Service], drafts: list[dict[str, Any]]) -> list[Tool]:
    tools = []
    geocoder = Geocoder(services["nominatim"]) if "nominatim" in services else None
    if geocoder is not None:
        if "osrm" in services:
            tools.append(directions_tool(services["osrm"], geocoder))
        if "open_meteo" in services:
            tools.append(weather_tool(services["open_meteo"], geocoder))
        tools.append(search_places_tool(geocoder))
    if "searxng" in services:
        tools.append(web_search_tool(services["searxng"]))
    tools.append(draft_message_tool(drafts))
    return tools
