"""``python -m isocache explain``: each model saved by `isocache.compile`, its pieces grouped by digest
(which share compiled code and which do not), and its other saved variants with what they depend on that
differs. Reads the entries without torch (`entry.py`, `validity.py`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ._cli_common import ago, emit, stores

__all__ = ["explain_command"]


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


def explain_command(args: argparse.Namespace) -> int:
    """Each saved model's pieces, grouped by digest: which pieces share compiled code and which do not;
    and each of its other saved variants, with what it depends on that differs."""
    from .entry import entry_manifest
    from .tiers.local import read_payload

    lines: list[str] = []
    data: list[dict[str, Any]] = []
    for ns, store in stores(args):
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
                f"{model} [{ns}] (saved {ago(o.last_used)}): {len(manifest['pieces'])} pieces, "
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
    emit(args, data, "\n".join(lines))
    return 0
