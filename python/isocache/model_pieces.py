"""`isocache.pieces(model, *args)`: a model's pieces as isocache cuts them, without compiling."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .backend import Backend

__all__ = ["ModelPiece", "pieces"]


@dataclasses.dataclass(frozen=True)
class ModelPiece:
    """One compiled piece of a model: what `isocache.explain` compares (``explain(p[4], p[6])``)."""

    #: Position among the model's compiled pieces, all graphs in order.
    index: int
    #: Which Dynamo graph it comes from (0 unless the model has graph breaks).
    graph: int
    #: Its name in the split graph (``submod_3``).
    name: str
    module: torch.fx.GraphModule
    #: The canonical digest: equal for isometric pieces, which compile once.
    digest: str
    #: The indices of the other pieces with the same digest (they reuse one compile).
    shared_with: tuple[int, ...]

    @property
    def shared(self) -> bool:
        return bool(self.shared_with)

    def __repr__(self) -> str:
        shared = f", shared with {list(self.shared_with)}" if self.shared_with else ""
        return f"ModelPiece({self.index}: {self.name} of graph {self.graph}, {self.digest[:16]}{shared})"


def pieces(model: Any, *args: Any, split: str = "auto", dynamic: bool | None = None, **kwargs: Any) -> list[ModelPiece]:
    """Runs `model(*args, **kwargs)` under Dynamo without compiling and returns its pieces as isocache
    cuts them (`split` as for `Backend`), with their digests and which are shared."""
    backend = Backend(cache_dir=False, compile_workers=0, split=split)
    found: list[tuple[int, str, torch.fx.GraphModule, str]] = []
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graph = len(graphs)  # counted even when a graph has no compiled piece
        graphs.append(gm)
        cut, _, digests = backend.cut(gm, example_inputs)
        for piece, (digest, _) in zip(cut.compiled_pieces, digests):
            found.append((graph, piece.name, piece.module, digest))
        return gm.forward

    traced: Any = torch.compile(model, backend=record, dynamic=dynamic)
    traced(*args, **kwargs)
    by_digest: dict[str, list[int]] = {}
    for index, (_, _, _, digest) in enumerate(found):
        by_digest.setdefault(digest, []).append(index)
    return [
        ModelPiece(i, graph, name, module, digest, tuple(j for j in by_digest[digest] if j != i))
        for i, (graph, name, module, digest) in enumerate(found)
    ]
