#!/usr/bin/env bash
# VTENSOR through vLLM on a CUDA GPU machine without vLLM. Such machines have PyTorch 2.11, Triton and cuda-bindings
# but no vLLM and no network, and vLLM's wheel (its CUDA ops built for torch 2.13) is too big to carry.
# So this runs vLLM 0.32's own Python source (engine, scheduler, GPU model runner, Triton attention)
# with none of its compiled ops: both engines use vLLM's native torch layers and Triton kernels
# (tests/test_e2e_cuda.py sets custom_ops=none and native IR ops) and vLLM's V1 model runner (V2 needs a
# compiled op; VTENSOR always runs on V1), so the comparison stays like with like.
#
# Prepare here with benchmarks/gpu_vllm_prepare.sh (never commit these; it puts /.gpuvllm/ and /.whl/
# in .git/info/exclude):
#   .gpuvllm/vllm-src.tar.xz   vllm/ (the .py files of the vllm==0.32.0 wheel) + vllm-0.32.0.dist-info
#   .gpuvllm/tokenizer/        SmolLM2's tokenizer files (for the random-weight models built there)
#   .whl/                      cp312 wheels of vLLM's Python dependencies the GPU image lacks
# Run there from the repository root, carrying .gpuvllm and .whl:
#   OUT=/some/dir bash benchmarks/gpu_vllm.sh [pytest args]
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
SITE=/tmp/vllm-site
PY=${PYTHON:-python3}
mkdir -p "$SITE"
$PY -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
tar -xJf .gpuvllm/vllm-src.tar.xz -C "$SITE" || exit 1
# vLLM's CUDA platform module imports its compiled ops library first thing; a stand-in answers the
# capability queries vLLM makes while importing (no kernels: see the file)
cp benchmarks/gpu_vllm/_C_stable_libtorch.py "$SITE/vllm/_C_stable_libtorch.py"
# and vllm_flash_attn refuses to import without its compiled extensions, which model modules import
# unconditionally (fa_utils); nothing here calls flash attention, so let it import
sed -i 's/^if not (FA2_AVAILABLE or FA3_AVAILABLE):/if False:  # gpu_vllm.sh: FA extensions absent/' \
    "$SITE/vllm/vllm_flash_attn/__init__.py"
# the plugin's entry points (vllm.general_plugins), as pip would install them
mkdir -p "$SITE/vllm_vtensor-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm-vtensor\nVersion: 0.1.0\n' >"$SITE/vllm_vtensor-0.1.0.dist-info/METADATA"
printf '[vllm.general_plugins]\nvtensor = vllm_vtensor.plugin:register\nflexoffload = flexoffload.plugin:register\n\n[vllm.stat_logger_plugins]\nvtensor = vllm_vtensor.metrics:VTensorStatLogger\n' \
    >"$SITE/vllm_vtensor-0.1.0.dist-info/entry_points.txt"
