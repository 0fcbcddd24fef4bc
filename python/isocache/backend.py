"""The isocache backend: split, then REUSE / LOAD / COMPILE each piece.

    torch.compile(model, backend="isocache")          # registered entry point
    torch.compile(model, backend=isocache.Backend(cache_dir="/fast/disk"))

For every piece between splitting ops the backend computes the canonical
digest (Rust) and takes the first path that works:

- REUSE: this process already holds a callable for the digest;
- LOAD: the store holds an artifact (another process or an earlier run);
- COMPILE: Inductor compiles it once, and the artifact is published.

Whatever happens, the piece ends in `GraphReport.piece`'s exit (report.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

from . import _core, config, inductor
from ._maintenance import gc_root, total_bytes
from ._namespace import graph_device, namespace_for_device
from .digest import digest_with_reason
from .remote import RedisTier, RemoteLease, redis_tier
from .report import CompileEvent, GraphReport, Path, is_dynamo_restart, record_quarantined, record_remote
from .split import Piece, normalize_splitting_ops, split_graph

__all__ = ["Backend", "isocache_backend", "compile_range", "process_index"]

logger = logging.getLogger("isocache")

#: One index per process: compiled pieces outlive `torch._dynamo.reset()`.
_INDEX = _core.Index()
_warned: set[str] = set()
_warned_lock = threading.Lock()


def process_index() -> _core.Index:
    """The process-wide index of compiled pieces (digest -> callable)."""
    return _INDEX


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message, *args)


def _symbol_range(sym: Any, shape_env: Any) -> str:
    vr = shape_env.var_to_range.get(sym) if shape_env is not None else None
    if vr is None:
        return "[?, ?]"

    def show(bound: Any) -> str:
        text = str(bound)
        return "inf" if text in ("oo", "int_oo") else text

    return f"[{show(vr.lower)}, {show(vr.upper)}]"


def compile_range(example_inputs: Sequence[Any]) -> str:
    """`[lo, hi]` per symbolic size (in order of first use), else the static input shape."""
    seen: dict[str, str] = {}
    first_shape: tuple[int, ...] | None = None

    def visit(value: Any) -> None:
        if isinstance(value, torch.SymInt):
            node = value.node
            for sym in sorted(node.expr.free_symbols, key=str):
                if str(sym) not in seen:
                    seen[str(sym)] = _symbol_range(sym, getattr(node, "shape_env", None))

    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            for s in value.shape:
                visit(s)
            if first_shape is None and not isinstance(value, torch.nn.Parameter):
                if all(isinstance(s, int) for s in value.shape):
                    first_shape = tuple(int(s) for s in value.shape)
        else:
            visit(value)
    if seen:
        return " x ".join(seen.values())
    if first_shape is not None:
        return "(" + ", ".join(map(str, first_shape)) + ")"
    return "static"


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
        except Exception:  # noqa: BLE001 - a progress bar must never break a compile
            self._bar = None

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Backend:
    """A configured isocache backend, usable as ``torch.compile(..., backend=Backend())``.

    Args:
        cache_dir: root of the artifact store (default ``$ISOCACHE_DIR`` or
            ``~/.cache/isocache``). ``False`` keeps compiled pieces in memory only.
        splitting_ops: ops that cut the graph, as canonical names
            (``"aten::scaled_dot_product_attention"``), op overloads or
            functions. Default: the scaled-dot-product attention ops.
        inductor_options: Inductor config patches for every compile; they are
            part of the namespace, so differently configured pieces never mix.
        redis_url: a Redis server shared by a fleet (default ``$ISOCACHE_REDIS_URL``),
            the tier between the local store and compiling.
        wait_timeout: seconds to wait for another thread, process or machine
            compiling the same piece before compiling it here (default
            ``$ISOCACHE_WAIT_TIMEOUT`` or 600).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        splitting_ops: Iterable[object] | None = None,
        inductor_options: dict[str, Any] | None = None,
        *,
        redis_url: str | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.redis_url = redis_url
        self.splitting_ops = normalize_splitting_ops(splitting_ops)
        self.inductor_options = dict(inductor_options or {})
        self._wait_timeout = wait_timeout
        self._stores: dict[tuple[str, str], _core.Store | None] = {}
        self._stores_lock = threading.Lock()
        self._options_fingerprint = repr(sorted(self.inductor_options.items()))

    def __repr__(self) -> str:
        return (
            f"Backend(cache_dir={self.cache_dir!r}, splitting_ops={sorted(self.splitting_ops)!r}, "
            f"inductor_options={self.inductor_options!r})"
        )

    @property
    def wait_timeout(self) -> float:
        return self._wait_timeout if self._wait_timeout is not None else config.current().wait_timeout

    # -- the store ----------------------------------------------------------
    def _root(self) -> str | None:
        if self.cache_dir is False:
            return None
        if self.cache_dir is not None and self.cache_dir is not True:
            return os.path.abspath(os.fspath(self.cache_dir))
        root = config.current().dir
        return None if root is None else str(root)

    def store(self, namespace: str) -> _core.Store | None:
        """The store for `namespace`, or None when none can be used (warned once)."""
        root = self._root()
        if root is None:
            return None
        key = (root, namespace)
        with self._stores_lock:
            if key in self._stores:
                return self._stores[key]
            try:
                store: _core.Store | None = _core.Store(root, namespace, config.current().key)
            except _core.CacheError as e:
                _warn_once(
                    f"store:{root}",
                    "isocache: working without a persistent store: %s",
                    e,
                )
                store = None
            self._stores[key] = store
            return store

    def tiers(self, namespace: str) -> _Tiers:
        """Where pieces of `namespace` come from besides memory: local store, Redis."""
        # Every path that compiles or loads comes through here: before either,
        # Inductor must write the code it runs where nobody else can.
        _ensure_private_inductor_dir(self._root())
        return _Tiers(self.store(namespace), redis_tier(self.redis_url, namespace, config.current().key))

    # -- the backend --------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        if config.current().disable:
            return inductor.plain_inductor(gm, example_inputs)
        split = split_graph(gm, self.splitting_ops)
        pieces = split.compiled_pieces
        report = GraphReport(len(pieces), compile_range(example_inputs))
        # Grad mode decides whether AOTAutograd builds an inference or a
        # training artifact, so it separates namespaces.
        namespace = namespace_for_device(
            graph_device(gm, example_inputs),
            extra=f"{self._options_fingerprint};grad={torch.is_grad_enabled()}",
        )
        tiers = self.tiers(namespace)
        remote_before = tiers.remote_counts()

        digests: list[tuple[str, float]] = []
        for piece in pieces:
            start = time.perf_counter()
            digest, _ = digest_with_reason(piece.module, None, namespace)
            digests.append((digest, time.perf_counter() - start))
        to_compile = {d for d, _ in digests if _INDEX.get(d) is None and not _has(tiers.store, d)}
        progress = _Progress(len(to_compile))
        try:
            for graph_index, (piece, (digest, digest_seconds)) in enumerate(zip(pieces, digests)):
                with report.piece(graph_index) as event:
                    event.digest = digest
                    event.digest_seconds = digest_seconds
                    fn = self._piece_callable(piece, event, tiers)
                    if event.path is Path.COMPILE:
                        progress.advance()
                _install(split.graph, piece, fn)
        finally:
            progress.close()
            self._record_usage(tiers, report, remote_before)
        for piece in split.pieces:
            if piece.is_splitting_op:
                # Call the splitting op's code directly: nn.Module.__call__'s
                # hook handling costs microseconds per layer at every forward.
                _install(split.graph, piece, piece.module.forward)
        if not pieces:
            logger.info(report.summary())
        # What isocache.compile serializes: the digest of each compiled piece.
        split.graph.__dict__["_isocache_pieces"] = {
            "namespace": namespace,
            "pieces": [(p.name, d) for p, (d, _) in zip(pieces, digests)],
        }
        return split.graph

    @staticmethod
    def _record_usage(tiers: _Tiers, report: GraphReport, remote_before: tuple[int, int, int]) -> None:
        remote = tuple(after - before for after, before in zip(tiers.remote_counts(), remote_before))
        record_remote(*remote)
        hits, misses = report.count(Path.LOAD), report.count(Path.COMPILE)
        if tiers.store is None or not (hits or misses or any(remote)):
            return
        saved = sum(e.saved_seconds for e in report.events if e.path is Path.LOAD)
        try:
            tiers.store.record_usage(
                hits=hits,
                misses=misses,
                saved_seconds=saved,
                remote_hits=remote[0],
                remote_misses=remote[1],
                remote_errors=remote[2],
            )
        except _core.CacheError as e:
            logger.debug("isocache: could not update the store's counters: %s", e)

    def _piece_callable(self, piece: Piece, event: CompileEvent, tiers: _Tiers) -> Callable[..., Any]:
        digest = event.digest
        inputs = inductor.fake_inputs(piece.module)
        if inputs is None:
            event.path = Path.FAILED
            event.reason = "the piece's inputs carry no example values; it runs eagerly"
            _warn_once(f"failed:{digest}", "isocache: piece %s: %s", digest[:16], event.reason)
            return piece.module
        deadline = time.perf_counter() + self.wait_timeout
        while True:
            reused = _reuse(event)
            if reused is not None:
                return reused
            if _INDEX.claim(digest):
                break
            # Another thread is producing it: wait, then reuse (or take over).
            start = time.perf_counter()
            _INDEX.wait(digest, max(0.0, deadline - start))
            event.wait_seconds += time.perf_counter() - start
            if time.perf_counter() >= deadline:
                event.reason = f"waited {self.wait_timeout:.0f} s for another thread; compiling here"
                break
        start = time.perf_counter()
        try:
            fn = self._load_or_compile(piece, inputs, event, tiers)
        except BaseException:
            _INDEX.abandon(digest)
            raise
        _INDEX.publish(digest, fn, time.perf_counter() - start)
        return fn

    def load_piece(
        self, digest: str, returns_tuple: bool, event: CompileEvent, tiers: _Tiers
    ) -> Callable[..., Any] | None:
        """REUSE or LOAD a piece by digest, never compiling: None when no tier has it."""
        reused = _reuse(event)
        if reused is not None:
            return reused
        found = None if tiers.store is None else lookup_counted(tiers.store, digest)
        if found is None and tiers.remote is not None:
            found = tiers.remote.fetch(digest)
            if found is not None and tiers.store is not None:
                self._put_local(tiers.store, digest, *found)
        fn = None if found is None else self._from_payload(returns_tuple, event, *found)
        if fn is not None:
            _INDEX.publish(digest, fn, event.saved_seconds)
        return fn

    def _load_or_compile(
        self,
        piece: Piece,
        inputs: list[Any],
        event: CompileEvent,
        tiers: _Tiers,
    ) -> Callable[..., Any]:
        """Local store, then Redis, then COMPILE, each compile under the digest's leases.

        The local lease makes one process per machine compile; the Redis lease
        one machine per fleet. Waiters load what the holder published.
        """
        store = tiers.store
        if store is not None:
            loaded = self._load_local(piece, event, store)
            if loaded is not None:
                return loaded
        lease = None if store is None else _take_lease(store, event.digest, 0.0)
        if store is not None and lease is None:
            # Another process on this machine is compiling it: wait, then load.
            start = time.perf_counter()
            lease = _take_lease(store, event.digest, self.wait_timeout)
            event.wait_seconds += time.perf_counter() - start
            if lease is None:
                event.reason = f"waited {self.wait_timeout:.0f} s for another process; compiling here"
        try:
            # The holder may have published while we looked or waited.
            if store is not None:
                loaded = self._load_local(piece, event, store)
                if loaded is not None:
                    return loaded
            if tiers.remote is None:
                return self._compile(piece, inputs, event, tiers)
            return self._load_remote_or_compile(piece, inputs, event, tiers, tiers.remote)
        finally:
            if lease is not None:
                lease.release()

    def _load_remote_or_compile(
        self,
        piece: Piece,
        inputs: list[Any],
        event: CompileEvent,
        tiers: _Tiers,
        remote: RedisTier,
    ) -> Callable[..., Any]:
        found = remote.fetch(event.digest)
        if found is not None:
            return self._from_remote(piece, inputs, event, tiers, found)
        remote_lease = remote.try_lease(event.digest)
        if remote_lease is None:
            # Another machine is compiling it: wait (bounded), then load or take over.
            start = time.perf_counter()
            got = remote.wait_for(event.digest, self.wait_timeout)
            event.wait_seconds += time.perf_counter() - start
            if isinstance(got, tuple):
                return self._from_remote(piece, inputs, event, tiers, got)
            remote_lease = got
        try:
            return self._compile(piece, inputs, event, tiers)
        finally:
            if isinstance(remote_lease, RemoteLease):
                remote_lease.release()

    def _from_remote(
        self,
        piece: Piece,
        inputs: list[Any],
        event: CompileEvent,
        tiers: _Tiers,
        found: tuple[bytes, float],
    ) -> Callable[..., Any]:
        payload, compile_seconds = found
        fn = self._from_payload(inductor.returns_tuple(piece.module), event, payload, compile_seconds)
        if fn is None:
            return self._compile(piece, inputs, event, tiers)
        if tiers.store is not None:
            try:  # write through, so the next process on this machine loads locally
                tiers.store.put(event.digest, payload, compile_seconds)
            except _core.CacheError as e:
                _warn_once(f"put:{tiers.store.root}", "isocache: the store could not be written (%s)", e)
        return fn

    def _load_local(self, piece: Piece, event: CompileEvent, store: _core.Store) -> Callable[..., Any] | None:
        found = lookup_counted(store, event.digest)
        if found is None:
            return None
        fn = self._from_payload(inductor.returns_tuple(piece.module), event, *found)
        if fn is None:
            with contextlib.suppress(_core.CacheError):
                store.remove(event.digest)
        return fn

    def _from_payload(
        self, returns_tuple: bool, event: CompileEvent, payload: bytes, compile_seconds: float
    ) -> Callable[..., Any] | None:
        try:
            artifact = inductor.deserialize(payload)
        except Exception as e:  # noqa: BLE001 - an artifact that does not load is a miss
            if is_dynamo_restart(e):
                raise
            _warn_once(
                f"load:{event.digest}",
                "isocache: could not load artifact %s (%s: %s); compiling it again",
                event.digest[:16],
                type(e).__name__,
                e,
            )
            return None
        event.path = Path.LOAD
        event.saved_seconds = compile_seconds
        return inductor.piece_callable(artifact, returns_tuple)

    def _compile(
        self,
        piece: Piece,
        inputs: list[Any],
        event: CompileEvent,
        tiers: _Tiers,
    ) -> Callable[..., Any]:
        digest = event.digest
        start = time.perf_counter()
        try:
            artifact = inductor.compile_piece(piece.module, inputs, self.inductor_options)
        except Exception as e:  # noqa: BLE001 - isocache never fails a user's compile
            if is_dynamo_restart(e):
                raise
            return self._failed(piece, inputs, event, f"Inductor could not compile it ({type(e).__name__}: {e})")
        compile_seconds = time.perf_counter() - start
        fn = inductor.piece_callable(artifact, inductor.returns_tuple(piece.module))
        event.path = Path.COMPILE
        if tiers.store is None and tiers.remote is None:
            return fn
        try:
            data = inductor.serialize(artifact)
        except Exception as e:  # noqa: BLE001
            event.path = Path.FAILED
            event.reason = f"the compiled piece cannot be serialized ({type(e).__name__}: {e}); it stays in memory"
            _warn_once(f"failed:{digest}", "isocache: piece %s: %s", digest[:16], event.reason)
            return fn
        if tiers.remote is not None:
            tiers.remote.publish(digest, data, compile_seconds)
        if tiers.store is not None:
            self._put_local(tiers.store, digest, data, compile_seconds)
        return fn

    @staticmethod
    def _put_local(store: _core.Store, digest: str, data: bytes, compile_seconds: float) -> None:
        try:
            store.put(digest, data, compile_seconds)
            limit = config.current().max_bytes
            if total_bytes(store.root) > limit:
                result = gc_root(store.root, limit)
                logger.debug(
                    "isocache: evicted %d artifacts (%d bytes) to stay under %d bytes",
                    result.removed,
                    result.freed_bytes,
                    limit,
                )
        except _core.CacheError as e:
            _warn_once(
                f"put:{store.root}",
                "isocache: the store could not be written (%s); compiled pieces stay in memory",
                e,
            )

    def _failed(self, piece: Piece, inputs: list[Any], event: CompileEvent, reason: str) -> Callable[..., Any]:
        event.path = Path.FAILED
        try:
            fn = inductor.plain_inductor(piece.module, inputs)
            event.reason = f"{reason}; running it with plain Inductor"
        except Exception as e:  # noqa: BLE001
            if is_dynamo_restart(e):
                raise
            fn = piece.module
            event.reason = f"{reason}; plain Inductor failed too ({type(e).__name__}), running it eagerly"
        _warn_once(f"failed:{event.digest}", "isocache: piece %s: %s", event.digest[:16], event.reason)
        return fn


