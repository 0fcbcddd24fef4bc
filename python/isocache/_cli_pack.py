"""``python -m isocache pack -o FILE`` and ``unpack FILE``: a store in one archive, for a fleet.

The archive is an uncompressed tar (standard library only) of

    isocache-pack/blobs/<hex>    distinct byte strings, each named by the BLAKE3 of its bytes
    isocache-pack/MANIFEST       (last) the manifest (JSON) as a checked artifact image (`_core.pack_artifact`:
                                 its BLAKE3 checksum, and with ``ISOCACHE_KEY`` its keyed BLAKE3 signature)

The manifest lists every artifact (namespace, digest, kind, compile seconds,
the BLAKE3 and length of its payload, and the blobs whose concatenation is the
payload) and each namespace's recorded description. A saved model's entry is
cut where its bundled pieces begin, so each distinct piece is held once.
``pack`` holds one artifact in memory at a time and renames the finished
archive into place.

``unpack`` reads the whole archive before it writes anything: every member a
regular file with one of the names above (an absolute path, ``..``, a link, a
device or a directory is refused), every size bounded and equal to what the
manifest says, the manifest's checksum (and, with a key, its signature by that
key), every blob's BLAKE3 and every payload's. Then it publishes each artifact
through the store's own atomic put (temp file, fsync, rename), checking each
payload again as it goes, so processes using the store meanwhile see whole
artifacts or none; artifacts the store already holds are left as they are.
Neither command imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import tarfile
from typing import IO, Any, Literal, cast

from . import _core, config
from ._cli_common import UsageError, emit, size
from .entry import unpack as unpack_entry

__all__ = ["pack_arguments", "pack_command", "unpack_arguments", "unpack_command"]

PREFIX = "isocache-pack/"
MANIFEST = PREFIX + "MANIFEST"
FORMAT = "isocache-pack"
VERSION = 1
#: The digest the manifest's image is checked against (a fixed name: the image carries the checksum).
MANIFEST_DIGEST = _core.blake3_hex(b"isocache pack manifest v1")
#: Bounds on what is read from an archive: the store's largest payload, a manifest, a member count.
MAX_BLOB = 4 << 30
MAX_MANIFEST = 256 << 20
MAX_MEMBERS = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_BLOB = re.compile(re.escape(PREFIX) + r"blobs/[0-9a-f]{64}")


class BadArchive(_core.CacheError):
    """An archive that is damaged, truncated, altered or not an isocache archive: nothing is written."""


def pack_arguments(pack: argparse.ArgumentParser) -> None:
    """``pack``'s own options (``--dir``/``--json`` come from the command line's one grammar)."""
    pack.add_argument("-o", "--output", required=True, help="the archive to write")
    pack.add_argument(
        "--namespace", action="append", default=None, help="only this namespace (repeat for more; default: all)"
    )
    pack.add_argument(
        "--models-only", action="store_true", help="only saved models (isocache.compile) and the pieces they name"
    )


def unpack_arguments(unpack: argparse.ArgumentParser) -> None:
    """``unpack``'s own argument: the archive."""
    unpack.add_argument("archive", help="the archive `pack` wrote")


# -- pack ----------------------------------------------------------------------


def _parts(payload: bytes, kind: str) -> tuple[list[bytes], set[str]]:
    """A payload cut into blobs (a saved model's entry where each bundled piece begins, else whole), and
    the pieces a saved model names (compiled and bundled)."""
    try:
        entry = unpack_entry(payload) if kind == "model" else None
    except (_core.CacheError, ValueError):
        entry = None
    if entry is None:
        return [payload], set()
    pieces = [p for p, _ in entry.bundle.values()]
    head = len(payload) - sum(len(p) for p in pieces)
    return [payload[:head], *pieces], {str(d) for d in entry.manifest.get("pieces", [])} | set(entry.bundle)


def _chosen(root: str, wanted: list[str] | None) -> list[str]:
    found = _core.list_namespaces(root)
    if wanted is None:
        return found
    missing = [ns for ns in wanted if ns not in found]
    if missing:
        raise UsageError(f"{missing[0]!r} is not a namespace of {root} (namespaces: {', '.join(found) or 'none'})")
    return list(dict.fromkeys(wanted))


