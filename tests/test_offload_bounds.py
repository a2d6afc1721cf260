"""The offload benchmark's bounds: the I/O bound from the best read rate seen, and the roof (the lower
of it and the compute roof, flexinfer's own rate with nothing streamed)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import offload  # noqa: E402

MB = 1_000_000


def _flex(fraction, tok_s, streamed, io_seconds=None, config="flexinfer"):
    flex = {"streamed_bytes_per_forward": streamed, "bytes_streamed": 10 * streamed,
            "io_seconds": io_seconds} if streamed else {"streamed_bytes_per_forward": 0}
    return {"config": config, "fraction": fraction, "tok_s": tok_s, "flexinfer": flex}


def _rows():
    return [_flex(0.25, 5.0, 400 * MB, io_seconds=2.0),   # reads at 2 GB/s in the run
            _flex(0.75, 8.0, 150 * MB, io_seconds=1.0),   # 1.5 GB/s
            _flex(1.0, 10.0, 0),
            {"config": "mmap", "fraction": 0.75, "tok_s": 4.0, "flexinfer": None}]


def test_io_bound_uses_the_best_rate_seen_and_the_roof_caps_it_at_the_resident_rate():
    meta = {"disk_bytes_per_s_before": 1.8e9, "disk_bytes_per_s_after": 1.9e9}
    rows = _rows()
    assert offload._apply_io_bound(meta, rows) == 2.0e9  # the 25% run's reads beat both measurements
    quarter, three_quarters, full, mmap = rows
    assert quarter["io_bound_tok_s"] == 2.0e9 / (400 * MB) == quarter["roof_tok_s"]  # 5.0 < 10: I/O bound
    assert three_quarters["io_bound_tok_s"] == 2.0e9 / (150 * MB)  # 13.3 tok/s: more than the compute allows
    assert three_quarters["roof_tok_s"] == 10.0
    assert full["io_bound_tok_s"] is None and full["roof_tok_s"] is None and mmap["roof_tok_s"] is None
    assert meta["compute_roof_tok_s"] == 10.0
    values = offload._ratios(rows, [0.25, 0.75, 1.0])["values"]
    assert values["vs_io_bound@0.25"] == values["vs_roof@0.25"] == 1.0
    assert abs(values["vs_io_bound@0.75"] - 8.0 / (2.0e9 / (150 * MB))) < 1e-12
    assert values["vs_roof@0.75"] == 0.8 and values["vs_mmap@0.75"] == 2.0


def test_without_a_run_at_100_percent_the_roof_is_the_io_bound():
    meta = {"disk_bytes_per_s_before": 1.8e9, "disk_bytes_per_s_after": 1.9e9}
    rows = _rows()[:2]
    offload._apply_io_bound(meta, rows)
    assert meta["compute_roof_tok_s"] is None
    assert all(r["roof_tok_s"] == r["io_bound_tok_s"] for r in rows)


def test_the_disk_figures_are_per_token_and_a_share_of_the_decode(tmp_path):
    import child_protocol

    stats = tmp_path / "diskstats"
    dev = __import__("os").stat(tmp_path).st_dev
    major, minor = __import__("os").major(dev), __import__("os").minor(dev)
    line = "{} {} sdx 10 0 {} 5 0 0 0 0 0 {} 0 0 0 0 0 0 0"
    stats.write_text(line.format(major, minor, 2048, 1500) + "\n")
    before = child_protocol.disk_counters(str(tmp_path), str(stats))
    assert before == {"read_bytes": 2048 * 512, "busy_s": 1.5}
    stats.write_text(line.format(major, minor, 2048 + 4096, 2250) + "\n")
    activity = child_protocol.disk_activity(before, child_protocol.disk_counters(str(tmp_path), str(stats)))
    assert activity == {"disk_read_bytes": 4096 * 512, "disk_busy_s": 0.75}
    stats.write_text("1 2 other 0 0 0 0 0 0 0 0 0 0 0\n")
    assert child_protocol.disk_counters(str(tmp_path), str(stats)) is None  # not a device the kernel counts
    assert child_protocol.disk_activity(before, None) == {}
    rows = [{"config": "flexinfer", "fraction": 0.5, "tokens": 4, "seconds": 1.5, "tok_s": 2.7, **activity},
            {"config": "llamacpp", "fraction": 0.5, "tokens": 4, "seconds": 2.0, "tok_s": 2.0}]
    lines = offload._disk_lines(rows, [0.5], ["flexinfer", "llamacpp"])
    assert rows[0]["disk_read_bytes_per_token"] == 4096 * 512 / 4 and rows[0]["disk_busy_fraction"] == 0.5
    assert len(lines) == 2 and "50%" in lines[1] and "disk_busy_fraction" not in rows[1]
