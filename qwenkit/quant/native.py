"""The CPU kernels of csrc/ (GGUF block matmuls, attention, decode-step norms): built with the system C compiler
on first use, cached, loaded by ctypes.

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

import torch

from qwenkit.quant.cpu import cpu_flags

log = logging.getLogger("qwenkit.quant")

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-std=c11"]

# ggml type ids the kernels take (qwenkit.checkpoint.quants.GGMLType), with (values per block, bytes per block)
BLOCKS = {2: (32, 18), 6: (32, 22), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}

_ERRORS = {1: "unsupported block type", 2: "bad shape (rows not whole blocks, or heads not grouped evenly)",
           3: "out of memory", 4: "row id out of range"}


class _Part(ctypes.Structure):
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
    lib.qk_matmul.argtypes = [ctypes.POINTER(_Part), i32, p, i64, i64, p, i32]
    lib.qk_dequantize.argtypes = [p, i32, i64, i64, p, i64, p, i32, i32]
    lib.qk_repack.argtypes = lib.qk_unpack.argtypes = [p, i32, i64, i64, p]
    lib.qk_repack.restype = lib.qk_unpack.restype = i32
    lib.qk_attend.argtypes = [p, i64, i64, i64, i64, i64, p, p, i32, i64, i64, i64, i64, i64, ctypes.c_float, p,
                              i32]
    f32 = ctypes.c_float
    lib.qk_decode_attention.argtypes = [p, i64, i64, i64, i64, p, p, f32, p, p, p, p, i32, i64, i64, i64, i64, i64,
                                        f32, p, i32]
    lib.qk_matmul.restype = lib.qk_dequantize.restype = lib.qk_simd.restype = lib.qk_attend.restype = i32
    lib.qk_rms_norm.argtypes = [p, i64, i64, p, f32, p]
    lib.qk_decode_attention.restype = lib.qk_rms_norm.restype = i32
    return lib


def available() -> bool:
    """Whether GGUF blocks get the fast kernels here (QWENKIT_NATIVE=0: never, to test the other path)."""
    if os.environ.get("QWENKIT_NATIVE") == "0":
        return False
    lib = library()
    return lib is not None and lib.qk_simd() == 1


X8 = 256  # kernel type flag: rows interleaved by 8 (csrc/blocks.c, qk_repack)
INTERLEAVED = (2, 6, 8)  # Q4_0, Q5_0, Q8_0: their 8-row kernel does the work of 8 row kernels in a third of the steps


def supports(qtype: int) -> bool:
    return int(qtype) in BLOCKS


def row_bytes(qtype: int, k: int) -> int:
    per_block, nbytes = BLOCKS[int(qtype) & ~X8]
    return k // per_block * nbytes


def interleave(blocks: torch.Tensor, qtype: int, k: int) -> list[tuple[torch.Tensor, int]]:
    """A block tensor [N, row bytes] as the kernel's parts: its first N - N % 8 rows interleaved by 8 (types in
    INTERLEAVED), the rest as they are. The same bytes in all, in a new tensor."""
    n = int(blocks.shape[0])
    if int(qtype) not in INTERLEAVED or n < 8:
        return [(blocks, int(qtype))]
    out = torch.empty_like(blocks)
    _check(library().qk_repack(blocks.data_ptr(), int(qtype), n, k, out.data_ptr()), "block repack")
    n8 = n - n % 8
    parts = [(out[:n8], int(qtype) | X8)]
    return parts + ([(out[n8:], int(qtype))] if n8 < n else [])


def plain(blocks: torch.Tensor, kernel_type: int, k: int) -> torch.Tensor:
    """The GGUF bytes of a kernel part (interleaved ones restored)."""
    if not kernel_type & X8:
        return blocks
    out = torch.empty_like(blocks)
    _check(library().qk_unpack(blocks.data_ptr(), kernel_type & ~X8, int(blocks.shape[0]), k, out.data_ptr()),
           "block unpack")
    return out


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


class Parts:
    """Weights given as parts of stacked rows (each a uint8 tensor [rows, row bytes] of one block type), with the
    ctypes array describing them built once."""

    def __init__(self, blocks: list[tuple[torch.Tensor, int]]):
        self.blocks = blocks
        self.rows = sum(int(b.shape[0]) for b, _ in blocks)
        self._array = (_Part * len(blocks))(*(_Part(b.data_ptr(), int(t), int(b.shape[0])) for b, t in blocks))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 contiguous -> [M, rows] float32."""
        m, k = x.shape
        y = torch.empty((m, self.rows), dtype=torch.float32)
        rc = library().qk_matmul(self._array, len(self.blocks), x.data_ptr(), m, k, y.data_ptr(),
                                 torch.get_num_threads())
        _check(rc, "block matmul")
        return y


