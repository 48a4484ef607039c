"""Process memory figures for statistics and benchmarks."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image.

    On Linux this is VmHWM, the high-water mark of this address space. getrusage's ru_maxrss is not used there: it
    survives exec, so a child started from a large parent (pytest, a server) would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, the fallback elsewhere
