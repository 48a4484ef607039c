"""Places from the Nominatim search API: the geocoder the other tools share, and the search_places tool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenkit.apps.assistant.services import Service
from qwenkit.apps.assistant.tool import Tool, ToolError

NEARBY_DEGREES = 0.05  # half-width of the box searched around `near` (about 5 km)


@dataclass
class Place:
    name: str
    lat: float
    lon: float
    kind: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.lat:.5f}, {self.lon:.5f})"


class Geocoder:
    def __init__(self, service: Service):
        self.service = service

    def search(self, query: str, limit: int = 5, near: Place | None = None) -> list[Place]:
        params: dict[str, Any] = {"q": query, "format": "jsonv2", "limit": limit}
        if near is not None:
            d = NEARBY_DEGREES
            params.update(viewbox=f"{near.lon - d},{near.lat + d},{near.lon + d},{near.lat - d}", bounded=1)
        rows = self.service.get_json("/search", params)
        if not isinstance(rows, list):
            raise ToolError(f"{self.service.label} answered with something other than a list of places")
        places = []
        for row in rows:
            try:
                places.append(Place(str(row.get("display_name") or row["name"]), float(row["lat"]),
                                    float(row["lon"]), str(row.get("type") or row.get("category") or "")))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a row without usable coordinates
        return places

    def locate(self, query: str) -> Place:
        """The best match for a place name, or ToolError saying it was not found."""
        places = self.search(query, limit=1)
        if not places:
            raise ToolError(f"no place called {query!r} was found")
        return places[0]


def search_places_tool(geocoder: Geocoder) -> Tool:
    def run(args: dict[str, Any]) -> str:
        near = geocoder.locate(args["near"]) if args.get("near") else None
        places = geocoder.search(args["query"], limit=int(args.get("limit", 5)), near=near)
        if not places:
            return f"No places found for {args['query']!r}" + (f" near {near.name}" if near else "") + "."
        lines = [f"{i}. {p}" + (f" [{p.kind}]" if p.kind else "") for i, p in enumerate(places, 1)]
        return f"Places for {args['query']!r}" + (f" near {near.name}" if near else "") + ":\n" + "\n".join(lines)

    return Tool(
        name="search_places",
        use_when="the user asks where something is, or for a kind of place (shop, hotel, station) near somewhere",
        description="Find where a place is on the map (a landmark, shop, station or address): its full address and "
                    "coordinates. Optionally only near another place.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to find: a name, or a kind of place"},
                "near": {"type": "string", "description": "a place name to search around"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["query"],
        },
        run=run,
    )
