"""Peak memory of loading the real default GGUF: the model plus at most a quarter of it, over the interpreter.

The load runs in a fresh child process so that the peak (VmHWM, which counts every resident page, memory-mapped
file pages included) belongs to this load alone. The baseline is the child's RSS with torch imported, measured
before qwenkit is imported or anything is loaded. The in-memory model is the sum of its parameter bytes (fp32).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys

def rss():  # current resident set size in bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

import torch
baseline = rss()
from qwenkit.memory import peak_rss_bytes
baseline_peak = peak_rss_bytes()
import qwenkit
imported = rss()
import time
t = time.perf_counter()
model = qwenkit.load(sys.argv[1], pull=False, quant="none")  # the fp32 model: what the 1.25x bar is about
seconds = time.perf_counter() - t
peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry over pytest's own peak through exec
params = {id(p): p for p in model.model.parameters()}.values()
model_bytes = sum(p.numel() * p.element_size() for p in params)
print(json.dumps(dict(baseline=baseline, baseline_peak=baseline_peak, imported=imported, peak=peak, after=rss(),
                      model_bytes=model_bytes, seconds=seconds)))
"""


@pytest.mark.slow
@pytest.mark.real_weights
def test_peak_rss_while_loading_default_gguf(default_gguf):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(default_gguf)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 2**30
    limit = 1.25 * m["model_bytes"] + m["baseline"]
    report = (
        f"baseline (torch imported) {m['baseline'] / gib:.3f} GiB, after importing qwenkit {m['imported'] / gib:.3f}, "
        f"model {m['model_bytes'] / gib:.3f} GiB, peak {m['peak'] / gib:.3f} GiB, after load {m['after'] / gib:.3f}, "
        f"limit {limit / gib:.3f} GiB (peak over baseline = {(m['peak'] - m['baseline']) / m['model_bytes']:.3f} x "
        f"model), load {m['seconds']:.1f} s"
    )
    print(report)
    assert m["peak"] <= limit, report
