"""Compiling the CPU kernels (csrc/) once per instruction-set variant, at install.

`pip install` (and so `make`) runs this through setup.py's build step; `python -m qwenkit.kernels.build` does it
again after an edit of csrc/. Each variant is one shared library built from the same sources with its own flags
(csrc/simd.h picks the code those flags allow), so a build made on one machine runs on any CPU of its architecture:
qwenkit.kernels.library loads the best variant the CPU can execute, as ggml's CPU backend variants are chosen.

This module uses the standard library only: setup.py loads it before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
LIB_DIR = Path(__file__).with_name("lib")
MANIFEST = "manifest.json"
COMMON_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-std=c11"]

# Best first: the order in which the loader tries them. Each entry: variant -> its flags, per machine architecture.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "x86_64": {
        "avx512vnni": ["-march=x86-64-v4", "-mavx512vnni"],  # AVX-512 F/BW/CD/DQ/VL + VNNI: Ice Lake, Zen 4
        "avxvnni": ["-march=x86-64-v3", "-mavxvnni"],  # AVX2 + VEX VNNI: Alder Lake and later, Zen 5
        "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C: Haswell and later, every Zen
        "reference": ["-march=x86-64"],
    },
    "aarch64": {
        "i8mm": ["-march=armv8.2-a+dotprod+i8mm"],  # smmla: Cortex-A510/A710/X2 and later, Apple M2 and later
        "neon": ["-march=armv8.2-a+dotprod"],  # sdot: Cortex-A55/A76 and later, every Apple chip
        "reference": ["-march=armv8-a"],
    },
}


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants(arch: str | None = None) -> dict[str, list[str]]:
    """The variants of an architecture (this machine's by default), best first; unknown ones get the reference."""
    return VARIANTS.get(arch or machine(), {"reference": []})


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


def source_hash() -> str:
    """What a build was made from: the sources, headers and flags."""
    key = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]")):
        key.update(path.name.encode() + path.read_bytes())
    key.update(json.dumps([COMMON_FLAGS, VARIANTS]).encode())
    return key.hexdigest()[:16]


def library_name(variant: str) -> str:
    return f"qwenkit-kernels-{variant}.so"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def compile_variant(cc: str, variant: str, flags: list[str], target: Path) -> None:
    """One variant into `target` (atomically: a concurrent build ends with one complete file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *COMMON_FLAGS, *flags, *map(str, sources()), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its stderr goes in our error
        if proc.returncode:
            raise RuntimeError(f"{variant}: {' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_all(out_dir: Path = LIB_DIR, log=print) -> list[str]:
    """Every variant of this architecture into out_dir, with a manifest naming them and the sources' hash.
    A variant the compiler cannot build is left out with a message (an old compiler without -mavxvnni, say);
    the rest still build. Returns the variants built."""
    cc = compiler()
    if cc is None:
        log("qwenkit: no C compiler: the CPU kernels are not built (the PyTorch paths will run)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for variant, flags in variants().items():
        log(f"qwenkit: building the {variant} CPU kernels")
        try:
            compile_variant(cc, variant, flags, out_dir / library_name(variant))
            built.append(variant)
        except RuntimeError as e:
            log(f"qwenkit: skipped the {variant} kernels: {e}")
    manifest = {"sources": source_hash(), "arch": machine(), "variants": built}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return built


def main() -> int:
    built = build_all(Path(sys.argv[1]) if len(sys.argv) > 1 else LIB_DIR, log=lambda m: print(m, file=sys.stderr))
    return 0 if built else 1


if __name__ == "__main__":
    raise SystemExit(main())
