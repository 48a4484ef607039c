"""What this CPU can do fast, read once from /proc/cpuinfo.

- PyTorch's int4 weight kernel (`_weight_int4pack_mm_for_cpu`) is vectorised only for bf16 activations, and bf16
  products are fast only with bf16 instructions (AVX512-BF16, AMX): we use it there, and do prefill matrix
  products in bf16.
- fbgemm (x86): int8 weights with one scale per row, activations quantized on the fly per call (VNNI where
  present): the int8 decode kernel on x86, the fastest measured here even where bf16 is native.
- Elsewhere our compiled fp32 kernels run.
"""

from __future__ import annotations

import functools
import os
import platform
import sys


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature names as Linux's /proc/cpuinfo gives them ("flags" on x86, "Features" on Arm). Apple
    silicon (no /proc) has NEON with the dot product on every chip, and the int8 matrix multiply from M2 on."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return frozenset({"asimd", "asimddp"} | ({"i8mm"} if _sysctl("hw.optional.arm.FEAT_I8MM") == "1" else set()))
    return frozenset()


def _sysctl(name: str) -> str | None:
    """A macOS sysctl value (Apple M2 and later report FEAT_I8MM), or None."""
    import subprocess

    try:
        proc = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def native_bf16() -> bool:
    """True where bf16 arithmetic is native. QWENKIT_BF16=0/1 overrides (to test either path on one machine)."""
    forced = os.environ.get("QWENKIT_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def has_fbgemm() -> bool:
    """True where PyTorch's x86 int8 engine is built in. QWENKIT_FBGEMM=0 turns it off (to test the fallback)."""
    if os.environ.get("QWENKIT_FBGEMM") == "0":
        return False
    import torch

    return "fbgemm" in torch.backends.quantized.supported_engines


def vnni() -> bool:
    """Without VNNI, fbgemm's 8-bit products can saturate unless activations use 7 bits (reduce_range)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())
