"""FlexInfer inside vLLM on a GPU, at device budgets, against vLLM's own weight offloading.

    python benchmarks/offload_cuda.py --shape llama-3.1-8b --out-dir DIR    # on a CUDA GPU (gpu_vllm.sh OFFLOAD_CUDA=1)
    python benchmarks/offload_cuda.py --shape tiny --quick --out-dir DIR    # on a CPU: the same protocol, tiny

The model is a real model's shape (``vllm_vtensor.models.SHAPES``) with random weights written once
as safetensors into ``--model-dir`` (the device's own disk; FlexInfer writes its weight store from
them on its first load). Requests go by token ids (no tokenizer). Engines, each in a process of its
own, one after another:

* ``flexinfer`` at each device budget (a fraction of the weight bytes on the device; ``host_budget``
  auto: the streamed rest in pinned host memory, copied to the device each forward pass);
* ``vllm_offload``: vLLM's ``cpu_offload_gb`` with the same device memory for weights (CUDA only;
  where vLLM refuses it, the reason is recorded);
* ``resident``: every weight on the device, vLLM's default loader.

Each decodes ``--tokens`` tokens for batches of 1 and 16 prompts (32 random token ids each,
``ignore_eos``, greedy) after a warm-up; tok/s = generated tokens / wall time. The host-to-device
bound of a FlexInfer row: bytes copied to the device per forward pass (its stats) / the pinned copy
bandwidth measured in the same run (tokens per forward = the batch). ``tokens_equal_resident``: the
greedy answers equal the resident engine's (bf16 on CUDA may round differently with the batch).
Writes ``offload-cuda-<card>-<shape>.json`` (after every engine) and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_harness import CUSTOM_OPS, KERNEL_CONFIG, without_vllm_ops
from provenance import card_name, provenance

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16)


def write_random_model(shape: str, folder: Path, dtype: str) -> Path:
    """``shape``'s config and random weights (std 0.02, norms 1) as safetensors, one file per few
    layers so no more than ~2 GB is held at once; kept when already written."""
    import torch
    from safetensors.torch import save_file

    from vllm_vtensor.models import SHAPES

    cfg = dict(SHAPES[shape], torch_dtype=dtype)
    done = folder / "complete"
    if done.exists() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    t = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * d
    q = cfg["num_attention_heads"] * d

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02).to(t)

    def save(tensors: dict, n: int) -> None:
        save_file(tensors, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})

    save({"model.embed_tokens.weight": rand(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=t)}
         | ({} if cfg.get("tie_word_embeddings") else {"lm_head.weight": rand(cfg["vocab_size"], h)}), 0)
    layers_per_file = max(1, (2 << 30) // (2 * (2 * h * q + 2 * h * kv + 3 * h * i)))
    part = {}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        part |= {p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
                 p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
                 p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                 p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h, dtype=t),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=t)}
        if (layer + 1) % layers_per_file == 0 or layer == cfg["num_hidden_layers"] - 1:
            save(part, layer + 1)
            part = {}
    done.write_text("1")
    return folder


def weight_bytes(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                shape = s.get_shape()
                numel = 1
                for x in shape:
                    numel *= x
                n += numel * 2 if s.get_dtype() in ("BF16", "F16") else numel * 4
    return n


def child(spec: dict) -> dict:
    """One engine: load, warm up, decode each batch; its figures (run in its own process)."""
    import random

    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, max_model_len=1024, seed=0,
              skip_tokenizer_init=True, kv_cache_memory_bytes=spec["kv_bytes"])
    if spec["cuda"] and without_vllm_ops():
        kw |= dict(compilation_config={"custom_ops": CUSTOM_OPS}, kernel_config=KERNEL_CONFIG)
    kw |= spec["engine_kw"]
    t0 = time.perf_counter()
    llm = LLM(**kw)
    out = {"start_seconds": round(time.perf_counter() - t0, 1)}
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, spec["vocab"]) for _ in range(32)]} for _ in range(max(BATCHES))]
    sp = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True, detokenize=False)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)  # warm-up
    for b in BATCHES:
        t0 = time.perf_counter()
        res = llm.generate(prompts[:b], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out[f"b{b}"] = {"tokens": n, "seconds": elapsed, "tok_s": n / elapsed,
                        "answers": [list(r.outputs[0].token_ids) for r in res]}
    stats = spec.get("stats_file")
    if stats and Path(stats).exists():
        out["flexinfer"] = json.loads(Path(stats).read_text())
    return out


def run_engine(name: str, spec: dict, tmp: Path) -> dict:
    """``spec`` in a process of its own (device memory back between engines); a refusal is recorded."""
    spec_file, result = tmp / f"{name}.spec.json", tmp / f"{name}.result.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    if spec.get("stats_file"):
        env["FLEXOFFLOAD_STATS_FILE"] = spec["stats_file"]
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file), str(result)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"{name}: failed\n{tail}", flush=True)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result.read_text())


def pinned_copy_bytes_per_s(cuda: bool) -> float | None:
    """Host-to-device copy rate from pinned memory (best of 5, 1 GiB), None without a GPU."""
    if not cuda:
        return None
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t0))
    return best


def summarise(rows: dict, budgets: list[float], copy_bps: float | None) -> dict:
    """Per budget and batch: FlexInfer tok/s, its host-to-device bound, and the ratios."""
    resident = rows.get("resident", {})
    out = {}
    for f in budgets:
        flex, off = rows.get(f"flexinfer@{f:g}", {}), rows.get(f"vllm_offload@{f:g}", {})
        stats = flex.get("flexinfer") or {}
        per_fwd = stats["bytes_copied_to_device"] / stats["forwards"] if stats.get("forwards") else None
        for b in BATCHES:
            run, off_run, res_run = (r.get(f"b{b}") or {} for r in (flex, off, resident))
            tok, off_tok = run.get("tok_s"), off_run.get("tok_s")
            bound = b * copy_bps / per_fwd if copy_bps and per_fwd else None
            out[f"{f:g}/b{b}"] = {
                "flexinfer_tok_s": tok, "host_to_device_bound_tok_s": bound,
                "vs_bound": tok / bound if tok and bound else None,
                "vllm_offload_tok_s": off_tok, "vs_vllm_offload": tok / off_tok if tok and off_tok else None,
                "tokens_equal_resident": run["answers"] == res_run["answers"] if tok and res_run else None}
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4))
    for ax, b in zip(axes, BATCHES):
        for key, label in (("flexinfer_tok_s", "flexinfer"), ("host_to_device_bound_tok_s", "host->device bound"),
                           ("vllm_offload_tok_s", "vLLM cpu_offload_gb")):
            pts = [(float(k.split("/")[0]) * 100, v[key]) for k, v in data["summary"].items()
                   if k.endswith(f"/b{b}") and v.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        res = (data["rows"].get("resident", {}).get(f"b{b}") or {}).get("tok_s")
        if res:
            ax.axhline(res, color="gray", linestyle="--", label="all resident")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("device budget (% of the weights)")
        ax.set_ylabel("decode tok/s")
        ax.legend()
    fig.suptitle(f"{data['shape']} on {data['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--budgets", default="0.25,0.5,0.75")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="8 tokens and one budget, 80%% (the tiny shape's embedding "
                                                       "needs most of the weights' bytes as buffers)")
    p.add_argument("--model-dir", default=None, help="where the random weights are written (default: the cache)")
    p.add_argument("--out-dir", help="where the JSON and the plot go (required)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(json.loads(Path(args.child[0]).read_text()))))
        return 0
    if not args.out_dir:
        p.error("--out-dir is required")
    import torch

    from vllm_vtensor.models import SHAPES, cache_dir

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    budgets = [0.8] if args.quick else [float(b) for b in args.budgets.split(",")]
    tokens = 8 if args.quick else args.tokens
    model = write_random_model(args.shape, Path(args.model_dir or cache_dir() / f"random-{args.shape}-{dtype}"), dtype)
    wbytes = weight_bytes(model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = card_name(torch.cuda.get_device_name()) if cuda else "cpu"
    stem = out_dir / f"offload-cuda-{card}-{args.shape}"
    copy_bps = pinned_copy_bytes_per_s(cuda)
    data = {**provenance("offload_cuda.py", sys.argv[1:] if argv is None else argv), "shape": args.shape,
            "card": card, "dtype": dtype, "weight_bytes": wbytes, "tokens": tokens, "batches": list(BATCHES),
            "pinned_copy_bytes_per_s": copy_bps, "native_ops": not without_vllm_ops(), "rows": {}}
    if not cuda:
        data["vllm_offload"] = "not run: vLLM's cpu_offload_gb moves weights from a GPU to the host"
    base = dict(model=str(model), dtype=dtype, cuda=cuda, vocab=SHAPES[args.shape]["vocab_size"], tokens=tokens,
                kv_bytes=(2 << 30) if cuda else (64 << 20))
    plan = [("resident", {})]
    for f in budgets:
        plan.append((f"flexinfer@{f:g}", {"load_format": "flexinfer",
                                          "model_loader_extra_config": {"memory_budget": f}}))
        if cuda:
            plan.append((f"vllm_offload@{f:g}", {"cpu_offload_gb": (1 - f) * wbytes / 2**30}))
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine_kw in plan:
            spec = dict(base, engine_kw=engine_kw)
            if name.startswith("flexinfer"):
                spec["stats_file"] = str(Path(tmp) / f"{name}.stats.json")
            row = run_engine(name, spec, Path(tmp))
            data["rows"][name] = row
            print(name, {k: round(v["tok_s"], 2) for k, v in row.items() if k.startswith("b")} or row.get("error"),
                  flush=True)
            data["summary"] = summarise(data["rows"], budgets, copy_bps)
            stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot(data, stem.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=1))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
