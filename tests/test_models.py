"""Model cache: folders are verified before use; damage gives an error that names the fix."""
from __future__ import annotations

import json
import shutil

import pytest

from vllm_vtensor.models import ModelCacheError, _COMPLETE, main, verify_model_dir


def test_smollm2_folder_is_a_complete_llama(smollm2_path):
    path = verify_model_dir(smollm2_path)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (path / "chat_template.jinja").exists() or "chat_template" in (path / "tokenizer_config.json").read_text()


def test_smollm2_tokenizer_and_chat_template(smollm2_path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(ModelCacheError, match="does not exist.*Rebuild it with: make-it"):
        verify_model_dir(tmp_path / "nope", "make-it")


def test_incomplete_folder_is_rejected(tmp_path, smollm2_path):
    broken = tmp_path / "m"
    shutil.copytree(smollm2_path, broken)
    (broken / _COMPLETE).unlink()
    with pytest.raises(ModelCacheError, match="incomplete"):
        verify_model_dir(broken)


def test_truncated_weights_are_rejected(tmp_path, smollm2_path):
    broken = tmp_path / "m"
    shutil.copytree(smollm2_path, broken)
    weights = next(broken.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    with pytest.raises(ModelCacheError, match="truncated"):
        verify_model_dir(broken)


def test_wrong_model_type_is_rejected(tmp_path, smollm2_path):
    broken = tmp_path / "m"
    shutil.copytree(smollm2_path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelCacheError, match="expected 'llama'"):
        verify_model_dir(broken)


def test_cli_reports_a_damaged_cache_without_a_traceback(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_tiny_llama_is_deterministic_and_loads(tiny_llama_path):
    import torch
    import transformers

    cfg = json.loads(open(f"{tiny_llama_path}/config.json").read())
    assert cfg["head_dim"] == 64 and cfg["num_hidden_layers"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = model(ids).logits
    assert logits.shape == (1, 4, cfg["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen3", "gpt_oss", "qwen3_moe"])
def test_tiny_models_decode_tokens_that_depend_on_what_they_read(arch):
    """The architecture tests compare greedy tokens with vanilla vLLM's: a model that repeats one token
    whatever it reads (transformers' default weights at this size) would let a broken attention pass."""
    import torch
    import transformers

    from vllm_vtensor.models import build_tiny_model

    model = transformers.AutoModelForCausalLM.from_pretrained(build_tiny_model(arch), dtype=torch.float32)
    outs = []
    for p in range(3):
        ids = torch.tensor([[(p * 7 + j * 13) % 4000 + 10 for j in range(20)]])
        outs.append(model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 20:].tolist())
    assert all(len(set(o)) >= 4 for o in outs), outs
    assert len({tuple(o) for o in outs}) == 3, outs
