"""The weight store: a model's tensors, in their final in-memory form, at 4096-aligned offsets.

Written once per (checkpoint, dtype) by vLLM's own weight loading, straight into
the file (``WeightStore.build``), so streamed reads need no conversion or fusing:
a tensor's bytes go straight from disk into its buffer.  Aligned offsets and sizes allow ``O_DIRECT`` reads (no page cache, so
streamed bytes are not held twice and do not count against a cgroup budget).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ALIGN = 4096
_COMPLETE = "complete"


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Entry:
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def padded(self) -> int:
        return aligned(self.nbytes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.replace("torch.", ""))


def store_key(model_dir: str, dtype: torch.dtype, names: list[str], shard: str = "") -> str:
    """Changes when the checkpoint files, the dtype, the parameter set or the shard (a tensor-parallel
    rank's part of the weights, e.g. ``"tp1of2"``; "" for the whole model) change."""
    h = hashlib.sha256(str(dtype).encode() + shard.encode())
    for p in sorted(Path(model_dir).glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update("\n".join(sorted(names)).encode())
    return h.hexdigest()[:20]


class WeightStore:
    def __init__(self, path: Path, index: dict[str, Entry], direct_io: bool):
        self.path = path
        self.index = index
        flags = os.O_RDONLY | (os.O_DIRECT if direct_io else 0)
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise OSError(f"cannot open the flexinfer weight store {path} "
                          f"({'O_DIRECT' if direct_io else 'buffered'}): {e}; try \"direct_io\": false") from e
        self.direct_io = direct_io
        self.row_fd = os.open(path, os.O_RDONLY)  # buffered, for small embedding-row reads

    @staticmethod
    def exists(path: Path) -> bool:
        return (path.with_suffix(".json")).exists() and json.loads(path.with_suffix(".json").read_text()).get(_COMPLETE)

    @staticmethod
    def _layout(tensors) -> tuple[dict[str, dict], int]:
        """Each tensor's place in the file (4096-aligned offsets, in order) and the file's size."""
        index, offset = {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            index[name] = {"offset": offset, "nbytes": nbytes, "dtype": str(t.dtype), "shape": list(t.shape)}
            offset += aligned(nbytes)
        return index, offset

    @staticmethod
    def _publish(tmp: Path, path: Path, index: dict, **extra) -> None:
        """Put the written file in place, then its index (with ``extra`` fields), each whole or not at all
        for an engine starting beside this one."""
        os.replace(tmp, path)
        meta = path.with_suffix(".json")
        tmp_meta = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps({"tensors": index, _COMPLETE: True, **extra}))
        os.replace(tmp_meta, meta)

    @classmethod
    def write(cls, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        index, size = cls._layout(tensors)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # engines building the same store never share one
        with open(tmp, "wb") as f:
            for name, t in tensors.items():
                f.seek(index[name]["offset"])
                f.write(t.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy().tobytes())
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        cls._publish(tmp, path, index)

    @classmethod
    def build(cls, path: Path, params: dict[str, torch.nn.Parameter], load: Callable[[], None]) -> None:
        """Write the store by loading straight into it: while ``load()`` runs (vLLM's weight loading),
        each parameter's data is a view of the store file mapped shared, so the weights land in the
        file's pages, which the kernel writes back and reclaims under memory pressure, and never in
        anonymous memory: a device or a memory limit that cannot hold the model does not have to.
        Afterwards every parameter holds an empty meta tensor of its dtype."""
        index, size = cls._layout({n: p.data for n, p in params.items()})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:  # blocks reserved up front: a full disk under a shared mapping would be a SIGBUS mid-load
                os.posix_fallocate(fd, 0, max(size, ALIGN))
            except OSError as e:
                raise OSError(f"cannot make the flexinfer weight store {path} ({size / 2**30:.2f} GiB): {e}; free disk "
                              f"space there or point the \"cache_dir\" option at a disk that has it") from e
            mem = mmap.mmap(fd, max(size, ALIGN), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                raw = torch.frombuffer(mem, dtype=torch.uint8)
                for name, p in params.items():
                    e = index[name]
                    rehome(p, raw[e["offset"]: e["offset"] + e["nbytes"]].view(p.dtype).view(p.shape))
                del raw
                try:
                    load()
                finally:  # no view of the mapping may outlive it
                    for p in params.values():
                        rehome(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))
                    gc.collect()
                mem.flush()
            finally:
                try:
                    mem.close()
                except BufferError:  # a view still held somewhere: the mapping goes when it does
                    pass
            os.ftruncate(fd, size)
            os.fsync(fd)
            # written back, so clean: drop the pages now rather than leave them for a memory limit's
            # reclaim to find (streamed reads bypass the page cache anyway)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        cls._publish(tmp, path, index)

    @classmethod
    def open(cls, path: Path, direct_io: bool) -> "WeightStore":
        raw = json.loads(path.with_suffix(".json").read_text())["tensors"]
        index = {k: Entry(v["offset"], v["nbytes"], v["dtype"], tuple(v["shape"])) for k, v in raw.items()}
        # a store cut short (disk full, copied in part) would fail mid-inference, or kill the process
        # with SIGBUS where the mmap baseline touches a page past its end: refuse it here instead
        need = max((e.offset + e.padded for e in index.values()), default=0)
        have = os.stat(path).st_size
        if have < need:
            raise OSError(f"the flexinfer weight store {path} is damaged: {have} bytes where its index needs {need}; "
                          f"delete {path} and {path.with_suffix('.json')} and the next load rebuilds them")
        return cls(path, index, direct_io)

    def read_range(self, offset: int, view: memoryview, direct: bool = True) -> int:
        """Read up to ``len(view)`` bytes at ``offset`` into ``view``, stopping at the file's end; through the
        store's own descriptor (``O_DIRECT`` where it reads so: ``view``, ``offset`` and the length aligned)
        when ``direct``, else the buffered one.  Returns the bytes read."""
        fd = self.fd if direct else self.row_fd
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def read_into(self, name: str, buf: memoryview) -> int:
        """Read tensor ``name`` into ``buf`` (page-aligned, at least ``padded`` bytes); return bytes read."""
        e = self.index[name]
        done = self.read_range(e.offset, buf[: e.padded])
        if done < e.nbytes:
            raise OSError(f"short read of {name} from {self.path}: {done} of {e.nbytes} bytes (file damaged?)")
        return e.nbytes

    def read_tensor(self, name: str, dst: torch.Tensor) -> None:
        """Tensor ``name`` whole into ``dst`` (contiguous CPU memory of its size; a buffered read)."""
        e = self.index[name]
        done = self.read_range(e.offset, memoryview(dst.view(torch.uint8).reshape(-1).numpy()), direct=False)
        if done != e.nbytes:
            raise OSError(f"short read of {name} from {self.path}: {done} of {e.nbytes} bytes (file damaged?)")

    def row_runs(self, name: str, max_bytes: int) -> list[tuple[str, int, int]]:
        """Split 2-D tensor ``name`` into runs of whole rows of at most ``max_bytes`` (fewer if its rows
        do not divide), each starting at an ALIGN-aligned offset (``O_DIRECT``), and index each as a
        tensor of its own, ``name#r0:r1``: ``[(run name, r0, r1)]``."""
        e = self.index[name]
        rows = e.shape[0]
        row_bytes = e.nbytes // rows
        step = ALIGN // math.gcd(row_bytes, ALIGN)  # rows per aligned group
        per = max_bytes // row_bytes // step * step
        if per <= 0:
            raise ValueError(f"{name}: {step} rows ({step * row_bytes} bytes, the smallest aligned run) exceed "
                             f"{max_bytes} bytes")
        runs = []
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            run = f"{name}#{r0}:{r1}"
            self.index[run] = Entry(e.offset + r0 * row_bytes, (r1 - r0) * row_bytes, e.dtype, (r1 - r0, *e.shape[1:]))
            runs.append((run, r0, r1))
        return runs

    def read_rows(self, name: str, rows: list[int], row_bytes: int) -> bytes:
        e = self.index[name]
        return b"".join(os.pread(self.row_fd, row_bytes, e.offset + r * row_bytes) for r in rows)

    def close(self) -> None:
        for fd in (self.fd, self.row_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def rehome(p: torch.nn.Parameter, t: torch.Tensor) -> None:
    """Point parameter ``p`` at ``t``, keeping the Parameter object, its class (vLLM's parameter
    classes hold ``weight_loader`` as a property) and the attributes vLLM set on it.  ``p.data = t``
    cannot move a tensor to or from the meta device, so that case swaps the tensors themselves."""
    if p.is_meta == t.is_meta:
        p.data = t
        return
    attrs = dict(p.__dict__)
    new = t.detach().as_subclass(type(p))  # no __init__: the class, not a fresh vLLM parameter
    new.requires_grad_(p.requires_grad)
    torch.utils.swap_tensors(p, new)
    p.__dict__.update(attrs)


HUGE_PAGE = 2 << 20


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what ``O_DIRECT`` needs), in transparent huge pages where the
    kernel offers them: an ``O_DIRECT`` read pins every page it lands in, and reads into 2 MiB pages
    ran 2.1x as fast as into 4 KiB ones on a 2-core VM's disk (2.60 vs 1.21 GB/s,
    benchmarks/read_then_compute.py); a buffer is no bigger for it (the mapping's size is unchanged)."""
    buf = mmap.mmap(-1, max(aligned(nbytes), ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # transparent huge pages off: 4 KiB pages
            pass
    return buf
