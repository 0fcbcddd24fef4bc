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

Workers cost memory (a whole interpreter with torch and Inductor) and, while
they warm up, CPU; so they live only while they may be useful:

- **One set per machine.** A pool takes a slot for each worker, a file lock
  (``compile-worker-<i>.lock`` in Inductor's private directory) that the
  kernel frees when the process ends. Processes that start together find the
  slots taken and compile their pieces (those they hold a lease for) in their
  own process: P processes start at most as many workers as one, and no more
  than ``ISOCACHE_COMPILE_WORKERS``.
- **Gone when idle.** A user of the pool `claim`s it (tracing while workers
  warm up, a graph's pieces); when the last claim ends, workers still warming
  up stop at once (they would only compete with the model) and the others exit
  after ``ISOCACHE_WORKER_IDLE`` seconds with nothing queued (5 s by default);
  a later compile starts a fresh pool. A pool nobody claims (`prewarm`) waits
  `UNCLAIMED_SECONDS` for its first claim.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import torch

from . import config, process
from ._compile_worker import read_frame, write_frame
from ._once import info_once
from ._torch import inductor, inductor_dir
from .report import counters

__all__ = ["CompileWorkers", "WorkerFailed", "WorkerResult", "default_count", "pool", "prewarm", "shutdown"]

logger = logging.getLogger("isocache")

#: How long a pool waits for its first claim (`prewarm` starts workers ahead of any compile).
UNCLAIMED_SECONDS = 120.0


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
        counters.bump(workers_started=1)
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
        """Ends the worker: an idle one exits when its request pipe closes; one still warming up
        (its reply pipe being read) is terminated first, so closing the pipe never waits on a read."""
        self.alive = False
        if not self.warm.is_set() and self.proc.poll() is None:
            self.proc.terminate()
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

    def __init__(self, count: int, device: str, idle_seconds: float = 5.0, slots: list[int] | None = None) -> None:
        self.device = device
        self.idle_seconds = idle_seconds
        #: Descriptors of the machine-wide slots this pool holds (one per worker; see the module).
        self._slots = list(slots or [])
        self._workers = [_Worker(device) for _ in range(count)]
        self._idle: list[_Worker] = list(self._workers)
        self._cond = threading.Condition()
        self._claims = 0
        #: `time.monotonic()` after which an unclaimed pool closes.
        self._expires = time.monotonic() + max(idle_seconds, UNCLAIMED_SECONDS)
        self.closed = False
        self._arm(max(idle_seconds, UNCLAIMED_SECONDS))
        #: The latest results (pids, times), for debugging and tests.
        self.history: collections.deque[WorkerResult] = collections.deque(maxlen=256)

    def __len__(self) -> int:
        return sum(1 for w in self._workers if w.alive)

    @property
    def size(self) -> int:
        """Workers started (alive or not)."""
        return len(self._workers)

    def grow(self, count: int) -> None:
        """Starts workers until `count` were started (a backend asked for more than the pool has), as
        far as machine-wide slots are free."""
        with self._cond:
            if len(self._workers) < count:
                self._slots += _take_slots(count, skip=len(self._slots))
            while len(self._workers) < min(count, len(self._slots)):
                worker = _Worker(self.device)
                self._workers.append(worker)
                self._idle.append(worker)
            self._expires = max(self._expires, time.monotonic() + self.idle_seconds)
            self._cond.notify_all()

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """Keeps the workers while the block runs (see the module); when the last claim ends, workers
        still warming up stop, and the rest exit after `idle_seconds` unless claimed again."""
        with self._cond:
            self._claims += 1
        try:
            yield
        finally:
            with self._cond:
                self._claims -= 1
                last = self._claims == 0 and not self.closed
                if last:
                    self._expires = time.monotonic() + self.idle_seconds
                    warming = [w for w in self._workers if not w.warm.is_set()]
                    for w in warming:
                        self._workers.remove(w)
                        if w in self._idle:
                            self._idle.remove(w)
                    self._cond.notify_all()
            if last:
                for w in warming:
                    w.close()
                if warming:
                    logger.debug(
                        "isocache: stopped %d compile worker(s) still warming up: nothing is queued", len(warming)
                    )
                self._arm(self.idle_seconds)

    def _arm(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._close_if_idle)
        timer.daemon = True
        timer.start()

    def _close_if_idle(self) -> None:
        with self._cond:
            if self.closed or self._claims or time.monotonic() < self._expires:
                return
        logger.debug("isocache: compile workers for %s idle for %.1f s: stopping them", self.device, self.idle_seconds)
        _forget(self)
        self.close()

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
        with self._cond:
            self.closed = True
            workers = list(self._workers)  # kept: `pids` names every worker this pool started
            self._idle.clear()
            slots, self._slots = self._slots, []
            self._cond.notify_all()
        for w in workers:
            w.close()
        for fd in slots:  # after the workers: a slot is free once its worker is gone
            if fd >= 0:
                os.close(fd)


def _take_slots(count: int, skip: int = 0) -> list[int]:
    """Free machine-wide slots, as many as bring this pool's ``skip`` to `count`: file locks
    ``compile-worker-0.lock`` .. ``compile-worker-<count - 1>.lock`` in Inductor's private directory,
    freed by the kernel when their holder exits. A slot of -1: no lock could be made (unlimited)."""
    taken: list[int] = []
    for i in range(count):
        if len(taken) + skip >= count:
            break
        fd = inductor_dir.open_file(f"compile-worker-{i}.lock")
        if fd is None:
            taken.append(-1)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another process, or by this pool (another open file)
            os.close(fd)
            continue
        taken.append(fd)
    return taken


_pools: dict[str, CompileWorkers] = {}
_pools_lock = threading.Lock()
_exit_registered = False


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
    process.ensure_private_inductor_dir()  # the workers inherit it; their slots are there
    with _pools_lock:
        existing = _pools.get(device)
        if existing is not None and not existing.closed:
            try:
                existing.grow(wanted)
            except OSError as e:
                logger.warning("isocache: more compile workers could not start (%s)", e)
            return existing if len(existing) else None
        slots = _take_slots(wanted)
        if not slots:
            info_once(
                "workers-busy",
                "isocache: another process on this machine holds the compile workers (%d); "
                "pieces this process compiles are compiled in it",
                wanted,
            )
            return None
        try:
            started = CompileWorkers(len(slots), device, config.current().worker_idle, slots)
        except OSError as e:
            for fd in slots:
                if fd >= 0:
                    os.close(fd)
            logger.warning("isocache: compile workers could not start (%s); compiling in this process", e)
            return None
        _pools[device] = started
        global _exit_registered
        if not _exit_registered:
            atexit.register(shutdown)
            _exit_registered = True
        logger.debug("isocache: started %d compile worker(s) for %s", len(slots), device)
        return started


def _forget(workers: CompileWorkers) -> None:
    """Drops a pool that is closing from this process's pools (the next `pool` starts a fresh one)."""
    with _pools_lock:
        if _pools.get(workers.device) is workers:
            del _pools[workers.device]


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
