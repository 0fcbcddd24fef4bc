"""The command line: ``python -m isocache demo | stats | ls | verify | gc | clear | keygen``.

Only ``demo`` imports torch. ``stats``, ``ls`` and ``verify`` (without
``--fix``) open stores read-only and change nothing on disk; ``gc``,
``clear`` and ``verify --fix`` never follow a symbolic link. Errors (an
insecure store, an unreadable directory) are one line on stderr and exit
status 1; an argument naming nothing usable (``stats --diff`` with an
unknown namespace) is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import _core

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    import isocache

    try:
        import transformers
    except ImportError:
        print("the demo needs transformers: pip install 'isocache[demo]'", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("isocache").setLevel(logging.INFO)
    hf: Any = transformers  # transformers' own annotations are incomplete
    config = hf.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=1024,
        max_position_embeddings=max(512, args.seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = hf.LlamaModel(config).eval().to(device)
    ids = torch.randint(0, 1024, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    backend = isocache.Backend(cache_dir=args.cache_dir)
    print(
        f"isocache demo: {args.layers}-layer Llama (hidden {args.hidden}, random weights) on {device}, "
        f"{args.seq} tokens; store: {backend.root}"
    )
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        compiled: Any = torch.compile(model, backend=backend, dynamic=args.dynamic)
        start = time.perf_counter()
        actual = compiled(ids).last_hidden_state
        first_call = time.perf_counter() - start
    err = (actual - expected).abs().max().item()
    ok = torch.allclose(actual, expected, rtol=1e-3, atol=1e-3)
    s = isocache.stats()
    if s["compiled"]:
        what = f"Dynamo trace, compile {s['compiled']} distinct pieces"
    else:
        what = f"Dynamo trace, load {s['loaded']} distinct pieces from the store"
    print(f"first call ({what}, run): {first_call:.2f} s")
    print(f"output matches eager: {'yes' if ok else 'NO'} (max abs diff {err:.2e})")
    print(
        f"pieces: {s['pieces']} ({s['compiled']} compiled, {s['loaded']} loaded, "
        f"{s['reused']} reused, {s['failed']} failed); "
        f"compile {s['compile_seconds']:.2f} s, load {s['load_seconds']:.2f} s, "
        f"digests {s['digest_seconds'] * 1e3:.1f} ms"
    )
    if s["compiled"] and not s["loaded"]:
        print("run it again: the next process loads every distinct piece instead of compiling it")
    return 0 if ok else 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(ts: float) -> str:
    delta = max(0.0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= secs:
            return f"{delta / secs:.0f} {unit} ago"
    return f"{delta:.0f} s ago"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)


def _stores(args: argparse.Namespace, writable: bool = False) -> list[tuple[str, _core.Store]]:
    from ._maintenance import open_stores

    return open_stores(args.dir, writable=writable)


def _kinds(objects: Iterable[_core.ObjectInfo]) -> dict[str, int]:
    """Artifacts per kind: {"piece": n, "model": m}."""
    counts = {"piece": 0, "model": 0}
    for o in objects:
        counts[o.kind] += 1
    return counts


def _fields(store: _core.Store) -> dict[str, str] | None:
    """What made a namespace, as recorded beside it (None: no record, or one that is not a JSON object)."""
    text = store.description()
    if text is None:
        return None
    try:
        fields = json.loads(text)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in fields.items()} if isinstance(fields, dict) else None


_NO_FIELDS = "has no record of its fields (written before isocache recorded them)"


def _field_lines(fields: dict[str, str] | None) -> list[str]:
    if fields is None:
        return ["  (this namespace " + _NO_FIELDS + ")"]
    width = max((len(k) for k in fields), default=0)
    return [f"  {k.ljust(width)}  {v if v else '-'}" for k, v in fields.items()]


def _pick(stores: Sequence[tuple[str, _core.Store]], wanted: str) -> tuple[str, _core.Store]:
    """The namespace named `wanted`, or the only one it is a prefix of (`cpu-6e40` for `cpu-6e40...`)."""
    found = [(ns, store) for ns, store in stores if ns == wanted] or [
        (ns, store) for ns, store in stores if ns.startswith(wanted)
    ]
    if len(found) == 1:
        return found[0]
    known = ", ".join(ns for ns, _ in stores) or "none"
    what = "matches several namespaces" if found else "is not a namespace of this store"
    raise _UsageError(f"{wanted!r} {what} (namespaces: {known})")


class _UsageError(Exception):
    """A command-line argument that names nothing usable: printed, exit status 2."""


def _diff(args: argparse.Namespace) -> int:
    stores = _stores(args)
    (ns_a, store_a), (ns_b, store_b) = _pick(stores, args.diff[0]), _pick(stores, args.diff[1])
    fields_a, fields_b = _fields(store_a), _fields(store_b)
    if fields_a is None or fields_b is None:
        missing = ns_a if fields_a is None else ns_b
        raise _UsageError(f"namespace {missing} {_NO_FIELDS}; run a compile with this isocache to record them")
    fields = sorted(k for k in fields_a.keys() | fields_b.keys() if fields_a.get(k) != fields_b.get(k))
    differ = [{"field": k, ns_a: fields_a.get(k), ns_b: fields_b.get(k)} for k in fields]
    counted = {0: "no field differs", 1: "1 field differs"}.get(len(fields), f"{len(fields)} fields differ")
    lines = [f"{ns_a} vs {ns_b}: {counted}"]
    width = max((len(k) for k in fields), default=0)
    for k in fields:
        lines.append(f"  {k.ljust(width)}  {fields_a.get(k) or '-'}  |  {fields_b.get(k) or '-'}")
    _emit(args, {"a": ns_a, "b": ns_b, "differ": differ}, "\n".join(lines))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from ._core import root_size

    if args.diff:
        return _diff(args)
    rows: list[list[object]] = []
    data: list[dict[str, Any]] = []
    described: list[str] = []
    for ns, store in _stores(args):
        fields = _fields(store)
        described += [f"{ns}:", *_field_lines(fields)]
        objects = store.objects()
        quarantine = store.quarantine()
        usage = store.usage()
        kinds = _kinds(objects)
        size = sum(o.size for o in objects)
        lookups = usage.hits + usage.misses
        hit_rate = usage.hits / lookups if lookups else None
        quarantined_bytes = sum(q.size for q in quarantine)
        data.append(
            {
                "namespace": ns,
                "artifacts": len(objects),
                "pieces": kinds["piece"],
                "models": kinds["model"],
                "bytes": size,
                "hits": usage.hits,
                "misses": usage.misses,
                "hit_rate": hit_rate,
                "compile_seconds_saved": usage.saved_seconds,
                "remote_hits": usage.remote_hits,
                "remote_misses": usage.remote_misses,
                "remote_errors": usage.remote_errors,
                "quarantined": len(quarantine),
                "quarantined_bytes": quarantined_bytes,
                "fields": fields,
            }
        )
        rows.append(
            [
                ns,
                kinds["piece"],
                kinds["model"],
                _size(size),
                usage.hits,
                usage.misses,
                "-" if hit_rate is None else f"{100 * hit_rate:.0f}%",
                f"{usage.saved_seconds:.1f} s",
                f"{usage.remote_hits}/{usage.remote_misses}/{usage.remote_errors}",
                f"{len(quarantine)} ({_size(quarantined_bytes)})" if quarantine else 0,
            ]
        )
    headers = [
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
    total = root_size(args.dir) if data else None
    text = f"isocache store at {args.dir}"
    if total is not None:
        text += f": {total.artifacts} artifacts, {_size(total.bytes)} with the quarantine"
    text += "\n" + (_table(headers, rows) if rows else "(empty)")
    if described:
        text += "\n\nwhat makes each namespace (two processes share pieces only in one namespace):\n"
        text += "\n".join(described)
    summary: dict[str, Any] = {"root": args.dir, "namespaces": data}
    if total is not None:
        summary |= {"artifacts": total.artifacts, "bytes": total.bytes}
    _emit(args, summary, text)
    return 0


def _ls(args: argparse.Namespace) -> int:
    rows, data = [], []
    for ns, store in _stores(args):
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
            rows.append([o.digest.hex[:16], ns, o.kind, _size(o.size), _ago(o.last_used), f"{o.compile_seconds:.2f} s"])
    headers = ["digest", "namespace", "kind", "size", "last used", "compile time saved per load"]
    text = _table(headers, rows) if rows else "(empty)"
    _emit(args, data, text)
    return 0


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    for i in indices:
        if parts and parts[-1].split("-")[-1] == str(i - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


def _variants(store: Any, newest: bytes, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The other saved variants an entry lists, each with what it depends on that differs from the newest
    (its configuration, its module structure, the facts its trace recorded)."""
    from .entry import EntryRefused, unpack
    from .tiers.local import read_payload
    from .validity import Dependencies

    out: list[dict[str, Any]] = []
    try:
        mine = unpack(newest)
        facts = Dependencies.from_bytes(mine.dependencies)
    except (EntryRefused, ValueError):
        return out
    for key in manifest.get("others", []):
        found = read_payload(store, str(key))
        if found is None:
            continue
        try:
            other = unpack(found)
            differs = [
                f"its {what}: differs"
                for what in ("config", "structure")
                if other.manifest.get(what) != manifest.get(what)
            ]
            differs += facts.differences(Dependencies.from_bytes(other.dependencies))
        except (EntryRefused, ValueError) as e:
            differs = [f"unreadable ({e})"]
        out.append({"entry": str(key), "differs": differs})
    return out