@dataclasses.dataclass(frozen=True)
class _Tiers:
    """Where a graph's pieces may come from besides this process's memory."""

    store: _core.Store | None
    remote: RedisTier | None

    def remote_counts(self) -> tuple[int, int, int]:
        if self.remote is None:
            return (0, 0, 0)
        return (self.remote.hits, self.remote.misses, self.remote.errors)


_inductor_dir_checked = False


def _ensure_private_inductor_dir(root: str | None) -> None:
    """Once per process: Inductor writes the code it loads to a directory nobody else can write."""
    global _inductor_dir_checked
    if _inductor_dir_checked:
        return
    _inductor_dir_checked = True
    fallback = None if root is None else os.path.join(root, "inductor")
    inductor.ensure_private_cache_dir(fallback)


def _reuse(event: CompileEvent) -> Callable[..., Any] | None:
    """The callable this process already holds for `event.digest` (path REUSE), if any."""
    entry = _INDEX.get(event.digest)
    if entry is None or entry.state != "ready" or not callable(entry.value):
        return None
    _INDEX.record_hit(event.digest)
    event.path = Path.REUSE
    reused: Callable[..., Any] = entry.value
    return reused


def lookup_counted(store: _core.Store, digest: str) -> tuple[bytes, float] | None:
    """`store.lookup`, counting the bad files it moves to quarantine; a store error is a miss."""
    before = store.quarantined
    try:
        found = store.lookup(digest)
    except _core.CacheError as e:
        _warn_once(f"lookup:{store.root}", "isocache: the store could not be read (%s); treating it as a miss", e)
        return None
    if store.quarantined != before:
        record_quarantined(store.quarantined - before)
    return found


def _has(store: _core.Store | None, digest: str) -> bool:
    if store is None:
        return False
    try:
        return digest in store
    except _core.CacheError:
        return False


def _take_lease(store: _core.Store, digest: str, timeout: float) -> Any:
    """The store's compile lease (None: another process holds it); a lease that cannot be taken is skipped."""
    try:
        return store.lease(digest, timeout)
    except _core.CacheError as e:
        _warn_once(f"lease:{store.root}", "isocache: compile leases unavailable (%s); compiling without one", e)
        return _NO_LEASE


class _NoLease:
    """Stands in for a lease the store could not give: compile here, release nothing."""

    def release(self) -> None:
        pass


_NO_LEASE = _NoLease()


def _install(split: torch.fx.GraphModule, piece: Piece, fn: Callable[..., Any]) -> None:
    # The split graph's code calls `self.<name>(...)`; an instance attribute
    # shadows the submodule without touching `_modules`.
    split.__dict__[piece.name] = fn


_default: Backend | None = None
_default_lock = threading.Lock()


def isocache_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The backend behind ``torch.compile(model, backend="isocache")``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Backend()
        backend = _default
    return backend(gm, example_inputs)