def pack_command(args: argparse.Namespace) -> int:
    key = config.current().key
    artifacts: list[dict[str, Any]] = []
    namespaces: dict[str, dict[str, Any]] = {}
    skipped = 0
    with _Writer(args.output) as writer:
        for ns in _chosen(args.dir, args.namespace):
            store = _core.Store(args.dir, ns, key, create=False)
            namespaces[ns] = {"description": store.description()}
            packed, bad = _pack_namespace(store, args.models_only, writer)
            artifacts += packed
            skipped += bad
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "isocache": _core.__version__,
            "store_format": _core.STORE_FORMAT_VERSION,
            "signed": key is not None,
            "namespaces": namespaces,
            "blobs": writer.blobs,
            "artifacts": artifacts,
        }
        written = writer.finish(manifest, key)
    kinds = {k: sum(a["kind"] == k for a in artifacts) for k in ("piece", "model")}
    data = {
        "archive": os.path.abspath(args.output),
        "bytes": written,
        "artifacts": len(artifacts),
        "pieces": kinds["piece"],
        "models": kinds["model"],
        "blobs": len(writer.blobs),
        "namespaces": sorted(namespaces),
        "signed": key is not None,
        "skipped_bad": skipped,
    }
    text = (
        f"packed {len(artifacts)} artifacts ({kinds['piece']} pieces, {kinds['model']} models) of "
        f"{len(namespaces)} namespaces into {args.output}: {size(written)}, {len(writer.blobs)} distinct blobs"
        + (", signed with ISOCACHE_KEY" if key is not None else ", unsigned (no ISOCACHE_KEY)")
        + (f"; {skipped} bad artifacts left out (`python -m isocache verify`)" if skipped else "")
    )
    emit(args, data, text)
    return 0


def _pack_namespace(store: _core.Store, models_only: bool, writer: _Writer) -> tuple[list[dict[str, Any]], int]:
    """Writes one namespace's artifacts (one in memory at a time): their manifest entries, and how many
    failed their check (left out)."""
    found = {o.digest.hex: o for o in store.objects()}
    wanted = sorted(d for d, o in found.items() if not models_only or o.kind == "model")
    artifacts: list[dict[str, Any]] = []
    named: set[str] = set()

    def add(digest: str) -> bool:
        looked = store.get_checked(digest)
        if looked.status != "hit" or looked.payload is None:
            return False
        payload, kind = looked.payload, looked.kind or "piece"
        parts, names = _parts(payload, kind)
        named.update(names if models_only else ())
        entry: dict[str, Any] = {"namespace": store.namespace, "digest": digest, "kind": kind}
        entry.update(compile_seconds=looked.compile_seconds, size=len(payload), blake3=_core.blake3_hex(payload))
        artifacts.append(dict(entry, parts=[writer.blob(part) for part in parts]))
        return True

    skipped = sum(not add(digest) for digest in wanted)
    for digest in sorted((named & set(found)) - set(wanted)):
        add(digest)
    return artifacts, skipped


def _member(name: str, length: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = length, 0o644, 0, tarfile.REGTYPE
    return info


class _Writer:
    """An archive written beside its final path (each distinct blob once, as it comes; the manifest
    last) and renamed into place by `finish`: never a partial archive."""

    def __init__(self, path: str) -> None:
        folder, name = os.path.split(os.path.abspath(path))
        self.final = path
        self.tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        self.blobs: dict[str, int] = {}
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish or __exit__)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if not self._file.closed:
            self._tar.close()
            self._file.close()
        if kind is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    def blob(self, data: bytes) -> str:
        name = _core.blake3_hex(data)
        if name not in self.blobs:
            self._tar.addfile(_member(f"{PREFIX}blobs/{name}", len(data)), io.BytesIO(data))
            self.blobs[name] = len(data)
        return name

    def finish(self, manifest: dict[str, Any], key: bytes | None) -> int:
        """Adds the manifest (checksummed, signed with `key`), syncs and renames; the archive's size."""
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        image = _core.pack_artifact(MANIFEST_DIGEST, text, key=key)
        self._tar.addfile(_member(MANIFEST, len(image)), io.BytesIO(image))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        return os.path.getsize(self.final)


# -- unpack --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Artifact:
    namespace: str
    digest: str
    kind: str
    compile_seconds: float
    size: int
    blake3: str
    parts: tuple[str, ...]


@dataclasses.dataclass
class _Verified:
    """A whole archive checked: its artifacts, namespaces, and where each blob's bytes are in the file."""

    artifacts: list[_Artifact]
    namespaces: dict[str, str | None]
    offsets: dict[str, tuple[int, int]]