def _explain(args: argparse.Namespace) -> int:
    """Each saved model's pieces, grouped by digest: which pieces share compiled code and which do not;
    and each of its other saved variants, with what it depends on that differs."""
    from .entry import entry_manifest
    from .tiers.local import read_payload

    lines: list[str] = []
    data: list[dict[str, Any]] = []
    for ns, store in _stores(args):
        for o in sorted(store.objects(), key=lambda o: -o.last_used):
            if o.kind != "model":
                continue
            raw = read_payload(store, o.digest) or b""
            manifest = entry_manifest(raw)
            if manifest is None or "pieces" not in manifest or manifest.get("variant") == o.digest.hex:
                continue  # not an entry, or a variant kept aside: shown under the newest
            by_digest: dict[str, list[int]] = {}
            for index, digest in enumerate(manifest["pieces"]):
                by_digest.setdefault(digest, []).append(index)
            model = manifest.get("model", "model")
            groups: list[dict[str, Any]] = [
                {"digest": d, "pieces": found, "in_store": store.contains(d)} for d, found in by_digest.items()
            ]
            variants = _variants(store, raw, manifest)
            data.append(
                {
                    "namespace": ns,
                    "model": model,
                    "entry": o.digest.hex,
                    "pieces": len(manifest["pieces"]),
                    "distinct": len(by_digest),
                    "digests": groups,
                    "variants": variants,
                }
            )
            lines.append(
                f"{model} [{ns}] (saved {_ago(o.last_used)}): {len(manifest['pieces'])} pieces, "
                f"{len(by_digest)} compiled"
            )
            for digest, found in by_digest.items():
                where = f"piece {found[0]}" if len(found) == 1 else f"pieces {_ranges(found)} ({len(found)})"
                lines.append(f"  {digest[:16]}  {where}{'' if store.contains(digest) else '  (evicted)'}")
            for variant in variants:
                lines.append(f"  another saved variant {variant['entry'][:16]}: newest | this one")
                lines.extend(f"    {line}" for line in variant["differs"])
    if not lines:
        lines.append(
            "no saved models: isocache.compile saves which piece has which digest; "
            "torch.compile(model, backend='isocache') keeps no such record"
        )
    _emit(args, data, "\n".join(lines))
    return 0


