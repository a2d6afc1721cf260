#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one run (a GPU machine here has PyTorch,
# Triton, cuda-bindings, pytest, pytest-xdist and hypothesis, but no vLLM and no network).
#
# Prepare here (never commit the copies; /.vllm-kernels/ is git-ignored):
#     .venv/bin/python benchmarks/vllm_kernels.py --copy .vllm-kernels
# Run there from the repository root, carrying .vllm-kernels:
#     OUT=/some/dir bash benchmarks/gpu_session.sh
# Writes under $OUT: card.txt, gpu-tests.log, kernel-tests.log, vmm-cuda.json, block_updates-cuda(-lookahead1).json,
# offload_gpu-cuda.json, kernels-cuda.json, kernels-roof-cuda.json (+ .png) and a log of each; copy the
# JSON files to benchmarks/results/ (the card and the command are inside them).
# Each step has its own time limit so that one failure cannot eat the others' time. Their limits add up to more
# than one 10-minute call: STEPS picks some (default "1 2 3 4 5"; e.g. STEPS="5" for the kernels' goals alone,
# STEPS="1 2" for the unit tests and VMM figures).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-1 2 3 4 5} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -m pip show cuda-bindings 2>/dev/null | grep -E '^(Name|Version)'
} 2>&1 | tee "$OUT/card.txt"

# 1. CUDA VMM backend + VTensor on CUDA (property tests included), the KV space mapping ahead on CUDA, FlexInfer's CUDA staging (pinned
#    host arena, side-stream copies), and, alongside (CPU-bound Triton compiles), the kernel tests
#    compiled, against the SDPA reference.
if want 1; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_kernels.py -k "not benchmark_feeds" \
      >"$OUT/kernel-tests.log" 2>&1 &
  kt=$!
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_vmm_backends.py tests/test_vtensor.py \
      tests/test_flex_runtime.py tests/test_kv_space_kernels.py tests/test_kv_space.py \
      2>&1 | tee "$OUT/gpu-tests.log"
  wait $kt; echo "kernel tests exit $?" >>"$OUT/kernel-tests.log"; tail -n 25 "$OUT/kernel-tests.log"
fi

# 2. map/unmap/share latency and growth vs copy-on-grow on the CUDA backend
want 2 && timeout 60 $PY benchmarks/vmm.py --device cuda --out "$OUT/vmm-cuda.json" 2>&1

# 2b. VTENSOR's block updates per decode step (bookkeeping, maps) for 16-256 running requests at Llama-3.1-8B's
#     chunk (2 MiB at block 16): what each decode step pays before its forward pass
want 2 && timeout 60 $PY benchmarks/block_updates.py --device cuda --chunk-kib 2048 --max-model-len 2048 \
    --out "$OUT/block_updates-cuda.json" 2>&1
#     and with chunks made only one step ahead (what a decoding request got before the half-block look-ahead)
want 2 && timeout 45 $PY benchmarks/block_updates.py --device cuda --chunk-kib 2048 --max-model-len 2048 --requests 32,128 \
    --decode-lookahead 1 --out "$OUT/block_updates-cuda-lookahead1.json" 2>&1

# 3. FlexInfer's CUDA streaming runtime alone: prefetch into the pinned ring vs sync vs the bound
want 3 && timeout 90 $PY benchmarks/offload_gpu.py --out "$OUT/offload_gpu-cuda.json" 2>&1

# 4. our kernels (default tiles and a small sweep) vs vLLM's context_attention_fwd and unified_attention
#    (bf16, D 128, GQA 4); the JSON is rewritten after each case. KERNELS_ARGS=--no-tune times the default
#    tiles only (faster)
want 4 && timeout ${KERNELS_TIMEOUT:-150} $PY benchmarks/kernels.py --vllm-src .vllm-kernels ${KERNELS_ARGS:-} \
    --out "$OUT/kernels-cuda.json" 2>&1 | tee "$OUT/kernels.log"

# 5. the kernels' goals: the goal's prefill shapes (TMA candidates on Hopper) and decode at batch 64 / 4k
#    (bf16 and fp8 KV) against this card's bf16 matmul and device copy, and torch's flash attention
want 5 && timeout ${ROOF_TIMEOUT:-180} $PY benchmarks/kernels.py --roof --out "$OUT/kernels-roof-cuda.json" 2>&1 \
    | tee "$OUT/kernels-roof.log"
