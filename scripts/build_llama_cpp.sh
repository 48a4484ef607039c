#!/usr/bin/env bash
# Build llama-cpp-python, the CPU speed peer of the benchmarks, once per machine and install it into .venv.
# PyPI ships only its source: compiling llama.cpp takes 30-40 minutes on 2 cores. The wheel is cached under the
# qwenkit cache folder, so later runs (and fresh clones on the same machine) install it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE="${QWENKIT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenkit}/wheels"
# LLAMA_CPP_ISA=avx2: a second build limited to AVX2/FMA/F16C, the peer of qwenkit's avx2 kernels on an AVX-512
# machine (QWENKIT_KERNELS=avx2). It goes to its own folder, not into .venv: run the benchmark with
# PYTHONPATH=<cache>/wheels/avx2/site to race it.
ISA="${LLAMA_CPP_ISA:-native}"
[ "$ISA" = native ] || CACHE="$CACHE/$ISA"
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION (30-40 minutes on 2 cores); wheel goes to $CACHE" >&2
    # Tuned for this CPU's instruction sets, as a local llama.cpp build would be, but without AMX: where
    # /proc/cpuinfo lists AMX and the virtual machine does not enable its tile state, ggml's AMX kernels die with
    # SIGILL (seen here: tileloadd in ggml_backend_amx_mul_mat). -march=native would switch AMX on, so the flags
    # are named one by one from the CPU's own list.
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    args="-DGGML_NATIVE=OFF"
    [ "$ISA" = avx2 ] && flags=" $(echo "$flags" | tr ' ' '\n' | grep -Ex 'avx|avx2|fma|f16c|bmi2' | tr '\n' ' ') "
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then args="$args -DGGML_${pair##*:}=ON"; fi
    done
    echo "CMAKE_ARGS=$args" >&2
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        nice -n 10 .venv/bin/python -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
        -w "$CACHE" "llama-cpp-python==$VERSION"
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
if [ "$ISA" != native ]; then
    .venv/bin/python -m pip install --quiet --no-deps --upgrade --target "$CACHE/site" "$wheel"
    echo "llama-cpp-python ($ISA) installed in $CACHE/site: PYTHONPATH=$CACHE/site" >&2
    exit 0
fi
.venv/bin/python -m pip install --quiet -c requirements.lock "$wheel" diskcache
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
