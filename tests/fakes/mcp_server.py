"""A real MCP server built with the official SDK, for the assistant's tests: run with `stdio` (default) or
`http PORT` (streamable HTTP at /mcp). Tools: a read-only unit converter and note search, a note writer that acts
on the world (a file named by $NOTES_FILE), and one that always fails."""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("qwenkit-test-tools")
NOTES = ["Team offsite: Hangzhou, 12 December", "Car service booked for Friday 9:00"]


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def convert_units(value: float, unit_from: str, unit_to: str) -> str:
    """Convert a length or temperature between units (km, mi, m, ft, C, F)."""
    factors = {("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("m", "ft"): 3.28084, ("ft", "m"): 0.3048}
    if (unit_from, unit_to) == ("C", "F"):
        return f"{value * 9 / 5 + 32:.1f} F"
    if (unit_from, unit_to) == ("F", "C"):
        return f"{(value - 32) * 5 / 9:.1f} C"
    if (unit_from, unit_to) not in factors:
        raise ValueError(f"cannot convert {unit_from} to {unit_to}")
    return f"{value * factors[(unit_from, unit_to)]:.3f} {unit_to}"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def search_notes(query: str) -> str:
    """Search the user's notes."""
    hits = [n for n in NOTES if query.lower() in n.lower()]
    return "\n".join(hits) if hits else "no notes match"


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
def add_note(text: str) -> str:
    """Save a note for the user."""
    with open(os.environ["NOTES_FILE"], "a", encoding="utf-8") as f:
        f.write(text + "\n")
    return "saved"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
