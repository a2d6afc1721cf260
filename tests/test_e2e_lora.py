"""LoRA adapters with VTENSOR: requests for the base model and for two adapters (random weights in
PEFT's format, made here) share a system prompt; vLLM keys its prefix cache by adapter, so a block
cached for one adapter is never hit by another.  Two rounds, the second hitting the first's
blocks: the same tokens as vanilla vLLM.  An adapter with FlexInfer streaming the base model's weights:
the same tokens as vLLM's default loader."""
from __future__ import annotations

import json
import os

import pytest

from test_e2e_vtensor import _engine, _shutdown, _stats

pytestmark = pytest.mark.e2e

SYSTEM = "You are a helpful assistant who answers briefly. " * 8
QUESTIONS = ["Name a fruit.", "Name a river.", "Name a city.", "Name a color."]


def _adapter(path, seed, layers=30, hidden=576, kv=192, rank=8):
    """A rank-8 LoRA of SmolLM2's q_proj and v_proj with random weights, as PEFT saves one."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.05
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}))
    return str(path)


def _run(model, stats_file, adapters, **kw):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm = _engine(model, stats_file, max_model_len=512, block_size=32, enable_lora=True, max_lora_rank=8, max_loras=2,
                  kv_cache_memory_bytes=32 << 20, **kw)
    loras = [None, LoRARequest("a1", 1, adapters[0]), LoRARequest("a2", 2, adapters[1]), LoRARequest("a1", 1, adapters[0])]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    out = [[list(llm.generate([SYSTEM + q], params, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids)
            for q, lora in zip(QUESTIONS, loras)] for _ in range(2)]
    stats = _stats(stats_file) if kw else {}
    _shutdown(llm)
    return out, stats


def test_lora_adapters_match_vanilla(smollm2_path, tmp_path):
    adapters = [_adapter(tmp_path / f"a{i}", seed=i) for i in (1, 2)]
    ref, _ = _run(smollm2_path, tmp_path / "unused.json", adapters)
    out, stats = _run(smollm2_path, tmp_path / "stats.json", adapters, attention_backend="VTENSOR")
    assert out == ref
    assert len({tuple(ids) for ids in ref[0][:3]}) == 3  # base, a1 and a2 answer differently: the adapters act
    assert stats["prefix_hit_bytes"] > 0 and stats["mapped_bytes"] == 0


def test_lora_adapters_with_flexinfer_match_the_default_loader(tiny_llama_path, tmp_path):
    """`--load-format flexinfer` at 40% of a tiny llama's weights (layers and the tied embedding/lm_head
    streamed; the embedding lookup reads its rows from the store, which vLLM's LoRA embedding layer
    reaches past module hooks) with an adapter on its attention: the tokens of vLLM's default loader,
    for the adapter and the base model alike."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapter = LoRARequest("a1", 1, _adapter(tmp_path / "a1", seed=1, layers=4, hidden=256, kv=128))
    prompts = [{"prompt_token_ids": [100 + (i * 7 + k) % 900 for k in range(30 + 20 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(**kw):
        llm = LLM(model=tiny_llama_path, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=32 << 20, enable_lora=True, max_lora_rank=8, max_loras=1, **kw)
        out = [[list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=lora, use_tqdm=False)]
               for lora in (adapter, None)]
        _shutdown(llm)
        return out

    ref = run()
    assert ref[0] != ref[1]  # the adapter acts
    stats = tmp_path / "flex.json"
    os.environ["FLEXOFFLOAD_STATS_FILE"] = str(stats)
    out = run(load_format="flexinfer", model_loader_extra_config={"memory_budget": 0.4,
                                                                 "cache_dir": str(tmp_path / "store")})
    assert out == ref
    flex = json.loads(stats.read_text())
    assert flex["head_streamed"] and flex["forwards"] > 0, flex