def _verify(args: argparse.Namespace) -> int:
    checked = pieces = models = 0
    bad_all: list[dict[str, Any]] = []
    for ns, store in _stores(args, writable=args.fix):
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
    ]
    lines += [f"  {b['digest'][:16]} [{b['namespace']}] {b['corruption']}: {b['reason']}" for b in bad_all]
    data = {"checked": checked, "pieces": pieces, "models": models, "bad": bad_all, "fixed": bool(args.fix)}
    _emit(args, data, "\n".join(lines))
    return 1 if bad_all and not args.fix else 0


def _gc(args: argparse.Namespace) -> int:
    from ._core import list_namespaces
    from ._maintenance import gc_root, max_store_bytes

    limit = args.max_bytes if args.max_bytes is not None else max_store_bytes()
    if not list_namespaces(args.dir):
        _emit(args, {"removed": 0}, f"no store at {args.dir}")
        return 0
    r = gc_root(args.dir, limit)
    kinds = _kinds(r.evicted)
    text = (
        f"removed {r.removed} artifacts ({kinds['piece']} pieces, {kinds['model']} models; {_size(r.freed_bytes)} "
        f"with {r.quarantine_removed} quarantined entries); "
        f"{r.remaining} remain ({_size(r.remaining_bytes)} of {_size(limit)})"
    )
    data = {
        "removed": r.removed,
        "removed_by_kind": kinds,
        "quarantine_removed": r.quarantine_removed,
        "freed_bytes": r.freed_bytes,
        "remaining": r.remaining,
        "remaining_bytes": r.remaining_bytes,
        "max_bytes": limit,
    }
    _emit(args, data, text)
    return 0