# the cache (models, FlexInfer's weight store, read with O_DIRECT) stays off /tmp, which may be tmpfs
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 VTENSOR_CACHE="$PWD/.gpu-cache" VTENSOR_TOKENIZER="$PWD/.gpuvllm/tokenizer"
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-0} VLLM_USE_FLASHINFER_SAMPLER=0 VTENSOR_NO_VLLM_OPS=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "filesystems: cache $(stat -f -c %T "$PWD") (models, FlexInfer's O_DIRECT weight store), /tmp $(stat -f -c %T /tmp)"
  $PY -c "import torch, triton, vllm; print('torch', torch.__version__, 'triton', triton.__version__, 'vllm', vllm.__version__); from vllm.platforms import current_platform as p; print('platform', p.device_name)"
} 2>&1 | tee "$OUT/card-vllm.txt"
# GPU_E2E=1: only the end-to-end benchmark at a real model's shape (GPU_E2E_SHAPE, default llama-3.1-8b; GPU_E2E_ARGS
# for more): vanilla (Triton backend), VTENSOR and VTENSOR with vLLM's kernel side by side; JSON, PNG and log in $OUT
# (with the per-step profile of benchmarks/step_profile/ in $OUT/step-profile.txt)
# First (VMM_PROBE=0 skips it, ~15 s): whether the CUDA VMM calls a step's block updates make wait for a running kernel
# (benchmarks/vmm.py while_busy, in $OUT/vmm-cuda-busy.json)
if [ "${GPU_E2E:-0}" = 1 ]; then
  [ "${VMM_PROBE:-1}" = 0 ] || timeout 45 $PY benchmarks/vmm.py --device cuda --reps 32 --sizes-mib 16 --reserve-gib "" \
      --busy-ms 20 --busy-reps 5 --out "$OUT/vmm-cuda-busy.json" 2>&1 | tail -n 40 | tee "$OUT/vmm-busy.log"
  # and a decode step's block updates at the 8B shape's 2 MiB chunk, maps in the step or made ahead (~10 s each)
  for ahead in "" --map-ahead; do
    [ "${VMM_PROBE:-1}" = 0 ] || timeout 25 $PY benchmarks/block_updates.py --device cuda --chunk-kib 2048 \
        --requests 32,128 --steps 64 --compute-ms 3 $ahead --out "$OUT/block_updates-cuda${ahead:+-map-ahead}.json" 2>&1 \
        | tail -n 4 | tee -a "$OUT/vmm-busy.log"
  done
  VTENSOR_STEP_PROFILE="$OUT/steps" PYTHONPATH="$PWD/benchmarks/step_profile:$PYTHONPATH" \
  timeout ${E2E_TIMEOUT:-500} $PY benchmarks/gpu_e2e.py --shape "${GPU_E2E_SHAPE:-llama-3.1-8b}" --out-dir "$OUT" \
      ${GPU_E2E_ARGS:-} 2>&1 | tee "$OUT/gpu-e2e-full.log" | grep --line-buffered -v "^(EngineCore\|^INFO\|^WARNING\|^(Worker\|^(MainProcess" \
      | tee "$OUT/gpu-e2e.log"
  $PY benchmarks/step_profile/report.py "$OUT/steps" >"$OUT/step-profile.txt" 2>&1
  exit 0
fi
# MULTI_ENGINE=1: only two `vllm serve` engines on the GPU, one shared KV pool (VTENSOR_POOL) against the KV split
# statically between two vanilla servers, under load that moves between them (benchmarks/multi_engine.py: Llama-3.2-1B's
# shape, dummy weights, token ids; MULTI_ENGINE_ARGS for others, default one busy phase and the balanced one):
# JSON, PNG, the table and the servers' logs in $OUT
if [ "${MULTI_ENGINE:-0}" = 1 ]; then
  timeout ${MULTI_TIMEOUT:-540} $PY benchmarks/multi_engine.py --device cuda --out "$OUT/multi_engine-cuda-2engines" \
      --log-dir "$OUT/multi-engine-logs" ${MULTI_ENGINE_ARGS:---phases busy-0,all} 2>&1 | tee "$OUT/multi-engine.log"
  exit 0
fi
# OFFLOAD_CUDA=1: only FlexInfer in vLLM at device budgets of 25/50/75% (the rest in pinned host memory) against vLLM's
# cpu_offload_gb at the same device memory and all weights resident, decode at batch 1 and 16 (benchmarks/offload_cuda.py:
# OFFLOAD_CUDA_SHAPE, default llama-3.1-8b, random bf16 weights written once under $VTENSOR_CACHE; OFFLOAD_CUDA_ARGS
# for more): JSON, PNG and log in $OUT
if [ "${OFFLOAD_CUDA:-0}" = 1 ]; then
  timeout ${OFFLOAD_TIMEOUT:-540} $PY benchmarks/offload_cuda.py --shape "${OFFLOAD_CUDA_SHAPE:-llama-3.1-8b}" --out-dir "$OUT" \
      ${OFFLOAD_CUDA_ARGS:-} 2>&1 | tee "$OUT/offload-cuda-full.log" \
      | grep --line-buffered -v "^(EngineCore\|^INFO\|^WARNING\|^(Worker\|^(MainProcess" | tee "$OUT/offload-cuda.log"
  exit 0
