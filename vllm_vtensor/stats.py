"""Allocator figures from the worker, readable by the API server's metrics.

The KV space lives in vLLM's worker process; ``/metrics`` is served by the API
server process.  The worker writes its figures as JSON to the file named by
``VTENSOR_STATS_FILE`` (set by the plugin in the first vLLM process, and
inherited by the engine and worker processes it spawns), at most every
``_MIN_INTERVAL_S`` unless forced; readers load the latest snapshot.  The
figures are gathered and written by a helper thread off the compute cores: a
step only hands the request over (gathering and writing took ~0.3 ms, on the
critical path of every step that added or finished requests).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

from . import settings
from .ledger import alive, start_time
from .log import get_logger
from .threads import move_to_helper_cores

ENV = "VTENSOR_STATS_FILE"
_MIN_INTERVAL_S = 0.2
# Forced snapshots (requests starting or finishing, memory given back) are written at most this often, the
# latest state last: writing one after every step (a KV space of ~12k mapped chunks takes ~1.2 ms to count,
# holding its lock and the GIL) took a step's block updates of 128 running requests from 1.4 to 4 ms.
_FORCED_INTERVAL_S = 0.05
_last_write = 0.0
_attached = None


def private_folder_path() -> Path:
    return Path(tempfile.gettempdir()) / f"vllm-vtensor-{os.getuid()}"


def private_folder() -> Path:
    """``$TMPDIR/vllm-vtensor-<uid>``: created mode 0700, and refused if another user owns it."""
    folder = private_folder_path()
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise settings.SettingError(f"{folder} is not a folder of this user: remove it, or set {ENV} to a file in a "
                                    "folder of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Snapshot folders (and files) of servers that no longer run; return what went."""
    gone = []
    for f in folder.glob("stats-*"):
        try:
            pid = int(f.name.split("-", 1)[1].split(".", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            if f.is_dir() and not f.is_symlink():
                _retire(str(f))
            else:
                f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def _remove(path: str) -> None:
    for p in [path, *glob.glob(f"{glob.escape(path)}.*.tmp")]:
        with contextlib.suppress(OSError):
            os.unlink(p)


def _retire(folder: str) -> None:
    """Remove a server's snapshot folder. A worker may still be writing into it: its files are
    removed until the folder itself goes, after which no write can create one."""
    for _ in range(200):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError:  # a file came in between: remove it too
            time.sleep(0.005)


def ensure_stats_path() -> str:
    """Choose the snapshot file once, in the first process (children inherit it through the
    environment): ``$VTENSOR_STATS_FILE`` if set, else ``stats.json`` in this process's folder
    (:func:`ensure_private_file`)."""
    return ensure_private_file(ENV, "stats.json")


_retired_at_exit: set[str] = set()  # this process's folders, removed when it exits


def ensure_private_file(env: str, name: str) -> str:
    """``$env`` if set, else ``name`` in a folder of this process (``stats-<pid>``) in the private
    folder, set in ``$env`` for the processes it starts; the folder is removed with its files when
    this process exits (those of processes that died are removed here). A file whose folder is not
    on this host was chosen on another node (vLLM's Ray executor hands the driver's environment to
    workers on every node): this host's processes choose their own."""
    chosen = settings.raw(env)
    if chosen and _owner(chosen) is not None and not os.path.isdir(os.path.dirname(chosen)):
        os.environ.pop(env)  # not ours to use: choose below
    path = settings.get(env)
    if path:
        return path
    own = private_folder_path() / f"stats-{os.getpid()}"
    if not own.is_dir():
        remove_stale(private_folder())
        own.mkdir(mode=0o700, exist_ok=True)
    if str(own) not in _retired_at_exit:
        _retired_at_exit.add(str(own))
        atexit.register(_retire, str(own))
    path = str(own / name)
    os.environ[env] = path
    return path


def attach(kv) -> None:
    global _attached
    _attached = kv
    path = settings.raw(ENV)
    if path and _owner(path) is not None:  # a file chosen for the server: removed when this process ends too
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _remove, args=(path,), exitpriority=10)
    publish(kv, force=True)


def _owner(path: str) -> int | None:
    """The process that chose a snapshot file of the private folder (``stats-<pid>/<name>``), else None."""
    folder = os.path.dirname(path)
    name = os.path.basename(folder)
    if os.path.dirname(folder) != str(private_folder_path()) or not name.startswith("stats-"):
        return None
    try:
        return int(name[len("stats-"):])
    except ValueError:
        return None


def attached():
    """The KV space of this process (the worker), or None."""
    return _attached


def publish(kv, force: bool = False) -> None:
    """Have ``kv``'s figures written soon (by the helper thread); at most every ``_MIN_INTERVAL_S``
    unless ``force``."""
    global _last_write
    path = settings.raw(ENV)  # checked at start-up (settings.check_all); read here on every step
    now = time.monotonic()
    if not path or (not force and now - _last_write < _MIN_INTERVAL_S):
        return
    _last_write = now
    _publisher.request(path, kv)


def process_memory() -> dict[str, int]:
    """This process's RSS in bytes and its start time (Linux ``/proc/self/statm`` and ``stat``; empty
    elsewhere), for the snapshot.

    RSS counts a page once per place it is mapped; it is not the KV memory itself
    (``resident_bytes``), but what ``ps``/``top`` and container dashboards show for the worker.
    ``statm`` is a counter read; the PSS (:func:`process_pss_bytes`) walks every page table of the
    process, ~15 ms for a SmolLM2 worker during which its memory mappings wait, so it is read only
    when ``/metrics`` is scraped, not with every snapshot (five a second while requests come and go:
    8% of a core, measured)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        rss = resident_pages * os.sysconf("SC_PAGE_SIZE")
        return {"process_rss_bytes": rss, "process_start": start_time(os.getpid())}
    except (OSError, ValueError, IndexError):
        return {}


def process_pss_bytes(snapshot: dict) -> int | None:
    """The PSS of the worker that wrote ``snapshot``, read now (``/proc/<pid>/smaps_rollup``: each page
    shared between processes divided among them); None when that process is gone (its pid reused by
    another counts as gone) or the file cannot be read."""
    pid, start = snapshot.get("pid"), snapshot.get("process_start")
    try:
        if start is None or not alive(pid or 0, start):
            return None
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def server_gone(path: str) -> bool:
    """Whether ``path`` is a server's own snapshot file (:func:`ensure_private_file`) and the server is
    gone or going (its folder removed): then nothing may be written that it would leave behind."""
    owner = _owner(path)
    return owner is not None and not (_alive(owner) and os.path.isdir(os.path.dirname(path)))


def write_snapshot_json(path: str, data: dict) -> None:
    """:func:`write_json_atomic`, where a server's own file whose folder went meanwhile (the server
    exited) is not an error: there is nothing to write to."""
    try:
        write_json_atomic(path, data)
    except FileNotFoundError:
        if _owner(path) is None:
            raise


def _write_snapshot(path: str, kv) -> None:
    if server_gone(path):
        return
    data = dataclasses.asdict(kv.stats()) | process_memory()
    data["pid"] = os.getpid()
    data["time"] = time.time()
    write_snapshot_json(path, data)


class Publisher:
    """One helper thread per process that writes the latest requested state of each file, at most one
    write every ``interval`` seconds (requests made meanwhile are written together, as the state after the
    last), off the compute cores: a step or forward pass only hands the request over.

    ``write(path, *args)`` writes; an exception it raises is logged, and publishing goes on.  VTENSOR's
    allocator figures and FlexInfer's streaming figures each have one."""

    def __init__(self, write, interval: float, name: str):
        self._write, self.interval, self._name = write, interval, name
        self._cond = threading.Condition()
        self._pending: dict[str, tuple] = {}  # path -> the latest arguments requested for it
        self._pid = None  # the process whose thread runs (a forked child starts its own)

    def request(self, path: str, *args) -> None:
        with self._cond:
            self._pending[path] = args
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
            self._cond.notify()

    def _run(self) -> None:
        move_to_helper_cores()
        last = float("-inf")
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            time.sleep(max(0.0, last + self.interval - time.monotonic()))  # requests coming meanwhile join it
            with self._cond:
                pending, self._pending = self._pending, {}
            last = time.monotonic()
            for path, args in pending.items():
                try:
                    self._write(path, *args)
                except Exception:  # figures are best effort; the engine goes on
                    get_logger(__name__).exception("%s: writing the figures to %s failed", self._name, path)


_publisher = Publisher(_write_snapshot, _FORCED_INTERVAL_S, "vtensor-stats")


def write_json_atomic(path: str, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON; readers never see a half-written file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # the pool's reaper thread publishes too
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # readable by its user only
        json.dump(data, f)
    os.replace(tmp, path)


def read() -> dict | None:
    path = settings.get(ENV)
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return None
