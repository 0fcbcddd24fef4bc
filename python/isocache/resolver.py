"""The resolver: decides each piece's path, REUSE / LOAD / COMPILE / FAILED.

It is the only code that sets a piece's `CompileEvent.path` (the report's
exit marks a piece whose block raised as FAILED; see `report.GraphReport.piece`):

- REUSE: the memory tier (this process) had a callable for the digest;
- LOAD: a byte tier (the local store, Redis, ...) had an artifact that loaded;
- COMPILE: no tier had it: Inductor compiled it here, and the chain published it;
- FAILED: the piece runs, but not as a shared compiled piece: it has no example
  inputs (eager), Inductor failed (plain Inductor, else eager), or the compiled
  piece cannot be serialized (kept in memory only).

`resolve_pieces` takes every piece of one split graph through the report's
exit: distinct pieces not in memory concurrently, one thread per compile
worker (plus this thread until a worker is warm), the rest in order.

Where values come from, leases and write-through are the chain's
(`tiers/chain.py`); talking to Inductor is `inductor.py`'s.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
import sys
import threading
import time
from typing import Any, Callable

import torch

from . import compile_workers
from ._once import warn_once
from ._torch import fx, inductor, inductor_dir
from .compile_workers import CompileWorkers, WorkerFailed
from .report import CompileEvent, GraphReport, Path, is_dynamo_restart
from .split import Piece, SplitGraph
from .tiers.base import Unloadable
from .tiers.chain import Chain, Found, Produced

__all__ = ["PieceFn", "Resolver", "resolve_pieces"]

logger = logging.getLogger("isocache")

PieceFn = Callable[..., Any]

#: Inductor's in-process state is not thread-safe: compiles and loads in this
#: process take turns (pieces resolved by threads waiting on compile workers).
_INDUCTOR_LOCK = threading.RLock()


class Resolver:
    """Resolves pieces of one namespace through its tier chain.

    Args:
        chain: the namespace's tiers (memory first).
        inductor_options: Inductor config patches for every compile.
    """

    def __init__(self, chain: Chain[PieceFn], inductor_options: dict[str, Any] | None = None) -> None:
        self.chain = chain
        self.inductor_options = dict(inductor_options or {})

    def __repr__(self) -> str:
        return f"Resolver({self.chain!r})"

    def resolve(self, piece: Piece, event: CompileEvent, workers: CompileWorkers | None = None) -> PieceFn:
        """The callable for `piece` (whose digest is `event.digest`), by the first path that works.

        With `workers`, a piece that must be compiled is compiled by one of
        them (in this process if they cannot).
        """
        inputs = inductor.fake_inputs(piece.module)
        if inputs is None:
            return self._failed(event, "the piece's inputs carry no example values; it runs eagerly", piece.module)
        # Asked only when a piece is loaded or compiled: a REUSE stays a lookup.
        returns_tuple = functools.partial(inductor.returns_tuple, piece.module)

        def produce() -> Produced[PieceFn]:
            if workers is not None:
                produced = self._compile_in_worker(workers, piece, returns_tuple())
                if produced is not None:
                    return produced
            return self._compile(piece, inputs, returns_tuple())

        outcome = self.chain.obtain(event.digest, load=_loader(returns_tuple), produce=produce, waits=event)
        return self._settle(event, outcome)

    def load(self, digest: str, returns_tuple: bool, event: CompileEvent) -> PieceFn | None:
        """REUSE or LOAD `digest`, never compiling: None (path FAILED) when no tier has it."""
        found = self.chain.find(digest, _loader(lambda: returns_tuple))
        if found is None:
            event.path = Path.FAILED
            event.reason = "no tier has it"
            return None
        return self._settle(event, found)

    # -- internals ----------------------------------------------------------------
    def _settle(self, event: CompileEvent, outcome: Found[PieceFn] | Produced[PieceFn]) -> PieceFn:
        if isinstance(outcome, Found):
            if outcome.reused:
                event.path = Path.REUSE
            else:
                event.path = Path.LOAD
                event.saved_seconds = outcome.compile_seconds
            return outcome.value
        if outcome.failure is not None:
            return self._failed(event, outcome.failure, outcome.value)
        event.path = Path.COMPILE
        return outcome.value

    @staticmethod
    def _failed(event: CompileEvent, reason: str, fn: PieceFn) -> PieceFn:
        event.path = Path.FAILED
        event.reason = reason
        warn_once(f"failed:{event.digest}", "isocache: piece %s: %s", event.digest[:16], reason)
        return fn

    def _compile_in_worker(
        self, workers: CompileWorkers, piece: Piece, returns_tuple: bool
    ) -> Produced[PieceFn] | None:
        """A compile worker's artifact, loaded here; None when the workers cannot compile it (compile here)."""
        try:
            blob = fx.pickle_graph(piece.module)
            result = workers.compile(blob, torch.is_grad_enabled(), self.inductor_options, inductor_dir.held())
            fn = _loader(lambda: returns_tuple)(result.payload)
        except WorkerFailed as e:
            if e.died:
                warn_once("worker-died", "isocache: %s; pieces it would have compiled are compiled here", e)
            else:
                logger.debug("isocache: a compile worker could not compile %s (%s); compiling here", piece.name, e)
            return None
        except Exception as e:  # a graph that does not pickle, an artifact that does not load (Unloadable)
            if is_dynamo_restart(e):
                raise
            logger.debug(
                "isocache: %s cannot go to a compile worker (%s: %s); compiling here", piece.name, type(e).__name__, e
            )
            return None
        logger.debug(
            "isocache: compile worker %d compiled %s in %.3f s", result.pid, piece.name, result.compile_seconds
        )
        return Produced(fn, result.payload if self.chain.stores else None, result.compile_seconds)

    def _compile(self, piece: Piece, inputs: list[Any], returns_tuple: bool) -> Produced[PieceFn]:
        """Compiles with Inductor; a piece Inductor cannot compile runs with plain Inductor, else eagerly."""
        with _INDUCTOR_LOCK:
            return self._compile_locked(piece, inputs, returns_tuple)

    def _compile_locked(self, piece: Piece, inputs: list[Any], returns_tuple: bool) -> Produced[PieceFn]:
        start = time.perf_counter()
        try:
            artifact = inductor.compile_piece(piece.module, inputs, self.inductor_options)
        except Exception as e:  # isocache never fails a user's compile
            if is_dynamo_restart(e):
                raise
            return _fallback(piece, inputs, f"Inductor could not compile it ({type(e).__name__}: {e})")
        compile_seconds = time.perf_counter() - start
        fn = inductor.piece_callable(artifact, returns_tuple)
        if not self.chain.stores:
            return Produced(fn, None, compile_seconds)  # nowhere to publish: no need to serialize
        try:
            payload = inductor.serialize(artifact)
        except inductor.Unsupported as e:
            # Compiled and used here, never published: said once per process, not per piece.
            warn_once(f"unsupported:{e.feature}", "isocache: %s; such pieces are compiled in each process", e)
            return Produced(fn, None, compile_seconds)
        except Exception as e:
            reason = f"the compiled piece cannot be serialized ({type(e).__name__}: {e}); it stays in memory"
            return Produced(fn, None, compile_seconds, failure=reason)
        return Produced(fn, payload, compile_seconds)


