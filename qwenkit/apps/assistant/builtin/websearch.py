"""Web search through a SearXNG instance's JSON API (format=json must be enabled in its settings)."""

from __future__ import annotations

from typing import Any

from qwenkit.apps.assistant.services import Service
from qwenkit.apps.assistant.tool import Tool, ToolError

RESULTS = 5


def web_search_tool(searxng: Service) -> Tool:
    def run(args: dict[str, Any]) -> str:
        data = searxng.get_json("/search", {"q": args["query"], "format": "json"})
        if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
            raise ToolError(f"{searxng.label} answered without a results list")
        lines = [f"Answer: {a}" for a in data.get("answers", []) if isinstance(a, str)]
        for i, hit in enumerate(data.get("results", [])[:RESULTS], 1):
            if isinstance(hit, dict):
                snippet = " ".join(str(hit.get("content") or "").split())[:300]
                lines.append(f"{i}. {hit.get('title', '')} <{hit.get('url', '')}>\n   {snippet}")
        if not lines:
            return f"No web results for {args['query']!r}."
        return f"Web results for {args['query']!r}:\n" + "\n".join(lines)

    return Tool(
        name="web_search",
        use_when="the user asks to look something up, search online, or for facts, prices, news or opening hours",
        description="Search the web for facts, news, opening hours or how-tos; returns titles, links and snippets.",
        parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        run=run,
    )