def _members(f: IO[bytes]) -> tuple[tarfile.TarInfo, list[tarfile.TarInfo]]:
    """The archive's manifest and blob members, each a plain regular file with a name of the format
    (else `BadArchive`)."""
    try:
        members: list[tarfile.TarInfo] = []
        with tarfile.open(fileobj=f, mode="r:") as tar:  # leaves `f` open
            for member in tar:
                if len(members) >= MAX_MEMBERS:
                    raise BadArchive(f"it has more than {MAX_MEMBERS} members")
                members.append(member)
    except (tarfile.TarError, EOFError) as e:
        raise BadArchive(f"it is damaged, truncated or not a tar archive ({e})") from None
    seen: set[str] = set()
    for m in members:
        shown = repr(m.name[:120])
        if os.path.isabs(m.name) or ".." in m.name.split("/"):
            raise BadArchive(f"its member {shown} is an absolute path or leaves the archive (..)")
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            what = "a link" if (m.issym() or m.islnk()) else "a device" if m.isdev() else "not a plain regular file"
            raise BadArchive(f"its member {shown} is {what}")
        if m.name != MANIFEST and not _BLOB.fullmatch(m.name):
            raise BadArchive(f"its member {shown} is not part of an isocache archive")
        if m.name in seen:
            raise BadArchive(f"its member {shown} appears twice")
        seen.add(m.name)
    if MANIFEST not in seen:
        raise BadArchive("it has no isocache manifest (truncated, or not an isocache archive)")
    last = max(members, key=lambda m: m.offset_data)
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if _read(f, end, 2 * tarfile.BLOCKSIZE, "the end-of-archive marker").count(0) != 2 * tarfile.BLOCKSIZE:
        raise BadArchive("it is truncated: its end-of-archive marker is missing")
    manifest = next(m for m in members if m.name == MANIFEST)
    return manifest, [m for m in members if m.name != MANIFEST]


def _read(f: IO[bytes], offset: int, length: int, what: str) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise BadArchive(f"it is truncated: {what} has {len(data)} of its {length} bytes")
    return data