def _fallback(piece: Piece, inputs: list[Any], reason: str) -> Produced[PieceFn]:
    try:
        fn = inductor.plain_inductor(piece.module, inputs)
        return Produced(fn, None, 0.0, failure=f"{reason}; running it with plain Inductor")
    except Exception as e:
        if is_dynamo_restart(e):
            raise
        failure = f"{reason}; plain Inductor failed too ({type(e).__name__}), running it eagerly"
        return Produced(piece.module, None, 0.0, failure=failure)


def _loader(returns_tuple: Callable[[], bool]) -> Callable[[bytes], PieceFn]:
    """Bytes from a tier -> the piece's callable; `Unloadable` when they do not load here."""

    def load(payload: bytes) -> PieceFn:
        try:
            with _INDUCTOR_LOCK:
                artifact = inductor.deserialize(payload)
        except Exception as e:  # an artifact that does not load is a miss
            if is_dynamo_restart(e):
                raise
            raise Unloadable(f"{type(e).__name__}: {e}") from e
        return inductor.piece_callable(artifact, returns_tuple())

    return load


class _Progress:
    """A progress bar over distinct pieces compiled, only on a terminal."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if total <= 1 or not sys.stderr.isatty():
            return
        try:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("isocache: compiling pieces", total=total)
        except Exception:  # a progress bar must never break a compile
            self._bar = None

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def resolve_pieces(
    split: SplitGraph,
    digests: list[tuple[str, float]],
    report: GraphReport,
    resolver: Resolver,
    workers: compile_workers.CompileWorkers | None,
    unknown: int,
) -> None:
    """Resolves every compiled piece of `split` through `report`'s exit and installs its callable:
    distinct pieces not in memory concurrently when there are `workers`, the rest in order."""
    pieces = split.compiled_pieces
    progress = _Progress(unknown)

    def resolve(piece_index: int, use: compile_workers.CompileWorkers | None = None) -> None:
        piece, (digest, digest_seconds) = pieces[piece_index], digests[piece_index]
        with report.piece(piece_index) as event:
            event.digest = digest
            event.digest_seconds = digest_seconds
            fn = resolver.resolve(piece, event, use)
            if event.path is Path.COMPILE:
                progress.advance()
        split.install(piece, fn)

    try:
        done: set[int] = set()
        if workers is not None:
            first = {d: i for i, (d, _) in reversed(list(enumerate(digests)))}
            fresh = sorted(i for d, i in first.items() if not resolver.chain.memory.contains(d))
            _resolve_concurrently(fresh, resolve, workers)
            done.update(fresh)
        for piece_index in range(len(pieces)):
            if piece_index not in done:
                resolve(piece_index)
    finally:
        progress.close()


def _resolve_concurrently(
    indices: list[int],
    resolve: Callable[[int, compile_workers.CompileWorkers | None], None],
    workers: compile_workers.CompileWorkers,
) -> None:
    """Resolves the pieces at `indices`: a thread per compile worker, and this thread until a worker is warm.

    While the workers warm up, this thread compiles pieces itself; once one
    is warm, the rest go to workers (loading an artifact here is cheaper
    than compiling it here). Whatever a thread raises is raised here once
    every thread has stopped.
    """
    queue = collections.deque(indices)
    lock = threading.Lock()
    errors: list[BaseException] = []
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread; pieces compile in the graph's mode

    def next_index() -> int | None:
        with lock:
            return queue.popleft() if queue and not errors else None

    def drain(use: compile_workers.CompileWorkers | None, until: Callable[[], bool] = lambda: False) -> None:
        with torch.set_grad_enabled(grad_enabled):
            while not until() and (i := next_index()) is not None:
                try:
                    resolve(i, use)
                except BaseException as e:
                    with lock:
                        errors.append(e)
                    return

    # Threads still waiting for their worker's warm-up (not awaited once nothing is queued).
    waiting = set(range(workers.size))

    def worker_thread(worker_index: int) -> None:
        ready = workers.wait_ready(worker_index)
        with lock:
            waiting.discard(worker_index)
        if ready:
            drain(workers)

    threads = [
        threading.Thread(
            target=contextvars.copy_context().run,  # the counters' tallies and Dynamo's restart checks
            args=(worker_thread, k),
            name=f"isocache-resolve-{k}",
            daemon=True,
        )
        for k in range(workers.size)
    ]
    for t in threads:
        t.start()
    drain(None, until=workers.ready)
    # Once nothing is queued, a thread still waiting for its worker has nothing left to take: it ends
    # when the warm-up does, and this call does not wait for it (a first call waited seconds for a
    # warm-up that compiled nothing). A thread past its wait may hold a piece: it is awaited.
    with lock:
        busy = [t for k, t in enumerate(threads) if k not in waiting or queue]
    for t in busy:
        t.join()
    drain(None)  # whatever no worker could take (every worker failed its warm-up or died)
    if errors:
        raise errors[0]
