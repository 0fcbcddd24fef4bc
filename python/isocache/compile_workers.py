"""Compile workers: processes that pay Inductor's fixed cost while this process traces, then compile pieces.

A process's first Inductor compile pays a fixed cost (imports, the vector-ISA
probe, a precompiled header: seconds) before any piece. Threads cannot hide
it: tracing and compiling both hold the GIL. Workers are separate processes
(`_compile_worker.main`), started as early as isocache knows a model will be
compiled (`isocache.compile` before it traces, `isocache.prewarm`, at the
latest the first compile that may compile), each warming up with one tiny compile; then
each compiles one piece at a time and hands back the artifact's bytes, which
this process loads and publishes under its own leases (the resolver's COMPILE
path). Distinct pieces of a graph compile concurrently, one per worker.

Workers are one pool per process and device. A worker that fails a piece or
dies costs that piece nothing but time: it is compiled in this process, as
without workers. Workers read their requests from a pipe and exit when it
closes, so they never outlive this process.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

import torch

from . import config
from ._compile_worker import read_frame, write_frame
from ._once import info_once
from ._torch import inductor

__all__ = ["CompileWorkers", "WorkerFailed", "WorkerResult", "default_count", "pool", "prewarm", "shutdown"]

logger = logging.getLogger("isocache")


class WorkerFailed(Exception):
    """A worker could not compile a piece (it failed, or died): compile it in this process."""

    def __init__(self, message: str, *, died: bool = False) -> None:
        super().__init__(message)
        #: The worker process is gone (said once per process: pieces compile here from now on).
        self.died = died


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    payload: bytes
    #: Seconds the worker spent compiling and serializing.
    compile_seconds: float
    #: The worker's process id.
    pid: int
    #: `time.monotonic()` when the request was sent and when the reply came.
    sent: float
    received: float


def default_count() -> int:
    """Workers when ``ISOCACHE_COMPILE_WORKERS`` is unset: one per core but this process's, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


#: The worker's first lines: this process's import path (the same isocache, and whatever
#: modules the graphs name), then `_compile_worker.main`. It inherits the environment,
#: Inductor's cache directory included.
_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv.pop(1)); "
    "from isocache._compile_worker import main; sys.exit(main())"
)