def _manifest(f: IO[bytes], member: tarfile.TarInfo, key: bytes | None) -> dict[str, Any]:
    if member.size > MAX_MANIFEST:
        raise BadArchive(f"its manifest is {member.size} bytes, more than the limit of {MAX_MANIFEST}")
    image = _read(f, member.offset_data, member.size, "the manifest")
    try:
        text, _ = _core.unpack_artifact(MANIFEST_DIGEST, image, key)
    except _core.CorruptArtifactError as e:
        hint = " (packed without ISOCACHE_KEY, or with another key?)" if key is not None else ""
        raise BadArchive(f"its manifest fails its check: {e}{hint}") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise BadArchive(f"its manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadArchive("its manifest is not an isocache archive's")
    if manifest.get("version") != VERSION:
        raise BadArchive(f"it is of archive version {manifest.get('version')!r}; this isocache reads {VERSION}")
    return manifest


def _artifacts(manifest: dict[str, Any]) -> tuple[list[_Artifact], dict[str, str | None], dict[str, int]]:
    """The manifest's artifacts, namespaces and blob sizes, every field checked (else `BadArchive`)."""
    try:
        blobs = {str(k): int(v) for k, v in dict(manifest["blobs"]).items()}
        spaces = {str(k): v.get("description") for k, v in dict(manifest["namespaces"]).items()}
        listed = list(manifest["artifacts"])
        out = [
            _Artifact(
                str(a["namespace"]),
                str(a["digest"]),
                str(a["kind"]),
                float(a["compile_seconds"]),
                int(a["size"]),
                str(a["blake3"]),
                tuple(str(p) for p in a["parts"]),
            )
            for a in listed
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadArchive(f"its manifest is malformed ({type(e).__name__}: {e})") from None
    for name, length in blobs.items():
        if not _HEX64.fullmatch(name) or not 0 <= length <= MAX_BLOB:
            raise BadArchive(f"its manifest lists a bad blob {name[:70]!r} of {length} bytes")
    for ns, text in spaces.items():
        if not _NAMESPACE.fullmatch(ns) or ns in (".", "..") or not (text is None or isinstance(text, str)):
            raise BadArchive(f"its manifest lists a bad namespace {ns[:140]!r}")
    for a in out:
        problem = _artifact_problem(a, spaces, blobs)
        if problem is not None:
            raise BadArchive(f"its manifest lists a bad artifact {a.digest[:70]!r}: {problem}")
    return out, spaces, blobs


def _artifact_problem(a: _Artifact, spaces: dict[str, str | None], blobs: dict[str, int]) -> str | None:
    if a.namespace not in spaces:
        return f"namespace {a.namespace[:140]!r} is not listed"
    if not (_HEX64.fullmatch(a.digest) and _HEX64.fullmatch(a.blake3)):
        return "not a digest"
    if a.kind not in ("piece", "model"):
        return f"kind {a.kind[:20]!r}"
    if not (math.isfinite(a.compile_seconds) and a.compile_seconds >= 0):
        return f"compile seconds {a.compile_seconds}"
    if any(p not in blobs for p in a.parts):
        return "a part that is not a listed blob"
    if not 0 <= a.size <= MAX_BLOB or sum(blobs[p] for p in a.parts) != a.size:
        return "its parts do not add up to its size"
    return None


def verify_archive(f: IO[bytes], key: bytes | None) -> _Verified:
    """Checks the whole archive open in `f` (see the module docstring); `BadArchive` names the first problem."""
    manifest_member, members = _members(f)
    manifest = _manifest(f, manifest_member, key)
    artifacts, spaces, blobs = _artifacts(manifest)
    offsets: dict[str, tuple[int, int]] = {}
    for m in members:
        name = m.name[len(PREFIX) + len("blobs/") :]
        if name not in blobs:
            raise BadArchive(f"its member {m.name!r} is not in its manifest")
        if m.size != blobs[name]:
            raise BadArchive(f"its blob {name[:16]} is {m.size} bytes; the manifest says {blobs[name]}")
        if _core.blake3_hex(_read(f, m.offset_data, m.size, f"blob {name[:16]}")) != name:
            raise BadArchive(f"its blob {name[:16]} was altered (its BLAKE3 does not match its name)")
        offsets[name] = (m.offset_data, m.size)
    missing = set(blobs) - set(offsets)
    if missing:
        raise BadArchive(f"it is truncated or incomplete: {len(missing)} blobs its manifest lists are missing")
    for a in artifacts:
        _payload(f, a, offsets)
    return _Verified(artifacts, spaces, offsets)


def _payload(f: IO[bytes], a: _Artifact, offsets: dict[str, tuple[int, int]]) -> bytes:
    payload = b"".join(_read(f, *offsets[p], f"blob {p[:16]}") for p in a.parts)
    if _core.blake3_hex(payload) != a.blake3:
        raise BadArchive(f"artifact {a.digest[:16]} does not match its BLAKE3")
    return payload


def unpack_command(args: argparse.Namespace) -> int:
    key = config.current().key
    try:
        f = open(args.archive, "rb")  # noqa: SIM115 (held through both passes)
    except OSError as e:
        raise UsageError(f"cannot read {args.archive}: {e.strerror or e}") from None
    with f:
        try:
            verified = verify_archive(f, key)
        except BadArchive as e:
            raise BadArchive(f"refusing {args.archive}: {e}; nothing was written") from None
        added, present = _publish(f, verified, args.dir, key)
    kinds = {k: sum(a.kind == k for a in verified.artifacts) for k in ("piece", "model")}
    data = {
        "dir": args.dir,
        "artifacts": len(verified.artifacts),
        "pieces": kinds["piece"],
        "models": kinds["model"],
        "added": added,
        "already_present": present,
        "namespaces": sorted(verified.namespaces),
    }
    text = (
        f"unpacked {len(verified.artifacts)} artifacts ({kinds['piece']} pieces, {kinds['model']} models) of "
        f"{len(verified.namespaces)} namespaces into {args.dir}: {added} added, {present} already there"
    )
    emit(args, data, text)
    return 0


def _publish(f: IO[bytes], verified: _Verified, root: str, key: bytes | None) -> tuple[int, int]:
    """Adds each verified artifact through the store's atomic put; (added, already present)."""
    added = present = 0
    stores: dict[str, _core.Store] = {}
    for ns, description in verified.namespaces.items():
        stores[ns] = store = _core.Store(root, ns, key)
        if description is not None and store.description() is None:
            store.describe(description)
    for a in sorted(verified.artifacts, key=lambda a: a.kind == "model"):  # pieces before the models naming them
        store = stores[a.namespace]
        if store.get_checked(a.digest).status == "hit":
            present += 1
            continue
        try:
            payload = _payload(f, a, verified.offsets)
        except BadArchive as e:
            raise BadArchive(
                f"the archive changed while it was unpacked ({e}); {added} whole artifacts were added"
            ) from None
        store.put(a.digest, payload, a.compile_seconds, kind=cast(Literal["piece", "model"], a.kind))
        added += 1
    return added, present
