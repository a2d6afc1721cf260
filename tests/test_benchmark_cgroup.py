"""The memory-cgroup helper the offload and multi-engine benchmarks hold their engines with."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cgroup  # noqa: E402

pytestmark = pytest.mark.skipif(not cgroup.available(), reason="needs root and the cgroup v1 memory controller")

CHILD = """
import mmap, sys
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "rb") as g:
    m, n = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ)
    touched = sum(m[i] for i in range(0, int(sys.argv[3]), 4096)) + sum(n[i] for i in range(0, len(n), 4096))
    print("touched", flush=True)
    sys.stdin.read()
"""


def test_file_rss_counts_the_mapped_resident_pages_of_one_file(tmp_path):
    weights, other = tmp_path / "weights.bin", tmp_path / "other.bin"
    weights.write_bytes(b"\1" * (32 << 20))
    other.write_bytes(b"\2" * (8 << 20))
    cg = cgroup.MemoryCgroup(f"vllm-vtensor-test-{tmp_path.name}")
    try:
        touched = 20 << 20
        proc = subprocess.Popen(cg.enter([sys.executable, "-c", CHILD, str(weights), str(other), str(touched)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "touched"
        rss = cg.file_rss(weights)
        # the touched pages (the kernel may map up to 64 KiB around the last fault), not the other file's
        assert touched <= rss <= touched + (64 << 10)
        assert cg.file_rss(other) == 8 << 20
        assert cg.file_rss(tmp_path / "not-mapped.bin") == 0
        proc.stdin.close()
        proc.wait(timeout=30)
        assert cg.file_rss(weights) == 0  # no process left
    finally:
        cg.close()
