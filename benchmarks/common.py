"""What the benchmark scripts share: a free loopback port and writing their results as JSON."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # gitignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(result: dict, name: str, out: Path | None = None) -> Path:
    """Write `result` to `out`, or to benchmarks/results/<name>-<date>.json, and say where."""
    out = out or RESULTS / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out
