#!/usr/bin/env bash
# Everything this project checks on a lent CUDA GPU, in one run (a GPU machine here has PyTorch,
# Triton, cuda-bindings, pytest and hypothesis, but no vLLM and no network).
#
# Prepare here (never commit the copies; /.vllm-kernels/ is git-ignored):
#     .venv/bin/python benchmarks/vllm_kernels.py --copy .vllm-kernels
# Run there from the repository root, carrying .vllm-kernels:
#     OUT=/some/dir bash benchmarks/gpu_session.sh
# Writes under $OUT: gpu-tests.log, vmm-cuda.json, kernels-cuda.json and a log of each; copy the
# JSON files to benchmarks/results/ with the card and the command (both are inside them).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"

# 1. CUDA VMM backend, VTensor on CUDA, compiled kernels vs the SDPA reference
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_vmm_backends.py tests/test_vtensor.py \
    2>&1 | tee "$OUT/gpu-tests.log"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not benchmark_feeds" \
    2>&1 | tee -a "$OUT/gpu-tests.log"

# 2. map/unmap/share latency and growth vs copy-on-grow on the CUDA backend
timeout 120 $PY benchmarks/vmm.py --device cuda --out "$OUT/vmm-cuda.json" 2>&1 | tee "$OUT/vmm.log"

# 3. our kernels vs vLLM's context_attention_fwd and unified_attention (bf16, D 128, GQA 4)
timeout 240 $PY benchmarks/kernels.py --vllm-src .vllm-kernels --out "$OUT/kernels-cuda.json" 2>&1 \
    | tee "$OUT/kernels.log"
