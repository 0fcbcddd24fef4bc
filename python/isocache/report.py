"""Compile events, per-graph summaries and the process counters.

Every piece ends in `GraphReport.piece()`'s exit, whatever path it took and
whether it returned or raised; that exit records the event, bumps the
counters and, after the last piece of a graph, logs the one summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import threading
import time
from typing import Any, Iterator

__all__ = [
    "Path",
    "CompileEvent",
    "GraphReport",
    "stats",
    "reset_stats",
    "record_model_load",
    "record_trace",
    "record_quarantined",
    "record_remote",
    "is_dynamo_restart",
]

logger = logging.getLogger("isocache")


class Path(str, enum.Enum):
    """How a piece got its callable."""

    COMPILE = "compile"
    LOAD = "load"
    REUSE = "reuse"
    FAILED = "failed"


@dataclasses.dataclass
class CompileEvent:
    graph_index: int
    num_graphs: int
    compile_range: str
    digest: str = ""
    path: Path = Path.FAILED
    seconds: float = 0.0
    wait_seconds: float = 0.0
    digest_seconds: float = 0.0
    reason: str | None = None
    #: For a LOAD: the compile seconds the stored artifact took (time saved).
    saved_seconds: float = 0.0
    #: Dynamo asked to trace the frame again; the piece is not counted.
    restarted: bool = False


_COUNTER_NAMES = (
    "graphs",
    "pieces",
    "compiled",
    "loaded",
    "reused",
    "failed",
    "quarantined",
    "remote_hits",
    "remote_misses",
    "remote_errors",
    "models_loaded",
)
_SECONDS_NAMES = ("compile_seconds", "load_seconds", "digest_seconds", "trace_seconds")
_PATH_COUNTER = {Path.COMPILE: "compiled", Path.LOAD: "loaded", Path.REUSE: "reused", Path.FAILED: "failed"}

_lock = threading.Lock()
_counters: dict[str, float] = {}


def reset_stats() -> None:
    """Sets every counter of this process back to zero."""
    with _lock:
        _counters.clear()
        _counters.update({k: 0 for k in _COUNTER_NAMES})
        _counters.update({k: 0.0 for k in _SECONDS_NAMES})


reset_stats()


def stats() -> dict[str, Any]:
    """The counters of this process (integers for counts, floats for seconds)."""
    with _lock:
        out: dict[str, Any] = {k: int(_counters[k]) for k in _COUNTER_NAMES}
        out.update({k: float(_counters[k]) for k in _SECONDS_NAMES})
    return out


def _bump(**deltas: float) -> None:
    with _lock:
        for k, v in deltas.items():
            _counters[k] = _counters.get(k, 0) + v


def record_quarantined(count: int) -> None:
    """Bad artifacts found (and moved to quarantine) by this process."""
    _bump(quarantined=count)


def record_remote(hits: int = 0, misses: int = 0, errors: int = 0) -> None:
    """Lookups of the Redis tier by this process."""
    _bump(remote_hits=hits, remote_misses=misses, remote_errors=errors)


def record_model_load() -> None:
    """A saved compiled model was loaded without tracing."""
    _bump(models_loaded=1)


def record_trace(seconds: float) -> None:
    """Seconds spent tracing a model ahead of time (isocache.compile's first run)."""
    _bump(trace_seconds=seconds)


def is_dynamo_restart(e: BaseException) -> bool:
    """Dynamo asks to trace the frame again (for example to specialize float inputs)."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, RestartAnalysis)


class GraphReport:
    """Collects the events of one Dynamo graph and emits its summary."""

    def __init__(self, num_graphs: int, compile_range: str, model_name: str | None = None) -> None:
        self.num_graphs = num_graphs
        self.compile_range = compile_range
        #: Set when a saved compiled model loads: its summary says tracing was skipped.
        self.model_name = model_name
        self.events: list[CompileEvent] = []
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def piece(self, graph_index: int) -> Iterator[CompileEvent]:
        """The one exit of a piece: yields its event; records it however the block ends."""
        event = CompileEvent(graph_index, self.num_graphs, self.compile_range)
        start = time.perf_counter()
        try:
            yield event
        except BaseException as e:
            event.path = Path.FAILED
            event.reason = event.reason or f"{type(e).__name__}: {e}"
            event.restarted = is_dynamo_restart(e)
            raise
        finally:
            event.seconds = time.perf_counter() - start
            self._finish(event)

    def _finish(self, event: CompileEvent) -> None:
        if event.restarted:
            logger.debug(
                "isocache: piece %d/%d: Dynamo restarts the analysis of this frame (%s)",
                event.graph_index + 1,
                event.num_graphs,
                event.reason,
            )
            return
        deltas: dict[str, float] = {"pieces": 1, _PATH_COUNTER[event.path]: 1, "digest_seconds": event.digest_seconds}
        if event.path is Path.COMPILE:
            deltas["compile_seconds"] = event.seconds
        elif event.path is Path.LOAD:
            deltas["load_seconds"] = event.seconds
        with self._lock:
            self.events.append(event)
            last = len(self.events) == self.num_graphs
        if last:
            deltas["graphs"] = 1
        _bump(**deltas)
        logger.debug(
            "isocache: piece %d/%d %s %s in %.3f s%s%s",
            event.graph_index + 1,
            event.num_graphs,
            event.path.value,
            event.digest[:16],
            event.seconds,
            f" (waited {event.wait_seconds:.3f} s)" if event.wait_seconds else "",
            f": {event.reason}" if event.reason else "",
        )
        if last:
            logger.info(self.summary())

    def count(self, path: Path) -> int:
        return sum(1 for e in self.events if e.path is path)

    def summary(self) -> str:
        compiled, loaded = self.count(Path.COMPILE), self.count(Path.LOAD)
        reused, failed = self.count(Path.REUSE), self.count(Path.FAILED)
        failed_text = f", {failed} failed" if failed else ""
        elapsed = time.perf_counter() - self.started
        if self.model_name is not None:
            return (
                f"isocache: loaded compiled model {self.model_name}: {self.num_graphs} graphs "
                f"({loaded} loaded, {reused} reused{failed_text}) in {elapsed:.3f} s, tracing skipped"
            )
        return (
            f"isocache: compile range {self.compile_range}: {self.num_graphs} graphs "
            f"({compiled} compiled, {loaded} loaded, {reused} reused{failed_text}) "
            f"in {elapsed:.3f} s"
        )
