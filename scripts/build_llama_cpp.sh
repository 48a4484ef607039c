#!/usr/bin/env bash
# Build llama-cpp-python, the CPU speed peer of the benchmarks, once per machine and install it into .venv.
# PyPI ships only its source: compiling llama.cpp takes 30-40 minutes on 2 cores. The wheel is cached under the
# qwenkit cache folder, so later runs (and fresh clones on the same machine) install it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE="${QWENKIT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenkit}/wheels"
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION (30-40 minutes on 2 cores); wheel goes to $CACHE" >&2
    # GGML_NATIVE: tuned for this CPU (AVX2/FMA here), as a user building llama.cpp locally would get.
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        nice -n 10 .venv/bin/python -m pip wheel --no-deps --no-binary llama-cpp-python -w "$CACHE" \
        "llama-cpp-python==$VERSION"
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
.venv/bin/python -m pip install --quiet -c requirements.lock "$wheel" diskcache
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"
