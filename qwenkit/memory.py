"""Process memory figures for statistics and benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

LARGE_BLOCK = 4 << 20  # allocations from this size on are mapped on their own and given back when freed


@functools.cache
def _glibc():
    """The C library's handle on Linux, None elsewhere (the calls below are glibc's own)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def give_back_large_frees() -> bool:
    """Make glibc's malloc return large freed blocks to the system at once (Linux; elsewhere nothing happens).

    By default glibc raises its mmap threshold each time a mapped block is freed, so after the first prompt the
    multi-megabyte buffers of every prompt chunk (activations, dequantized weights) come from the heap, which
    keeps their pages: on the default model, 1.01 GB peak resident memory after one 512-token prompt against
    0.97 GB with blocks of 4 MB and more mapped on their own (0.94 GB from 256 KB, but those page faults cost a
    fifth of the prompt speed; from 4 MB the cost is lost in the noise). Called once, before a model loads.
    Returns whether it took effect."""
    libc = _glibc()
    try:
        m_trim_threshold, m_mmap_threshold = -1, -3
        return libc is not None and bool(libc.mallopt(m_mmap_threshold, LARGE_BLOCK)) and bool(
            libc.mallopt(m_trim_threshold, 4 * LARGE_BLOCK))
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing happens).

    Building the tokenizer and reading a checkpoint free tens of MB in small blocks between live ones, which
    glibc keeps: on the default model, ~70 MB of resident memory that nobody uses, which the first prompt's peak
    then stacks on. Called once a model has loaded. Returns whether it took effect."""
    libc = _glibc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


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