fi
# The CUDA end-to-end tests: ~19 engines (~45 s each to start and run), more than one 10-minute call holds, so
# E2E_PART picks a third that fits one call: 1 the VTENSOR tests (7 engines), 2 FlexInfer's (7), 3 the shared pool's
# and fp8 KV's (5); none runs them all (E2E_TESTS names others). Each outcome is written to outcomes.txt as it happens
# (a pass as one line, a failure with its report), and output goes to the log line by line: a run cut off by its
# limit keeps both. BENCH_ONLY=1 skips the tests (a second call for the benchmark).
case "${E2E_PART:-all}" in
  1) part="tests/test_backend_cuda_impl.py tests/test_e2e_cuda.py" ;;
  2) part="tests/test_e2e_flexinfer_cuda.py" ;;
  3) part="tests/test_e2e_shared_pool_cuda.py tests/test_e2e_fp8_kv_cuda.py" ;;
  all) part="tests/test_backend_cuda_impl.py tests/test_e2e_cuda.py tests/test_e2e_flexinfer_cuda.py tests/test_e2e_shared_pool_cuda.py tests/test_e2e_fp8_kv_cuda.py" ;;
  *) echo "E2E_PART is 1, 2 or 3 (or unset: all, more than one call holds)"; exit 2 ;;
esac
[ "${BENCH_ONLY:-0}" = 1 ] || VTENSOR_OUTCOMES="$OUT/outcomes.txt" timeout ${E2E_TIMEOUT:-540} $PY -m pytest -v -p no:cacheprovider -rA \
    --durations=0 ${E2E_TESTS:-$part} "$@" 2>&1 | grep --line-buffered -v "^(EngineCore\|^INFO\|^WARNING" | tee "$OUT/e2e-cuda.log"

# BENCH=1 (or BENCH_ONLY=1): then vanilla (Triton backend) vs VTENSOR side by side on a random-weight llama of SmolLM2-135M's
# shape, bf16 (block 176: SmolLM2's 23040 B of KV per token make a 4 MiB chunk with 3% padding)
if [ "${BENCH:-0}" = 1 ] || [ "${BENCH_ONLY:-0}" = 1 ]; then
  # the start-up cost of a KV space's virtual range on CUDA (the zero granule mapped over every
  # granule of it): VTENSOR reserves max_num_seqs slots of max_model_len, tens of GiB by default
  timeout 45 $PY benchmarks/vmm.py --device cuda --reps 50 --sizes-mib 16 --reserve-gib 1,4,16,64 \
      --out "$OUT/vmm-reserve-cuda.json" 2>&1 | tail -n 8 | tee "$OUT/vmm-reserve-cuda.log"
  model=$($PY -c "from vllm_vtensor.models import build_tiny_llama as b; print(b(head_dim=64, num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576, intermediate_size=1536))")
  engine='{"dtype": "bfloat16", "max_num_seqs": 64, "compilation_config": {"custom_ops": ["none"]}, "kernel_config": {"ir_op_priority": {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}}}'
  timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/serve_compare.py --model "$model" --block-size 176 --kv-bytes $((2 << 30)) \
      --vanilla-backend TRITON_ATTN --engine-json "$engine" --out "$OUT/serve_compare-cuda.json" ${BENCH_ARGS:-} 2>&1 \
      | grep --line-buffered -v "^(EngineCore\|^INFO\|^WARNING" | tee "$OUT/serve_compare-cuda.log"
fi
