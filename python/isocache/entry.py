"""The saved-entry format of `isocache.compile` (torch-free: the command line reads it).

Layout: ``ENTRY_MAGIC``, the manifest's length (4 bytes, little endian), the
manifest (JSON), torch's saved compiled function (``compiled_bytes`` long),
the dependency record (``dependencies_bytes`` long, `validity.Dependencies`),
then each bundled piece's bytes in the order and lengths the manifest's
``bundle`` lists.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from . import _core

__all__ = ["ENTRY_MAGIC", "MAX_VARIANTS", "Entry", "EntryRefused", "entry_manifest", "pack", "unpack"]

#: Version 2: entries record what their trace depended on; version 1 entries are never run.
ENTRY_MAGIC = b"ISOCMODEL2\n"
#: Entries of one slot (model class, inputs, namespace) kept side by side: the slot's own and the
#: variants its manifest lists (``others``), where configurations or recorded values differ.
MAX_VARIANTS = 8


class EntryRefused(_core.CacheError):
    """A saved entry that cannot be used here (changed model, missing piece, foreign data)."""


def pack(
    manifest: dict[str, Any], compiled: bytes, dependencies: bytes, bundle: dict[str, tuple[bytes, float]]
) -> bytes:
    listed = [[digest, len(payload), seconds] for digest, (payload, seconds) in bundle.items()]
    head = json.dumps(
        dict(manifest, compiled_bytes=len(compiled), dependencies_bytes=len(dependencies), bundle=listed),
        sort_keys=True,
    ).encode()
    return b"".join(
        [ENTRY_MAGIC, len(head).to_bytes(4, "little"), head, compiled, dependencies, *(p for p, _ in bundle.values())]
    )


def entry_manifest(data: bytes) -> dict[str, Any] | None:
    """The JSON manifest at the head of a saved model entry (nothing unpickled), or None if `data` is not one."""
    try:
        return unpack(data).manifest
    except (EntryRefused, ValueError):
        return None


@dataclasses.dataclass
class Entry:
    """A saved entry's parts (see the module docstring for the layout)."""

    manifest: dict[str, Any]
    compiled: bytes  # torch's saved compiled function
    dependencies: bytes  # `validity.Dependencies.to_bytes`
    bundle: dict[str, tuple[bytes, float]]  # digest -> (piece, compile seconds)


def unpack(data: bytes) -> Entry:
    if not data.startswith(ENTRY_MAGIC):
        if data.startswith(ENTRY_MAGIC[:-2]):
            raise EntryRefused("it was saved by an older isocache, without the record of what it depends on")
        raise EntryRefused("not an isocache model entry")
    view = memoryview(data)
    start = len(ENTRY_MAGIC)
    size = int.from_bytes(view[start : start + 4], "little")
    manifest = json.loads(bytes(view[start + 4 : start + 4 + size]))
    if not isinstance(manifest, dict):
        raise EntryRefused("the entry's manifest is not a JSON object")
    at = start + 4 + size
    end = at + int(manifest.get("compiled_bytes", len(data) - at))
    compiled = bytes(view[at:end])
    at, end = end, end + int(manifest.get("dependencies_bytes", 0))
    dependencies = bytes(view[at:end])
    bundle: dict[str, tuple[bytes, float]] = {}
    for digest, length, seconds in manifest.get("bundle", []):
        bundle[str(digest)] = (bytes(view[end : end + int(length)]), float(seconds))
        end += int(length)
    if end != len(data):
        raise EntryRefused("the entry's length does not match its manifest")
    return Entry(manifest, compiled, dependencies, bundle)
