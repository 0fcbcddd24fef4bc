"""The store commands of the command line: ``stats`` (``--diff``), ``ls``, ``verify``, ``gc`` and
``clear``. ``stats``, ``ls`` and ``verify`` (without ``--fix``) open the stores read-only."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._cli_common import UsageError, ago, emit, empty, kinds, size, stores, table
from .namespace import Namespace

if TYPE_CHECKING:
    from . import _core

__all__ = [
    "clear_command",
    "gc_arguments",
    "gc_command",
    "ls_command",
    "stats_arguments",
    "stats_command",
    "verify_arguments",
    "verify_command",
]


def stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("NS1", "NS2"),
        help="name the fields in which two namespaces differ (a unique prefix of each will do)",
    )


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fix", action="store_true", help="move bad artifacts to quarantine")


def _byte_count(text: str) -> int:
    """A size cap for `gc --max-bytes`: bytes (0 or more) or a size such as 10G."""
    from .config import parse_size

    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    try:
        return parse_size(stripped)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (0 or more bytes)") from None


def gc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-bytes",
        type=_byte_count,
        default=None,
        help="cap, e.g. 5G (default: $ISOCACHE_MAX_BYTES or 10 GiB)",
    )


def _recorded(store: _core.Store) -> Namespace | None:
    """What made a namespace, as recorded beside it (None: no record, or one that is not a JSON object)."""
    text = store.description()
    return None if text is None else Namespace.from_description(text)


_NO_FIELDS = "has no record of its fields (written before isocache recorded them)"


def _field_lines(fields: dict[str, str] | None) -> list[str]:
    if fields is None:
        return ["  (this namespace " + _NO_FIELDS + ")"]
    width = max((len(k) for k in fields), default=0)
    return [f"  {k.ljust(width)}  {v if v else '-'}" for k, v in fields.items()]


def _pick(found_stores: Sequence[tuple[str, _core.Store]], wanted: str) -> tuple[str, _core.Store]:
    """The namespace named `wanted`, or the only one it is a prefix of (`cpu-6e40` for `cpu-6e40...`)."""
    found = [(ns, store) for ns, store in found_stores if ns == wanted] or [
        (ns, store) for ns, store in found_stores if ns.startswith(wanted)
    ]
    if len(found) == 1:
        return found[0]
    known = ", ".join(ns for ns, _ in found_stores) or "none"
    what = "matches several namespaces" if found else "is not a namespace of this store"
    raise UsageError(f"{wanted!r} {what} (namespaces: {known})")


def _diff(args: argparse.Namespace) -> int:
    found_stores = stores(args)
    (ns_a, store_a), (ns_b, store_b) = _pick(found_stores, args.diff[0]), _pick(found_stores, args.diff[1])
    recorded_a, recorded_b = _recorded(store_a), _recorded(store_b)
    if recorded_a is None or recorded_b is None:
        missing = ns_a if recorded_a is None else ns_b
        raise UsageError(f"namespace {missing} {_NO_FIELDS}; run a compile with this isocache to record them")
    differ = recorded_a.diff(recorded_b)
    counted = {0: "no field differs", 1: "1 field differs"}.get(len(differ), f"{len(differ)} fields differ")
    lines = [f"{ns_a} vs {ns_b}: {counted}"]
    width = max((len(k) for k in differ), default=0)
    for k, (a, b) in differ.items():
        lines.append(f"  {k.ljust(width)}  {a or '-'}  |  {b or '-'}")
    data = {"a": ns_a, "b": ns_b, "differ": [{"field": k, ns_a: a, ns_b: b} for k, (a, b) in differ.items()]}
    emit(args, data, "\n".join(lines))
    return 0


_STATS_HEADERS = [
    "namespace",
    "pieces",
    "models",
    "size",
    "hits",
    "misses",
    "hit rate",
    "compile time saved",
    "remote hit/miss/err",
    "quarantined",
]


def _namespace_stats(ns: str, store: _core.Store) -> tuple[dict[str, Any], list[object]]:
    """One namespace's figures: as JSON, and as a row of the table (`_STATS_HEADERS`)."""
    recorded = _recorded(store)
    objects = store.objects()
    quarantine = store.quarantine()
    usage = store.usage()
    counts = kinds(objects)
    total = sum(o.size for o in objects)
    lookups = usage.hits + usage.misses
    hit_rate = usage.hits / lookups if lookups else None
    quarantined_bytes = sum(q.size for q in quarantine)
    data = {
        "namespace": ns,
        "artifacts": len(objects),
        "pieces": counts["piece"],
        "models": counts["model"],
        "bytes": total,
        "hits": usage.hits,
        "misses": usage.misses,
        "hit_rate": hit_rate,
        "compile_seconds_saved": usage.saved_seconds,
        "remote_hits": usage.remote_hits,
        "remote_misses": usage.remote_misses,
        "remote_errors": usage.remote_errors,
        "quarantined": len(quarantine),
        "quarantined_bytes": quarantined_bytes,
        "fields": None if recorded is None else recorded.recorded(),
    }
    row: list[object] = [
        ns,
        counts["piece"],
        counts["model"],
        size(total),
        usage.hits,
        usage.misses,
        "-" if hit_rate is None else f"{100 * hit_rate:.0f}%",
        f"{usage.saved_seconds:.1f} s",
        f"{usage.remote_hits}/{usage.remote_misses}/{usage.remote_errors}",
        f"{len(quarantine)} ({size(quarantined_bytes)})" if quarantine else 0,
    ]
    return data, row


