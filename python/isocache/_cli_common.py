"""What the command line's commands share: opening the stores, and showing sizes, ages and tables as
text or JSON (`--json`)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import _core

__all__ = ["UsageError", "ago", "emit", "empty", "kinds", "size", "stores", "table"]


class UsageError(Exception):
    """A command-line argument that names nothing usable: printed, exit status 2."""


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ago(ts: float) -> str:
    delta = max(0.0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= secs:
            return f"{delta / secs:.0f} {unit} ago"
    return f"{delta:.0f} s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)


def empty(args: argparse.Namespace) -> str:
    """What every command says of a store root with no artifacts (or no store there yet)."""
    return f"no artifacts in {args.dir} (an empty store, or none yet)"


def stores(args: argparse.Namespace, writable: bool = False) -> list[tuple[str, _core.Store]]:
    from ._maintenance import open_stores

    return open_stores(args.dir, writable=writable)


def kinds(objects: Iterable[_core.ObjectInfo]) -> dict[str, int]:
    """Artifacts per kind: {"piece": n, "model": m}."""
    counts = {"piece": 0, "model": 0}
    for o in objects:
        counts[o.kind] += 1
    return counts
