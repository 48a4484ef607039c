"""What the benchmark scripts share: a free loopback port, idle-CPU checks, and writing their results as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # gitignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_path(name: str) -> Path:
    """benchmarks/results/<name>-<date>.json, numbered -2, -3, ... when that file exists."""
    day = datetime.date.today().isoformat()
    out = RESULTS / f"{name}-{day}.json"
    n = 2
    while out.exists():
        out = out.with_name(f"{name}-{day}-{n}.json")
        n += 1
    return out


def write_result(result: dict, name: str, out: Path | None = None) -> Path:
    """Write `result` to `out`, or to benchmarks/results/<name>-<date>.json, and say where."""
    out = out or RESULTS / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out


def proc_status(key: str) -> int:
    """A kB field of /proc/self/status (VmHWM, VmRSS) in bytes: same source as qwenkit.memory.peak_rss_bytes,
    read here without importing qwenkit, so the llama.cpp worker carries no torch."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def machine_info(packages: tuple[str, ...]) -> dict:
    """What a result was measured on: Python, CPU, memory, the versions of `packages`, and qwenkit's commit."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        with open("/proc/meminfo", encoding="ascii") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    for pkg in packages:
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        info["qwenkit_commit"] = commit + ("-dirty" if dirty else "")
    except OSError:
        pass
    return info


class TimingStreamer:
    """transformers streamer that timestamps each generated token (the first put() is the prompt)."""

    def __init__(self):
        self.prompt_seen = False
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        new = [int(t) for t in value.reshape(-1).tolist()]
        self.times += [now] * len(new)
        self.tokens += new

    def end(self):
        pass