def dequantize(blocks: torch.Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32,
               ids: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a block tensor (uint8 [N, row bytes]) as float32 or bfloat16 [N or len(ids), k], into `out` if given
    (contiguous): gguf-py's values (bfloat16: those rounded to nearest even)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return dequantize(blocks, qtype, k, torch.float32, ids).to(dtype)
    n = int(blocks.shape[0])
    if ids is not None:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
    shape = (n if ids is None else ids.numel(), k)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"block dequantize: out must be contiguous {dtype} {list(shape)}")
    rc = library().qk_dequantize(blocks.data_ptr(), int(qtype), n, k, None if ids is None else ids.data_ptr(),
                                 0 if ids is None else ids.numel(), out.data_ptr(), dtype == torch.bfloat16,
                                 torch.get_num_threads())
    _check(rc, "block dequantize")
    return out


ATTENTION_DTYPES = (torch.float32, torch.float16)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor | None:
    """Causal attention of R new tokens per sequence, each row computed alone (so a row's result does not depend
    on the other rows in the call): q [B, H, R, D] float32, the last R of the L positions of k, v [B, KV, L, D]
    float32 or float16 views (any strides but a contiguous D, the same for both); `window` keeps only each row's
    last `window` keys. [B, H, R, D] float32, or None where this call is not the kernel's (dtypes, layout): the
    caller's own path runs then."""
    b, h, rows, d = q.shape
    if q.dtype != torch.float32 or k.dtype not in ATTENTION_DTYPES or v.dtype != k.dtype \
            or k.shape != v.shape or k.stride() != v.stride() or k.stride(-1) != 1 or k.shape[0] != b \
            or k.shape[-1] != d or h % k.shape[1] or rows > k.shape[2]:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    sb, sh, st, _ = k.stride()
    rc = library().qk_attend(q.data_ptr(), b, h, k.shape[1], d, rows, k.data_ptr(), v.data_ptr(),
                             k.dtype == torch.float16, sb, sh, st, k.shape[2], window or 0, d**-0.5, out.data_ptr(),
                             torch.get_num_threads())
    _check(rc, "attention")
    return out


def decode_attention(qkv: torch.Tensor, heads: int, kv_heads: int, q_norm: torch.Tensor | None,
                     k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, window: int | None) -> torch.Tensor:
    """The rest of a decode step's attention after the fused q/k/v projection, in one call: Qwen3's q/k RMSNorm
    (where the norm weights are given), RoPE, the new key and value written into the caches at `pos`, attention
    over positions [0, pos]. qkv [B, (H + 2 KV) * D] float32; cos, sin [B, D] float32; caches [B, KV, capacity,
    D] float32 or float16 (contiguous D) -> [B, H * D] float32."""
    b, d = qkv.shape[0], k_cache.shape[-1]
    if qkv.dtype != torch.float32 or qkv.shape[1] != (heads + 2 * kv_heads) * d or k_cache.dtype not in \
            ATTENTION_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.stride() != v_cache.stride() \
            or k_cache.stride(-1) != 1 or tuple(k_cache.shape[:2]) != (b, kv_heads) or pos >= k_cache.shape[2]:
        raise ValueError("decode attention: qkv or caches of the wrong shape, dtype or layout")
    qkv, cos, sin = qkv.contiguous(), cos.reshape(b, d).contiguous(), sin.reshape(b, d).contiguous()
    weights = [w.contiguous() if w is not None else None for w in (q_norm, k_norm)]
    out = torch.empty((b, heads * d), dtype=torch.float32)
    sb, sh, st, _ = k_cache.stride()
    rc = library().qk_decode_attention(
        qkv.data_ptr(), b, heads, kv_heads, d, *(w.data_ptr() if w is not None else None for w in weights), eps,
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.float16,
        sb, sh, st, pos, window or 0, d**-0.5, out.data_ptr(), torch.get_num_threads())
    _check(rc, "decode attention")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of float32 x with a float32 weight (a decode step's few rows)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != x.shape[-1:]:
        raise ValueError("rms_norm: float32 rows and a float32 weight of their width")
    x = x.contiguous()
    out = torch.empty_like(x)
    _check(library().qk_rms_norm(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.contiguous().data_ptr(),
                                 eps, out.data_ptr()), "rms_norm")
    return out
