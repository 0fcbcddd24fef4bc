"""FX and symbolic shapes: the ranges of a graph's symbolic sizes.

Written against torch 2.11-2.15 (``ShapeEnv.var_to_range``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["symbol_ranges"]


def _show(bound: Any) -> str:
    text = str(bound)
    return "inf" if text in ("oo", "int_oo") else text


def symbol_ranges(values: Any) -> dict[str, tuple[str, str]]:
    """``{symbol: (lower, upper)}`` for each symbolic size among `values`, in order of first use."""
    seen: dict[str, tuple[str, str]] = {}

    def visit(value: Any) -> None:
        if not isinstance(value, torch.SymInt):
            return
        node = value.node
        shape_env = getattr(node, "shape_env", None)
        for sym in sorted(node.expr.free_symbols, key=str):
            if str(sym) in seen:
                continue
            vr = shape_env.var_to_range.get(sym) if shape_env is not None else None
            seen[str(sym)] = ("?", "?") if vr is None else (_show(vr.lower), _show(vr.upper))

    for value in values:
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                visit(size)
        else:
            visit(value)
    return seen
