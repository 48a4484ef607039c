"""The CPU kernels of csrc/ (GGUF block matmuls, paged attention, norms): built with the system C compiler on first
use, cached, loaded by ctypes. qwenkit.kernels.blocks and qwenkit.kernels.attention wrap its functions.

The library is compiled for this CPU (-march=native) into ``$QWENKIT_HOME/native/``, named by a hash of the
source, the flags and the CPU's flags, so an edit or another machine gets its own build; building takes a couple
of seconds and happens once. It links libgomp, which resolves to the copy PyTorch already loaded: its OpenMP
loops run on PyTorch's threads.

Where there is no compiler, or the CPU lacks AVX512-VNNI (the library then holds portable C only), `available()`
is False and GGUF weights take the grouped int8/int4 path instead. QWENKIT_NATIVE=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from qwenkit.kernels.cpu import cpu_flags

log = logging.getLogger("qwenkit.kernels")

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-std=c11"]

_ERRORS = {1: "unsupported block type", 2: "bad shape (rows not whole blocks, or heads not grouped evenly)",
           3: "out of memory", 4: "row id or slot out of range"}


class Part(ctypes.Structure):
    """One stacked part of a block matmul's weight (csrc/blocks.c qk_part)."""

    _fields_ = [("w", ctypes.c_void_p), ("type", ctypes.c_int64), ("rows", ctypes.c_int64)]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build (another process) ends with one complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path(cc: str) -> Path:
    from qwenkit.hub.cache import home

    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sorted(CSRC.glob("*.[ch]"))), " ".join([cc, *FLAGS]).encode(),
                 " ".join(sorted(cpu_flags())).encode()):
        key.update(part)
    return home() / "native" / f"qwenkit-kernels-{key.hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with one warning) where it cannot be built here."""
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: GGUF blocks run on the grouped int8/int4 kernels instead, attention in torch")
        return None
    path = _library_path(cc)
    try:
        if not path.exists():
            log.info("building the CPU kernels (%s)", path.name)
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("the CPU kernels could not be built (%s): using the grouped int8/int4 kernels", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qk_matmul.argtypes = [ctypes.POINTER(Part), i32, p, i64, i64, p, i32]
    lib.qk_dequantize.argtypes = [p, i32, i64, i64, p, i64, p, i32, i32]
    lib.qk_repack.argtypes = lib.qk_unpack.argtypes = [p, i32, i64, i64, p]
    lib.qk_repack.restype = lib.qk_unpack.restype = i32
    f32 = ctypes.c_float
    lib.qk_paged_attention.argtypes = [p, i64, p, i64, p, i64, i64, i64, i64, i64, p, p, f32, p, p, p, p, i32, i64,
                                       p, p, p, p, i64, f32, p, i32]
    lib.qk_matmul.restype = lib.qk_dequantize.restype = lib.qk_simd.restype = lib.qk_paged_attention.restype = i32
    lib.qk_rms_norm.argtypes = [p, i64, i64, p, f32, p]
    lib.qk_rms_norm.restype = i32
    return lib


@functools.cache
def available() -> bool:
    """Whether the fast kernels run here (QWENKIT_NATIVE=0: never, to test the other path); decided once."""
    if os.environ.get("QWENKIT_NATIVE") == "0":
        return False
    lib = library()
    return lib is not None and lib.qk_simd() == 1


def check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")
