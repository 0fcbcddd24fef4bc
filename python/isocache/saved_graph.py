"""The split graph an `isocache.compile` entry saves, in torch's `SerializableCallable` form.

Saving writes the split graph's code and, for each compiled piece, its digest
(never compiled code). Torch rebuilds the callable without arguments while it
loads a saved function, so deserializing only parses: the loader then hands
the callable the resolver its pieces come from (`SplitGraphCallable.load_pieces`),
and every piece goes through the report's one exit. Until then, calling it
raises.
"""

from __future__ import annotations

import builtins
import functools
import pickle
from typing import Any, Callable

import torch
import torch.fx

from ._core import CacheError
from ._torch import dynamo, inductor
from .backend import Backend
from .entry import EntryRefused
from .report import GraphReport
from .resolver import Resolver

__all__ = ["SplitGraphCallable", "serializable_backend"]

SPLIT_FORMAT = 1


def _function_from(source: str, name: str) -> Callable[..., Any]:
    scope: dict[str, Any] = {}
    exec(builtins.compile(source, f"<isocache {name}>", "exec"), scope)  # checked, signed store
    forward: Callable[..., Any] = scope["forward"]
    return forward


class _SplitRunner:
    """Runs a saved split graph: its forward, with pieces as attributes (no FX re-trace)."""

    def __init__(self, forward: Callable[..., Any], parts: dict[str, Callable[..., Any]]) -> None:
        self.__dict__.update(parts)
        self._forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(self, *args, **kwargs)


def _not_loaded(*args: Any, **kwargs: Any) -> Any:
    raise CacheError("a saved split graph was called before its pieces were loaded (load_pieces)")


class SplitGraphCallable(dynamo.SerializableCallable):
    """The isocache backend's output for torch's ahead-of-time capture: the split graph, and the
    digest of each compiled piece (``(submodule name, digest)``, in call order)."""

    def __init__(
        self, graph: Callable[..., Any], pieces: list[tuple[str, str]], namespace: str, state: bytes | None = None
    ) -> None:
        self.graph = graph
        self.pieces = pieces
        self.namespace = namespace
        self._state = state
        self._parsed: dict[str, Any] | None = None  # the deserialized state, until its pieces load

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph(*args, **kwargs)

    @classmethod
    def serialize_compile_artifacts(cls, fn: Any) -> bytes:
        if fn._state is not None:
            return bytes(fn._state)
        graph = fn.graph
        assert isinstance(graph, torch.fx.GraphModule)
        compiled = dict(fn.pieces)
        eager = {}
        returns_tuple = {}
        for node in graph.graph.nodes:
            if node.op != "call_module":
                continue
            # `_modules`, not getattr: the compiled pieces shadow the submodules.
            sub = graph._modules[str(node.target)]
            assert isinstance(sub, torch.fx.GraphModule)
            if node.target in compiled:
                returns_tuple[str(node.target)] = inductor.returns_tuple(sub)
            else:
                eager[str(node.target)] = dynamo.module_source(sub)
        return pickle.dumps(
            {
                "format": SPLIT_FORMAT,
                "namespace": fn.namespace,
                "pieces": fn.pieces,
                "returns_tuple": returns_tuple,
                "forward": dynamo.module_source(graph),
                "eager": eager,
            }
        )

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> SplitGraphCallable:
        """Parses a saved split graph; its pieces load with `load_pieces`."""
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("format") != SPLIT_FORMAT:
            raise EntryRefused("the saved split graph has an unknown format")
        saved = cls(_not_loaded, list(state["pieces"]), str(state["namespace"]), data)
        saved._parsed = state
        return saved

    def load_pieces(self, resolver: Resolver, report: GraphReport) -> None:
        """Takes every piece from `resolver`'s tiers (memory, then those it was given) through `report`'s
        exit, never compiling; raises `EntryRefused` when a piece is in no tier."""
        state = self._parsed
        assert state is not None, "only a deserialized split graph loads its pieces, once"
        parts: dict[str, Callable[..., Any]] = {
            name: functools.partial(_function_from(source, name), None) for name, source in state["eager"].items()
        }
        for index, (name, digest) in enumerate(self.pieces):
            with report.piece(index) as event:
                event.digest = digest
                fn = resolver.load(digest, bool(state["returns_tuple"][name]), event)
                if fn is None:
                    raise EntryRefused(f"piece {digest[:16]} is in no store (evicted?)")
            parts[name] = fn
        self.graph = _SplitRunner(_function_from(state["forward"], "split graph"), parts)
        self._parsed = None


def serializable_backend(backend: Backend) -> Callable[[torch.fx.GraphModule, list[Any]], SplitGraphCallable]:
    """The backend for torch's aot_compile: isocache's pipeline, serializable output."""

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SplitGraphCallable:
        compiled = backend.compile_graph(gm, example_inputs)
        if compiled.graph is None or compiled.namespace is None:
            raise CacheError("isocache is disabled (ISOCACHE_DISABLE); nothing to save")
        return SplitGraphCallable(compiled.graph, list(compiled.pieces), compiled.namespace.name)

    return compile_graph
