#!/usr/bin/env bash
# Prepares what benchmarks/gpu_vllm.sh carries to a GPU machine without vLLM or network (none of it is committed;
# /.gpuvllm/ and /.whl/ go to .git/info/exclude):
#   .gpuvllm/vllm-src.tar.xz  the .py files of the vllm==0.32.0 wheel (no compiled ops), its dist-info
#   .gpuvllm/tokenizer/       SmolLM2's tokenizer files
#   .whl/                     cp312 wheels of the dependencies listed in benchmarks/gpu_vllm/requirements.txt
# Then: run(command="OUT=$OUT bash benchmarks/gpu_vllm.sh", carry=[".gpuvllm", ".whl"]).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
mkdir -p .git/info
for d in /.gpuvllm/ /.whl/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
PLATFORMS="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
  --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$tmp" vllm==0.32.0
(cd "$tmp" && unzip -q vllm-0.32.0-*.whl -x '*.so' 'vllm/vllm-rs' 'vllm/third_party/deep_gemm/*' \
    'vllm/third_party/fmha_sm100/*' 'vllm/entrypoints/serve/instrumentator/static/*' && rm -f vllm-0.32.0.dist-info/RECORD)
mkdir -p .gpuvllm
tar -cJf .gpuvllm/vllm-src.tar.xz -C "$tmp" vllm vllm-0.32.0.dist-info
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl -r benchmarks/gpu_vllm/requirements.txt
tiny=$($PY -c "from vllm_vtensor.models import build_tiny_llama; print(build_tiny_llama())")
mkdir -p .gpuvllm/tokenizer
cp "$tiny"/{chat_template.jinja,tokenizer.json,tokenizer_config.json,generation_config.json} .gpuvllm/tokenizer/
du -sh .gpuvllm .whl