class _Worker:
    """One worker process and its two pipes; used by one thread at a time."""

    def __init__(self, device: str) -> None:
        read_fd, write_fd = os.pipe()
        path = json.dumps([p for p in sys.path if p])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, path, device, "--reply-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        self.requests: BinaryIO = self.proc.stdin  # type: ignore[assignment]
        self.replies: BinaryIO = os.fdopen(read_fd, "rb")
        self.started = time.perf_counter()
        #: Set once the worker answered its warm-up (ready or not); `alive` says which.
        self.warm = threading.Event()
        self.alive = True
        self.lock = threading.Lock()
        # Reads the warm-up's answer as soon as it comes, so `CompileWorkers.ready` knows.
        threading.Thread(target=self.wait_ready, name="isocache-worker-warm-up", daemon=True).start()

    def wait_ready(self) -> bool:
        """Blocks until the warm-up is over; True when the worker can compile."""
        with self.lock:
            if not self.warm.is_set():
                try:
                    kind, _, _ = read_frame(self.replies)
                    self.alive = kind == "ready"
                except (EOFError, OSError):
                    self.alive = False
                self.warm.set()
                logger.debug(
                    "isocache: compile worker %d %s after %.2f s",
                    self.proc.pid,
                    "ready" if self.alive else "failed its warm-up",
                    time.perf_counter() - self.started,
                )
        return self.alive

    def compile(
        self, blob: bytes, grad_enabled: bool, options: dict[str, Any], where: tuple[str, int, int] | None
    ) -> WorkerResult:
        if not self.wait_ready():
            raise WorkerFailed("the compile worker failed to start")
        with self.lock:
            sent = time.monotonic()
            try:
                write_frame(self.requests, (blob, grad_enabled, options, where))
                kind, value, seconds = read_frame(self.replies)
            except (EOFError, OSError) as e:
                self.alive = False
                try:
                    code = self.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    code = None
                raise WorkerFailed(f"compile worker {self.proc.pid} died (exit code {code})", died=True) from e
        if kind != "ok":
            raise WorkerFailed(str(value))
        return WorkerResult(value, seconds, self.proc.pid, sent, time.monotonic())

    def close(self) -> None:
        self.alive = False
        for stream in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                stream.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class CompileWorkers:
    """A pool of compile workers for one device.

    Args:
        count: worker processes (each compiles one piece at a time).
        device: ``"cpu"`` or ``"cuda"``: the device of the warm-up compile.
    """

    def __init__(self, count: int, device: str) -> None:
        self.device = device
        self._workers = [_Worker(device) for _ in range(count)]
        self._idle: list[_Worker] = list(self._workers)
        self._cond = threading.Condition()
        #: The latest results (pids, times), for debugging and tests.
        self.history: collections.deque[WorkerResult] = collections.deque(maxlen=256)

    def __len__(self) -> int:
        return sum(1 for w in self._workers if w.alive)

    @property
    def size(self) -> int:
        """Workers started (alive or not)."""
        return len(self._workers)

    def grow(self, count: int) -> None:
        """Starts workers until `count` were started (a backend asked for more than the pool has)."""
        with self._cond:
            while len(self._workers) < count:
                worker = _Worker(self.device)
                self._workers.append(worker)
                self._idle.append(worker)
            self._cond.notify_all()

    def wait_ready(self, index: int) -> bool:
        """Blocks until worker `index` has warmed up; True when it can compile."""
        return self._workers[index].wait_ready()

    def ready(self) -> bool:
        """Whether some worker has finished warming up and can compile now."""
        return any(w.warm.is_set() and w.alive for w in self._workers)

    def compile(
        self,
        blob: bytes,
        grad_enabled: bool,
        options: dict[str, Any],
        inductor_dir: tuple[str, int, int] | None = None,
    ) -> WorkerResult:
        """Compiles a pickled piece on the next free worker; raises `WorkerFailed` when none can.

        `inductor_dir`: the parent's checked Inductor directory, (path, st_dev, st_ino); the
        worker compiles there only while the path still names that directory."""
        worker = self._take()
        try:
            result = worker.compile(blob, grad_enabled, options, inductor_dir)
        finally:
            self._give_back(worker)
        self.history.append(result)
        return result

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _take(self) -> _Worker:
        with self._cond:
            while True:
                if not any(w.alive for w in self._workers):
                    raise WorkerFailed("no compile worker is alive", died=True)
                if self._idle:
                    return self._idle.pop(0)
                self._cond.wait()

    def _give_back(self, worker: _Worker) -> None:
        with self._cond:
            if worker.alive:
                self._idle.append(worker)
            else:
                worker.close()
            self._cond.notify_all()

    def close(self) -> None:
        for w in self._workers:
            w.close()
        with self._cond:
            self._idle.clear()
            self._cond.notify_all()


_pools: dict[str, CompileWorkers] = {}
_pools_lock = threading.Lock()


def pool(device: str, count: int | None = None) -> CompileWorkers | None:
    """This process's workers for `device` (started now if need be), or None when workers are off.

    One pool per device type per process (see `process.py`), as large as the largest `count` asked
    for; `count` (a backend's ``compile_workers``) overrides ``ISOCACHE_COMPILE_WORKERS``.
    """
    wanted = config.current().compile_workers if count is None else count
    if wanted is None:
        wanted = default_count()
    wanted = config.clamp("compile_workers", wanted, 0, config.max_compile_workers(), 0)
    if wanted <= 0 or config.current().disable:
        return None
    if not inductor.workers_supported():
        info_once(
            "workers-torch",
            "isocache: compile workers need torch >= %d.%d (this is %s); pieces compile in this process",
            *inductor.WORKERS_SINCE,
            torch.__version__,
        )
        return None
    device = device.split(":")[0]
    with _pools_lock:
        existing = _pools.get(device)
        if existing is not None:
            try:
                existing.grow(wanted)
            except OSError as e:
                logger.warning("isocache: more compile workers could not start (%s)", e)
            return existing if len(existing) else None
        try:
            started = CompileWorkers(wanted, device)
        except OSError as e:
            logger.warning("isocache: compile workers could not start (%s); compiling in this process", e)
            return None
        _pools[device] = started
        if len(_pools) == 1:
            atexit.register(shutdown)
        logger.debug("isocache: started %d compile worker(s) for %s", wanted, device)
        return started


def prewarm(device: str | None = None) -> None:
    """Starts the compile workers now, so Inductor's fixed cost is paid while this process does other work.

    Call it as early as you know a model will be compiled (before loading
    weights, say): the workers import torch and warm Inductor up in the
    background. `device` defaults to ``"cuda"`` when available, else ``"cpu"``.
    Does nothing when workers are off (``ISOCACHE_COMPILE_WORKERS=0``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pool(device)


def shutdown() -> None:
    """Stops every compile worker of this process (also done at exit)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()
