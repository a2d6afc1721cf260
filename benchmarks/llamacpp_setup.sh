#!/usr/bin/env bash
# The llama.cpp side of benchmarks/offload.py, in an environment of its own (not the test suite's):
# llama-cpp-python built from PyPI's source for this CPU, and llama.cpp's own HF -> GGUF converter
# (vendored in that source). Creates .venv-llamacpp/ at the repository root; ~12 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-llamacpp
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$VENV/bin/pip" install -q "llama-cpp-python==$VERSION" numpy jinja2
# llama.cpp's own HF -> GGUF converter and its gguf package, from the same source; the converter runs
# with the project's environment (it needs torch, safetensors and transformers, which that has)
SRC=$(mktemp -d)
"$VENV/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
tar -xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC"
LLAMA=$(echo "$SRC"/llama_cpp_python-*/vendor/llama.cpp)
mkdir -p "$VENV/share"
rm -rf "$VENV/share/gguf-py" "$VENV/share/conversion"
cp -r "$LLAMA/gguf-py" "$VENV/share/gguf-py"
cp "$LLAMA/convert_hf_to_gguf.py" "$VENV/share/"
[ ! -d "$LLAMA/conversion" ] || cp -r "$LLAMA/conversion" "$VENV/share/conversion"  # the converter's per-model code
rm -rf "$SRC"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