def stats_command(args: argparse.Namespace) -> int:
    from ._core import root_size

    if args.diff:
        return _diff(args)
    rows: list[list[object]] = []
    data: list[dict[str, Any]] = []
    described: list[str] = []
    for ns, store in stores(args):
        figures, row = _namespace_stats(ns, store)
        described += [f"{ns}:", *_field_lines(figures["fields"])]
        data.append(figures)
        rows.append(row)
    summary: dict[str, Any] = {"root": args.dir, "namespaces": data, "artifacts": 0, "bytes": 0}
    if not data:
        emit(args, summary, empty(args))
        return 0
    total = root_size(args.dir)
    text = f"isocache store at {args.dir}: {total.artifacts} artifacts, {size(total.bytes)} with the quarantine"
    text += "\n" + table(_STATS_HEADERS, rows)
    if described:
        text += "\n\nwhat makes each namespace (two processes share pieces only in one namespace):\n"
        text += "\n".join(described)
    summary |= {"artifacts": total.artifacts, "bytes": total.bytes}
    emit(args, summary, text)
    return 0


def ls_command(args: argparse.Namespace) -> int:
    rows, data = [], []
    for ns, store in stores(args):
        for o in sorted(store.objects(), key=lambda o: -o.last_used):
            data.append(
                {
                    "namespace": ns,
                    "digest": o.digest.hex,
                    "kind": o.kind,
                    "bytes": o.size,
                    "last_used": o.last_used,
                    "compile_seconds": o.compile_seconds,
                }
            )
            rows.append([o.digest.hex[:16], ns, o.kind, size(o.size), ago(o.last_used), f"{o.compile_seconds:.2f} s"])
    headers = ["digest", "namespace", "kind", "size", "last used", "compile time saved per load"]
    text = table(headers, rows) if rows else empty(args)
    emit(args, data, text)
    return 0


def verify_command(args: argparse.Namespace) -> int:
    checked = pieces = models = 0
    bad_all: list[dict[str, Any]] = []
    found = stores(args, writable=args.fix)
    for ns, store in found:
        report = store.verify(fix=args.fix)
        checked += report.checked
        pieces += report.pieces
        models += report.models
        bad_all += [
            {"namespace": ns, "digest": b.name, "corruption": b.corruption, "reason": b.reason} for b in report.bad
        ]
    lines = [
        f"checked {checked} artifacts: {pieces} pieces and {models} models good, {len(bad_all)} bad"
        + (" (moved to quarantine)" if args.fix and bad_all else "")
        if found
        else empty(args)
    ]
    lines += [f"  {b['digest'][:16]} [{b['namespace']}] {b['corruption']}: {b['reason']}" for b in bad_all]
    data = {"checked": checked, "pieces": pieces, "models": models, "bad": bad_all, "fixed": bool(args.fix)}
    emit(args, data, "\n".join(lines))
    return 1 if bad_all and not args.fix else 0


def gc_command(args: argparse.Namespace) -> int:
    from ._core import list_namespaces
    from ._maintenance import gc_root, max_store_bytes

    limit = args.max_bytes if args.max_bytes is not None else max_store_bytes()
    if not list_namespaces(args.dir):
        data: dict[str, Any] = {
            "removed": 0,
            "removed_by_kind": {"piece": 0, "model": 0},
            "quarantine_removed": 0,
            "freed_bytes": 0,
            "remaining": 0,
            "remaining_bytes": 0,
            "max_bytes": limit,
        }
        emit(args, data, empty(args))
        return 0
    r = gc_root(args.dir, limit)
    by_kind = kinds(r.evicted)
    text = (
        f"removed {r.removed} artifacts ({by_kind['piece']} pieces, {by_kind['model']} models; {size(r.freed_bytes)} "
        f"with {r.quarantine_removed} quarantined entries); "
        f"{r.remaining} remain ({size(r.remaining_bytes)} of {size(limit)})"
    )
    data = {
        "removed": r.removed,
        "removed_by_kind": by_kind,
        "quarantine_removed": r.quarantine_removed,
        "freed_bytes": r.freed_bytes,
        "remaining": r.remaining,
        "remaining_bytes": r.remaining_bytes,
        "max_bytes": limit,
    }
    emit(args, data, text)
    return 0


def clear_command(args: argparse.Namespace) -> int:
    found = stores(args, writable=True)
    removed = sum(store.clear() for _, store in found)
    emit(args, {"removed": removed}, f"removed {removed} artifacts from {args.dir}" if found else empty(args))
    return 0
