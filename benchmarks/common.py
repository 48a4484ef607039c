"""What the benchmark scripts share: a free loopback port, idle-CPU checks, and writing their results as JSON."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
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


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat. Steal counts as busy (someone else ran)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    total = sum(fields)
    return total - idle - iowait, total


def process_jiffies(pid: int | str = "self") -> int:
    """user + system clock ticks of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return 0
    rest = stat[stat.rfind(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def busy_share(window: float = 1.0) -> float:
    """Share of all CPUs busy over the next `window` seconds (0..1)."""
    b0, t0 = cpu_jiffies()
    time.sleep(window)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_for_idle(threshold: float, max_wait: float, say) -> tuple[float, float]:
    """Wait until the CPUs are idle (busy share <= threshold over 1 s). Returns (seconds waited, last busy share)."""
    started = time.monotonic()
    last_note = -1e9
    while True:
        share = busy_share(1.0)
        waited = time.monotonic() - started
        if share <= threshold or waited >= max_wait:
            return waited, share
        if waited - last_note >= 30:
            say(f"    waiting for idle CPUs: {share:.0%} busy (threshold {threshold:.0%}), "
                f"load {os.getloadavg()[0]:.2f}")
            last_note = waited
        time.sleep(1.0)
