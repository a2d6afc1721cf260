"""benchmarks/block_updates.py at a small size on the host backend: its decode steps map exactly the blocks
they should (one per request whose last block is full) and the JSON holds every phase."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import block_updates  # noqa: E402


def _crossings(first_token: int, steps: int, block: int) -> int:
    """Steps among ``steps`` decode steps from ``first_token`` on that start a new block."""
    return sum((first_token + s) % block == 0 for s in range(steps))


def test_block_updates_benchmark_maps_a_block_per_full_block(tmp_path):
    out = tmp_path / "bu.json"
    steps, block, prompt = 24, 16, 100
    assert block_updates.main(["--requests", "4,8", "--steps", str(steps), "--compute-ms", "0", "--prompt-len",
                               str(prompt), "--max-model-len", "512", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["requests"] for r in data["rows"]] == [4, 8] and data["block_size"] == block
    for row in data["rows"]:
        n = row["requests"]
        aligned = n * _crossings(prompt, steps, block)
        spread = sum(_crossings(prompt + i * block // n, steps, block) for i in range(n))
        assert row["bookkeeping"]["maps_per_step"] * steps == aligned
        assert row["steady"]["maps_per_step"] * steps == spread
        assert 0 < row["bookkeeping"]["step_ms_median"] <= row["steady"]["step_ms_p90"]
        for phase in ("bookkeeping", "steady"):  # a step creates at most the chunks it maps
            assert 0 <= row[phase]["created_in_step_per_step"] <= row[phase]["maps_per_step"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert data["commit"] and data["command"]


def test_with_map_ahead_every_block_is_mapped_once_in_the_step_or_ahead(tmp_path):
    out = tmp_path / "bu-ahead.json"
    steps, block, prompt = 24, 16, 100
    assert block_updates.main(["--requests", "4", "--steps", str(steps), "--compute-ms", "5", "--prompt-len",
                               str(prompt), "--max-model-len", "512", "--map-ahead", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    steady = data["rows"][0]["steady"]
    spread = sum(_crossings(prompt + i * block // 4, steps, block) for i in range(4))
    assert data["map_ahead"] and steady["mapped_ahead_per_step"] > 0
    assert round((steady["maps_per_step"] + steady["mapped_ahead_per_step"]) * steps) == spread
