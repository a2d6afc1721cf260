"""llama.cpp's side of benchmarks/offload.py: one model in llama-cpp-python, the same protocol as the
vLLM children (load, warm up, touch RESULT.loaded, wait for RESULT.go while the parent tightens the
cgroup limit, then decode and write tok/s to RESULT). Runs in .venv-llamacpp (benchmarks/llamacpp_setup.sh).

llama.cpp maps the GGUF file (its default, ``use_mmap``): under a memory limit the kernel keeps what
fits of the weights in page cache and reads the rest back as the layers run - llama.cpp's own way of
running a model larger than memory. Greedy decoding of exactly ``--tokens`` tokens after the same
prompt text as the vLLM children (chat template applied), batch 1, the machine's cores as threads.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from child_protocol import disk_activity, disk_counters, loaded_then_wait_for_go

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--result", required=True)
    args = p.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=512, n_threads=os.cpu_count(), n_batch=512, use_mmap=True,
                use_mlock=False, seed=0, verbose=False)
    prompt = _chat_prompt(llm)
    decode(llm, prompt, 2)  # warm-up: every layer touched once
    loaded_then_wait_for_go(args.result)
    disk = disk_counters(args.gguf)
    t0 = time.perf_counter()
    n = decode(llm, prompt, args.tokens)
    elapsed = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps({"tokens": n, "seconds": elapsed, "tok_s": n / elapsed,
                                             **disk_activity(disk, disk_counters(args.gguf))}))


def _chat_prompt(llm) -> list[int]:
    """The prompt's tokens through the model's own chat template (as vLLM's llm.chat does)."""
    from jinja2 import Template

    template = llm.metadata.get("tokenizer.chat_template")
    text = Template(template).render(messages=PROMPT, add_generation_prompt=True) if template else PROMPT[0]["content"]
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def decode(llm, prompt: list[int], n: int) -> int:
    """Prefill ``prompt``, then ``n`` greedy tokens one at a time (EOS not special-cased, like ignore_eos)."""
    llm.reset()
    llm.eval(prompt)
    for _ in range(n):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return n


if __name__ == "__main__":
    main()