def _clear(args: argparse.Namespace) -> int:
    removed = sum(store.clear() for _, store in _stores(args, writable=True))
    _emit(args, {"removed": removed}, f"removed {removed} artifacts from {args.dir}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    import secrets

    key = secrets.token_hex(32)
    print(key)
    print(
        f"set it in every process that shares the store or the Redis server: export ISOCACHE_KEY={key}",
        file=sys.stderr,
    )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isocache", description="isocache: a compile cache for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a Llama built from a config and check it against eager")
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--seq", type=int, default=32)
    demo.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--cache-dir", default=None, help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)")
    demo.set_defaults(func=_demo)

    keygen = sub.add_parser("keygen", help="print a new random signing key for ISOCACHE_KEY")
    keygen.set_defaults(func=_keygen)

    from ._maintenance import default_root

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", default=default_root(), help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    for name, func, text in (
        ("stats", _stats, "artifact counts, bytes, hit rate and compile time saved"),
        ("ls", _ls, "list artifacts (pieces and models) with size, last use and compile time"),
        ("verify", _verify, "check every artifact's checksum (and signature with ISOCACHE_KEY)"),
        ("explain", _explain, "for each model saved by isocache.compile: its pieces grouped by digest"),
        ("gc", _gc, "evict least-recently-used artifacts, across namespaces, down to the size cap"),
        ("clear", _clear, "remove every artifact"),
    ):
        cmd = sub.add_parser(name, help=text, parents=[common])
        cmd.set_defaults(func=func)
        if name == "stats":
            cmd.add_argument(
                "--diff",
                nargs=2,
                metavar=("NS1", "NS2"),
                help="name the fields in which two namespaces differ (a unique prefix of each will do)",
            )
        if name == "verify":
            cmd.add_argument("--fix", action="store_true", help="move bad artifacts to quarantine")
        if name == "gc":
            cmd.add_argument(
                "--max-bytes",
                type=_byte_count,
                default=None,
                help="cap, e.g. 5G (default: $ISOCACHE_MAX_BYTES or 10 GiB)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._core import CacheError

    args = build_parser().parse_args(argv)
    if getattr(args, "dir", "") is None:
        print("isocache: no store directory: set ISOCACHE_DIR or pass --dir", file=sys.stderr)
        return 1
    try:
        code: int = args.func(args)
    except (CacheError, OSError) as e:
        print("isocache: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except _UsageError as e:
        print(f"isocache: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
