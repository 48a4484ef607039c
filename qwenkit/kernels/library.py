"""The CPU kernels of csrc/ (GGUF block matmuls, paged attention, norms), one shared library per instruction-set
variant, loaded by ctypes. qwenkit.kernels.blocks, .attention and .norm wrap its functions.

Every variant of this machine's architecture is compiled at install (qwenkit.kernels.build: avx512vnni, avxvnni,
avx2 and reference on x86-64; i8mm, neon and reference on Arm), and the best one this CPU executes is loaded once, as
ggml chooses its CPU backend variants. So a build made on one machine runs at full speed on another, and a device
needs no compiler. Every variant computes the same block matmuls bit for bit (csrc/simd.h).

QWENKIT_KERNELS=<variant> loads that one instead (it must be built, and the CPU must execute it: avx2 on an AVX-512
machine, to measure that path); QWENKIT_KERNELS=none turns the kernels off, and the PyTorch paths run. In a source
checkout whose csrc/ changed since the build, the libraries are rebuilt on first use where a compiler exists.

The libraries link libgomp, which resolves to the copy PyTorch already loaded: their OpenMP loops run on
PyTorch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os

from qwenkit.errors import BadConfig
from qwenkit.kernels import build
from qwenkit.kernels.cpu import cpu_flags

log = logging.getLogger("qwenkit.kernels")

ENV = "QWENKIT_KERNELS"
OFF = ("none", "off", "0")
# The CPU features each variant's flags assume (as /proc/cpuinfo names them).
_V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}
REQUIRES = {
    "avx512vnni": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"},
    "avxvnni": _V3 | {"avx_vnni"},
    "avx2": _V3,
    "i8mm": {"asimddp", "i8mm"},
    "neon": {"asimddp"},
    "reference": set(),
}

_ERRORS = {1: "unsupported block type", 2: "bad shape (rows not whole blocks, or heads not grouped evenly)",
           3: "out of memory", 4: "row id or slot out of range"}


class Part(ctypes.Structure):
    """One stacked part of a block matmul's weight (csrc/blocks.c qk_part)."""

    _fields_ = [("w", ctypes.c_void_p), ("type", ctypes.c_int64), ("rows", ctypes.c_int64)]


def runnable(variant: str) -> bool:
    """Whether this CPU executes the variant's instructions."""
    return REQUIRES.get(variant, {"?"}) <= cpu_flags()


def _built() -> list[str]:
    """The variants built for this machine, rebuilt first where a source checkout changed since its build."""
    manifest_path = build.LIB_DIR / build.MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest is not None and manifest.get("sources") != build.source_hash() and build.compiler() \
            and os.access(build.LIB_DIR, os.W_OK):
        log.info("the kernel sources changed since their build: rebuilding them")
        manifest = {"variants": build.build_all(log=log.info), "sources": build.source_hash()}
    if manifest is None or manifest.get("sources") != build.source_hash():
        return []
    return [v for v in manifest.get("variants", []) if (build.LIB_DIR / build.library_name(v)).exists()]


@functools.cache
def selected() -> str | None:
    """The variant this process runs (decided once), or None where none is built or QWENKIT_KERNELS=none."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in OFF:
        return None
    built = _built()
    if forced:
        if forced not in build.variants():
            raise BadConfig(f"{ENV}={forced}: no such kernel variant on {build.machine()} "
                            f"(one of {', '.join(build.variants())}, or none)")
        if forced not in built:
            raise BadConfig(f"{ENV}={forced}: that variant was not built here (built: {', '.join(built) or 'none'})")
        if not runnable(forced):
            missing = sorted(REQUIRES[forced] - cpu_flags())
            raise BadConfig(f"{ENV}={forced}: this CPU cannot execute it (it lacks {', '.join(missing)})")
        return forced
    for variant in build.variants():
        if variant in built and runnable(variant):
            return variant
    log.warning("no CPU kernels are built for this machine (reinstall qwenkit with a C compiler present): GGUF "
                "blocks run on the grouped int8/int4 kernels, attention and norms in PyTorch")
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library of the selected variant, or None."""
    variant = selected()
    if variant is None:
        return None
    lib = ctypes.CDLL(str(build.LIB_DIR / build.library_name(variant)))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qk_variant.restype = ctypes.c_char_p
    if lib.qk_variant().decode() != variant:
        raise RuntimeError(f"{build.library_name(variant)} holds the {lib.qk_variant().decode()} kernels")
    lib.qk_matmul.argtypes = [ctypes.POINTER(Part), i32, p, i64, i64, p, i32]
    lib.qk_dequantize.argtypes = [p, i32, i64, i64, p, i64, p, i32, i32]
    lib.qk_repack.argtypes = lib.qk_unpack.argtypes = [p, i32, i64, i64, p]
    lib.qk_repack.restype = lib.qk_unpack.restype = i32
    f32 = ctypes.c_float
    lib.qk_paged_attention.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64, p, p, f32, p, p, p, p, i32, i64, i64,
                                       p, p, p, p, i64, f32, p, i32]
    lib.qk_matmul.restype = lib.qk_dequantize.restype = lib.qk_paged_attention.restype = i32
    lib.qk_rms_norm.argtypes = [p, i64, i64, p, f32, p]
    lib.qk_rms_norm.restype = i32
    lib.qk_layer_front.argtypes = [p, p, p, p, i32]
    lib.qk_layer_front.restype = i32
    log.info("CPU kernels: %s", variant)
    return lib


def available() -> bool:
    """Whether the C kernels run in this process."""
    return library() is not None


def check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")
