"""The main job: SmolLM2 served by ``vllm serve`` with this plugin, one chat request.

``python -m vllm_vtensor.demo`` (``make demo``) fetches and converts the model if
needed, starts ``vllm serve`` on 127.0.0.1 exactly as a user types it, asks one
question through the ``openai`` client, prints the answer and the server's
memory figures, and stops the server.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_vtensor.models import build_smollm2

# Flags this plugin adds to `vllm serve`; each appears here once it works.
PLUGIN_FLAGS: list[str] = ["--attention-backend", "VTENSOR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_script() -> str | None:
    exe = Path(sys.executable).parent / "vllm"
    return str(exe) if exe.exists() else shutil.which("vllm")


def vllm_cli() -> str:
    """The `vllm` console script of the running interpreter's environment."""
    found = _vllm_script()
    if not found:
        raise SystemExit("the `vllm` command is not installed: run `make setup` first")
    return found


def vllm_command() -> list[str]:
    """How to run `vllm`: its console script, or, where vLLM is importable without one (its source on
    the path, as benchmarks/gpu_vllm.sh has it), its CLI module."""
    import importlib.util

    if not _vllm_script() and importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return [vllm_cli()]


class Server:
    """`vllm serve MODEL ...` as a child process in its own process group."""

    def __init__(self, model: str | Path, extra_args: list[str], port: int | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), *extra_args]
        self.log_path = log_path
        self.env = env  # the server's environment (default: this process's)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> "Server":
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}; see {self.log_path or 'its output'}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not become healthy in {timeout:.0f}s; see {self.log_path}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def tree_rss_bytes(self) -> int:
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _metric_lines(text: str, prefixes: tuple[str, ...]) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefixes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_vtensor.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--log", default="demo-server.log", help="where the server's output goes")
    args = p.parse_args(argv)

    model = build_smollm2()
    serve_args = [
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        # vLLM on CPU otherwise reserves 92% of the NUMA node up front.
        "--kv-cache-memory-bytes", "512M",
        *PLUGIN_FLAGS,
    ]
    print(f"$ vllm serve {model} --host 127.0.0.1 {' '.join(serve_args)}", flush=True)
    server = Server(model, serve_args, log_path=args.log)
    t0 = time.monotonic()
    with server:
        print(f"server healthy after {time.monotonic() - t0:.1f}s at {server.url} (log: {args.log})")
        from openai import OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        t1 = time.monotonic()
        reply = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": args.question}],
            temperature=0.0,
            max_tokens=64,
        )
        answer = reply.choices[0].message.content
        print(f"\nQ: {args.question}\nA: {answer}\n")
        print(f"latency {time.monotonic() - t1:.2f}s, {reply.usage.completion_tokens} tokens")
        print(f"server process tree RSS: {server.tree_rss_bytes() / 2**30:.2f} GiB")
        for line in _metric_lines(server.metrics(), ("vllm:kv_cache_usage_perc", "vllm_vtensor_resident", "vllm_vtensor_mapped", "vllm_vtensor_budget",
                                                          "vllm_vtensor_prefix", "vllm_vtensor_map_op", "flexoffload")):
            print("metric", line)
    return 0 if answer else 1


if __name__ == "__main__":
    sys.exit(main())
