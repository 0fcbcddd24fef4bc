"""The isocache backend: the `torch.compile` entry and its options.

    torch.compile(model, backend="isocache")          # registered entry point
    torch.compile(model, backend=isocache.Backend(cache_dir="/fast/disk"))

For each Dynamo graph the backend splits it at the splitting ops, computes
each piece's canonical digest (Rust), hands each piece to the resolver
(`resolver.py`), which takes the first path that works through the tier chain
(`tiers/`: memory -> local store -> base stores -> Redis -> compile):

- REUSE: this process already holds a callable for the digest;
- LOAD: a tier holds an artifact (another process, machine or an earlier run);
- COMPILE: Inductor compiles it once, and the artifact is published;

and installs the callables in the split graph. Whatever happens, the piece
ends in `GraphReport.piece`'s exit (report.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
import torch.fx

from . import compile_workers, config, marking, process
from ._namespace import graph_device, namespace_of
from ._once import info_once, warn_once
from ._torch import dynamo, fx, inductor, register_torch_logs, untested
from .blocks import reuse_lost
from .compile_args import check_compile_call, checked_options, compile_options, warn_unknown_args
from .digest import digest_with_reason
from .namespace import Namespace
from .report import Counters, GraphReport, Path, counters, record_trace
from .resolver import PieceFn, Resolver, resolve_pieces
from .split import Piece, SplitGraph, check_split_mode, normalize_splitting_ops, split_graph
from .tiers.base import Tier
from .tiers.base_store import BaseTier
from .tiers.chain import Chain
from .tiers.local import LocalTier
from .tiers.memory import process_index, process_tier
from .tiers.opened import OpenedTiers

__all__ = [
    "Backend",
    "CompiledGraph",
    "check_compile_call",
    "compile_options",
    "compile_range",
    "default_backend",
    "isocache_backend",
    "process_index",
]

logger = logging.getLogger("isocache")
register_torch_logs()  # TORCH_LOGS="isocache" / "+isocache"


#: Symbolic sizes a compile range names in its INFO line; more are counted (all of them at DEBUG).
_RANGES_SHOWN = 3


def compile_range(example_inputs: Sequence[Any]) -> str:
    """Each symbolic size once with its range (``s0 in [2, inf], s1 in [1, 128]``, in order of first use;
    past `_RANGES_SHOWN` of them, their count and the first two), else the static shape of the first input."""
    seen = fx.symbol_ranges(example_inputs)
    first_shape: tuple[int, ...] | None = None
    for value in example_inputs:
        static = isinstance(value, torch.Tensor) and all(isinstance(s, int) for s in value.shape)
        if static and not isinstance(value, torch.nn.Parameter):
            first_shape = tuple(int(s) for s in value.shape)
            break
    if seen:
        ranges = [f"{symbol} in [{lo}, {hi}]" for symbol, (lo, hi) in seen.items()]
        if len(ranges) <= _RANGES_SHOWN:
            return ", ".join(ranges)
        logger.debug("isocache: compile range: %s", ", ".join(ranges))
        return f"{len(ranges)} symbolic sizes ({', '.join(ranges[:2])}, ...; TORCH_LOGS=+isocache lists them)"
    if first_shape is not None:
        return "(" + ", ".join(map(str, first_shape)) + ")"
    return "static"


@dataclasses.dataclass(frozen=True)
class CompiledGraph:
    """What the backend made of one Dynamo graph."""

    #: What `torch.compile` runs: the split graph with the pieces' callables installed
    #: (plain Inductor's output when isocache is disabled).
    forward: Callable[..., Any]
    #: The split graph (None when isocache is disabled).
    graph: torch.fx.GraphModule | None
    #: The namespace its pieces live in (None when isocache is disabled).
    namespace: Namespace | None
    #: ``(submodule name, digest)`` of each compiled piece, in call order.
    pieces: tuple[tuple[str, str], ...]


class Backend:
    """A configured isocache backend, usable as ``torch.compile(..., backend=Backend())``.

    Args:
        cache_dir: root of the artifact store (default ``$ISOCACHE_DIR`` or
            ``~/.cache/isocache``). ``False`` keeps compiled pieces in memory only.
        splitting_ops: ops that cut the graph, as canonical names
            (``"aten::scaled_dot_product_attention"``), op overloads or
            functions. Default: the scaled-dot-product attention ops.
        inductor_options: Inductor config patches for every compile
            (``torch._inductor.list_options()`` names them; checked here, a
            ValueError names an unknown one); they are part of the namespace,
            so differently configured pieces never mix.
        redis_url: a Redis server shared by a fleet (default ``$ISOCACHE_REDIS_URL``),
            the tier between the local store and compiling.
        wait_timeout: seconds to wait for another thread, process or machine
            compiling the same piece before compiling it here (default
            ``$ISOCACHE_WAIT_TIMEOUT`` or 600).
        split: how graphs are cut into pieces: ``"attention"`` (around each
            splitting op), ``"blocks"`` (at each repeated block: ``layers.3``,
            with or without attention inside) or ``"auto"`` (the default:
            around splitting ops, and at repeated blocks that have none).
        compile_workers: processes that compile distinct pieces concurrently
            (see `isocache.compile_workers`); ``0`` compiles in this process.
            Default ``$ISOCACHE_COMPILE_WORKERS``, else one per core but one (at most 4).

    ``torch.compile``'s ``mode`` and ``options`` reach it: see `configured`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        splitting_ops: Iterable[object] | None = None,
        inductor_options: dict[str, Any] | None = None,
        *,
        redis_url: str | None = None,
        wait_timeout: float | None = None,
        compile_workers: int | None = None,
        split: str = "auto",
    ) -> None:
        check_split_mode(split)
        _warn_if_untested_torch()
        self.split = split
        self.cache_dir = cache_dir
        self.compile_workers = compile_workers
        self.redis_url = redis_url
        self.splitting_ops = normalize_splitting_ops(splitting_ops)
        self.inductor_options = checked_options(inductor_options or {}, "inductor_options")
        self._wait_timeout = None if wait_timeout is None else config.bounded_seconds("wait_timeout", wait_timeout)
        self._tiers = OpenedTiers()
        self._options_fingerprint = repr(sorted(self.inductor_options.items()))
        self._configured: dict[str, Backend] = {}
        self._configured_lock = threading.Lock()
        dynamo.watch_tracing()  # Dynamo's tracing time of each frame goes into the report

    def __repr__(self) -> str:
        return (
            f"Backend(cache_dir={self.cache_dir!r}, split={self.split!r}, splitting_ops={sorted(self.splitting_ops)!r}, "
            f"inductor_options={self.inductor_options!r})"
        )

    @property
    def wait_timeout(self) -> float:
        return self._wait_timeout if self._wait_timeout is not None else config.current().wait_timeout

    @property
    def root(self) -> str | None:
        """The store root this backend uses, or None (memory only)."""
        if self.cache_dir is False:
            return None
        if self.cache_dir is not None and self.cache_dir is not True:
            return os.path.abspath(os.fspath(self.cache_dir))
        root = config.current().dir
        return None if root is None else str(root)

    # -- namespaces and tiers ---------------------------------------------------
    def namespace_for(self, device: torch.device) -> Namespace:
        """The namespace of pieces this backend compiles for `device` in the current grad mode.

        Inductor options are part of it; grad mode decides whether AOTAutograd
        builds an inference or a training artifact, so it separates namespaces.
        """
        return namespace_of(
            device,
            inductor_options=self._options_fingerprint,
            grad_mode="enabled" if torch.is_grad_enabled() else "disabled",
        )

    def local(self, namespace: Namespace) -> LocalTier | None:
        """The local store's tier for `namespace`, or None when no store can be used (warned once)."""
        root = self.root
        # Every path that compiles or loads comes through here: before either,
        # Inductor must write the code it runs where nobody else can.
        process.ensure_private_inductor_dir()
        if root is None:
            return None
        return self._tiers.local(root, namespace.name, lambda: namespace.describe(inductor.changed_config()))

    def base(self, namespace: Namespace) -> BaseTier | None:
        """The base stores' tier for `namespace` (``ISOCACHE_BASE``); None: none, or ``cache_dir=False``."""
        return None if self.cache_dir is False else self._tiers.base(namespace.name)

    def chain(self, namespace: Namespace, first: Sequence[Tier[bytes]] = ()) -> Chain[PieceFn]:
        """Where pieces of `namespace` come from: memory, `first` (a saved entry's bundle), the local
        store, the base stores, then Redis."""
        stores: list[Tier[bytes]] = list(first)
        for tier in (self.local(namespace), self.base(namespace), self._tiers.redis(self.redis_url, namespace.name)):
            if tier is not None:
                stores.append(tier)
        return Chain(process_tier(), stores, wait_timeout=self.wait_timeout)

    def workers(self, device: torch.device | str) -> compile_workers.CompileWorkers | None:
        """This process's compile workers for `device`, started now if need be; None when off."""
        off = self.compile_workers == 0
        return None if off else compile_workers.pool(str(torch.device(device).type), self.compile_workers)

    def resolver(self, namespace: Namespace, first: Sequence[Tier[bytes]] = ()) -> Resolver:
        """Decides the path of each piece of `namespace` (see `resolver.py`); `first` as for `chain`."""
        resolver = Resolver(self.chain(namespace, first), self.inductor_options)  # Inductor's directory is private now
        if namespace.device_type == "cpu":
            inductor.probe_cpu_isas()  # before this process's first CPU compile or load: one ISA build, not four
        return resolver

    def cut(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> tuple[SplitGraph, Namespace, list[tuple[str, float]]]:
        """`gm` cut into pieces as this backend cuts it: the split graph, its namespace, and each compiled
        piece's digest with the seconds it took."""
        _inline_regions(gm)
        split = split_graph(gm, self.splitting_ops, self.split)
        namespace = self.namespace_for(graph_device(gm, example_inputs))
        digests: list[tuple[str, float]] = []
        for piece in split.compiled_pieces:
            start = time.perf_counter()
            digest, _ = digest_with_reason(piece.module, None, namespace.name)
            digests.append((digest, time.perf_counter() - start))
        return split, namespace, digests

    def configured(self, mode: str | None = None, options: dict[str, Any] | None = None, **other: Any) -> Backend:
        """This backend as ``torch.compile(..., mode=mode, options=options)`` asks for it (`compile_args`
        checks them): one backend per configuration, its pieces in a namespace of their own."""
        warn_unknown_args(other)
        extra = compile_options(mode, options)
        if not extra:
            return self
        merged = {**self.inductor_options, **extra}
        key = repr(sorted(merged.items()))
        with self._configured_lock:
            backend = self._configured.get(key)
            if backend is None:
                backend = copy.copy(self)
                backend.inductor_options = merged
                backend._options_fingerprint = key
                backend._tiers = OpenedTiers()
                backend._configured, backend._configured_lock = {}, threading.Lock()
                self._configured[key] = backend
            return backend

    def _dynamo_backend_init(self) -> None:
        """Torch 2.15 calls this as ``torch.compile(model, backend=self, ...)`` resolves: mode, options checked."""
        check_compile_call()

    # -- the backend --------------------------------------------------------
    def __call__(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **compile_args: Any
    ) -> Callable[..., Any]:
        backend = self.configured(**compile_args) if compile_args else self
        return backend.compile_graph(gm, example_inputs).forward

    def compile_graph(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> CompiledGraph:
        """Splits `gm`, resolves each piece, and installs the callables: what `__call__` does, described."""
        trace_seconds = dynamo.tracing_seconds()
        dynamo.watch_tracing()  # for the next frame (``torch._dynamo.reset()`` forgets it)
        if trace_seconds is not None:
            record_trace(trace_seconds)
        if config.current().disable:
            return CompiledGraph(inductor.plain_inductor(gm, example_inputs), None, None, ())
        split, namespace, digests = self.cut(gm, example_inputs)
        pieces = split.compiled_pieces
        report = GraphReport(len(pieces), compile_range(example_inputs), trace_seconds=trace_seconds)
        resolver = self.resolver(namespace)
        unknown = {d for d, _ in digests if not resolver.chain.known(d)}  # what may have to be compiled
        if len(unknown) >= 3:
            _hint_reuse_lost(pieces, [d for d, _ in digests])
        # Workers only when something may be compiled: a warm start loads, and loads here.
        workers = self.workers(graph_device(gm, example_inputs)) if unknown else None
        with counters.tally() as tally, workers.claim() if workers is not None else contextlib.nullcontext():
            try:
                resolve_pieces(split, digests, report, resolver, workers, len(unknown))
            finally:
                _record_usage(self.local(namespace), report, tally)
        for piece in split.pieces:
            if piece.is_splitting_op:
                # Call the splitting op's code directly: nn.Module.__call__'s
                # hook handling costs microseconds per layer at every forward.
                split.install(piece, piece.module.forward)
        if not pieces:
            logger.info(report.summary())
        described = tuple((p.name, d) for p, (d, _) in zip(pieces, digests))
        return CompiledGraph(split.graph, split.graph, namespace, described)


def _warn_if_untested_torch() -> None:
    """Once: this torch is outside the range CI tests (what to do is in the message)."""
    outside = untested()
    if outside is not None:
        warn_once("untested-torch", "isocache: %s", outside)


def _hint_reuse_lost(pieces: Sequence[Piece], digests: list[str]) -> None:
    """One INFO line when repeated blocks share no digest (a per-layer constant in the traced code)."""
    lost = reuse_lost([(p.index, p.module) for p in pieces], digests)
    if lost is not None:
        logger.info(
            "isocache: %s; a per-layer constant (a layer index, a name) is the usual cause: remove it "
            "from the traced code, or pass split='blocks' or split='attention' to cut elsewhere "
            "(isocache.explain compares two pieces)",
            lost,
        )


def _record_usage(local: LocalTier | None, report: GraphReport, tally: Counters) -> None:
    """The namespace's usage counters on disk: this graph's loads, compiles and Redis traffic."""
    if local is None:
        return
    local.record_usage(
        hits=report.count(Path.LOAD),
        misses=report.count(Path.COMPILE),
        saved_seconds=sum(e.saved_seconds for e in report.events if e.path is Path.LOAD),
        remote_hits=tally.remote_hits,
        remote_misses=tally.remote_misses,
        remote_errors=tally.remote_errors,
    )


def _inline_regions(gm: torch.fx.GraphModule) -> None:
    """Blocks Dynamo traced once (`isocache.mark_blocks`) become pieces as if traced in place."""
    try:
        inlined = fx.inline_regions(gm)
    except Exception as e:  # the graph stays as it is: its regions compile inside one piece
        logger.info("isocache: a traced-once block cannot be cut into pieces (%s: %s)", type(e).__name__, e)
        return
    if not inlined and marking.any_marked():
        info_once(
            "blocks-in-place",
            "isocache: marked blocks were traced in place, one by one: their calls pass an object that is not a "
            "tensor or a plain value (a KV cache that already holds tokens, say), which a block traced once cannot "
            "update",
        )


_default_lock = threading.Lock()


@functools.cache
def _default_backend() -> Backend:
    return Backend()


def default_backend() -> Backend:
    """The backend behind ``torch.compile(model, backend="isocache")``: one per process, configured from the
    environment (see `process.py`)."""
    with _default_lock:  # one backend, even when threads trace their first frames together
        return _default_backend()


def isocache_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **compile_args: Any
) -> Callable[..., Any]:
    """The backend behind ``torch.compile(model, backend="isocache")`` (`default_backend`); torch.compile's
    ``mode`` and ``options`` arrive in `compile_args` (see `Backend.configured`)."""
    return default_backend()(gm, example_inputs, **compile_args)


# `torch.compile(model, backend="isocache")` imports this module before Dynamo traces
# the first frame: from then on, each frame's tracing time is known to the report.
dynamo.watch_tracing()
