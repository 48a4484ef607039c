"""Every kernel variant against the plain C reference, on the same vectors (tests/native/kernel_vectors.c).

The program is compiled once per variant with the flags qwenkit.kernels.build installs it with: the x86 variants
this CPU executes run here; the Arm ones are cross-compiled with Debian's aarch64 gcc and run under qemu-user
(scripts/ensure_test_tools.sh installs both). Block matmuls and dequantization must equal the reference bit for bit
(csrc/simd.h: the same integer lanes and float operations on every variant); attention and RMSNorm sum in other
orders and must agree within 1e-5 of the largest output (float32 rounding over at most a few hundred terms).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qwenkit.kernels import build
from qwenkit.kernels.library import runnable

PROGRAM = Path(__file__).parents[1] / "native" / "kernel_vectors.c"
EXACT = ("matmul", "matmul_x8", "dequantize", "dequantize_x8")
FLOAT_BOUND = 1e-5
CROSS = {"aarch64": ("aarch64-linux-gnu-gcc", "qemu-aarch64")}


def compile_and_run(tmp: Path, arch: str, variant: str) -> dict[tuple[str, str], np.ndarray]:
    if arch == build.machine():
        cc, runner = build.compiler(), []
        if cc is None:
            pytest.skip("no C compiler")
    else:
        cc, qemu = CROSS[arch]
        missing = [tool for tool in (cc, qemu) if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"{' and '.join(missing)} not installed (scripts/ensure_test_tools.sh installs them as root)")
        runner = [qemu]
    exe = tmp / f"vectors-{arch}-{variant}"
    flags = build.variants(arch)[variant] + (["-static"] if runner else [])
    subprocess.run([cc, "-O3", "-ffp-contract=off", "-std=c11", "-Wno-unknown-pragmas", *flags, f"-I{build.CSRC}",
                    str(PROGRAM), *map(str, build.sources()), "-o", str(exe), "-lm"], check=True, capture_output=True)
    proc = subprocess.run([*runner, str(exe)], check=True, capture_output=True, text=True, timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        kind, name, built_as, *values = line.split()
        assert built_as == variant, f"{exe.name} was compiled as {built_as}"
        results[(kind, name)] = np.array([int(v, 16) for v in values], dtype=np.uint32)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return compile_and_run(tmp_path_factory.mktemp("reference"), build.machine(), "reference")


def assert_matches(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, expected in want.items():
        if key[0] in EXACT:
            assert np.array_equal(got[key], expected), f"{key} differs from the reference"
        else:
            a, b = got[key].view(np.float32), expected.view(np.float32)
            assert np.abs(a - b).max() <= FLOAT_BOUND * np.abs(b).max(), key


def test_vectors_cover_every_block_type_and_layout(reference):
    kinds = {kind for kind, _ in reference}
    assert kinds == {"matmul", "matmul_x8", "dequantize", "dequantize_x8", "attention", "rms_norm"}
    assert {name.split("-")[0] for kind, name in reference if kind == "matmul"} == {"t2", "t6", "t8", "t12", "t13",
                                                                                   "t14"}


@pytest.mark.parametrize("variant", [v for v in build.variants("x86_64") if v != "reference"])
def test_x86_variant_equals_reference(variant, reference, tmp_path):
    if build.machine() != "x86_64":
        pytest.skip("not an x86-64 machine")
    if not runnable(variant):
        pytest.skip(f"this CPU cannot execute the {variant} variant")
    assert_matches(compile_and_run(tmp_path, "x86_64", variant), reference)


@pytest.mark.parametrize("variant", list(build.variants("aarch64")))
def test_arm_variant_under_qemu_equals_reference(variant, reference, tmp_path):
    if build.machine() == "aarch64" and not runnable(variant):
        pytest.skip(f"this CPU cannot execute the {variant} variant")
    assert_matches(compile_and_run(tmp_path, "aarch64", variant), reference)


@pytest.mark.parametrize("variant", list(build.variants()))
def test_installed_library_holds_its_variant(variant):
    """The install built every variant of this architecture, each compiled as the variant it is named after."""
    path = build.LIB_DIR / build.library_name(variant)
    if not path.exists():
        pytest.skip(f"{path.name} was not built (see the install's output)")
    if not runnable(variant):
        pytest.skip(f"this CPU cannot execute the {variant} variant")
    lib = ctypes.CDLL(str(path))
    lib.qk_variant.restype = ctypes.c_char_p
    assert lib.qk_variant().decode() == variant
