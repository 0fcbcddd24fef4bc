"""Fleet starts: `pack` / `unpack`, read-only base stores (``ISOCACHE_BASE``), a warm start in a fresh
container (another HOME, an empty local store, another working directory) from a base built elsewhere."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from isocache import _core, config
from isocache._cli_pack import MANIFEST
from isocache._torch import dynamo
from isocache.entry import pack as pack_entry
from isocache.tiers.base_store import BaseTier, Entries
from support import cli, read_only, tree

TESTS = Path(__file__).resolve().parent
KEY = "00112233445566778899aabbccddeeff"


def writable(root: Path) -> None:
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def d(n: int) -> str:
    return _core.blake3_hex(f"digest {n}".encode())


def small_store(root: Path, key: bytes | None = None) -> dict[str, bytes]:
    """Four pieces and a saved model bundling two of them, in namespace ``ns``; a second namespace."""
    store = _core.Store(root, "ns", key)
    pieces = {d(i): f"piece {i} ".encode() * 2000 for i in range(4)}
    for digest, payload in pieces.items():
        store.put(digest, payload, 1.5)
    bundle = {digest: (pieces[digest], 1.5) for digest in (d(0), d(1))}
    model = pack_entry({"pieces": [d(0), d(1), d(0)]}, b"compiled function" * 100, b"deps", bundle)
    store.put(d(9), model, 4.0, kind="model")
    store.describe('{"torch": "x"}')
    _core.Store(root, "other", key).put(d(5), b"other namespace", 0.5)
    return {**pieces, d(9): model}


def contents(root: Path, namespace: str = "ns", key: bytes | None = None) -> dict[str, tuple[bytes, float, str]]:
    store = _core.Store(root, namespace, key, create=False)
    out = {}
    for info in store.objects():
        found = store.get_checked(info.digest)
        assert found.payload is not None
        out[info.digest.hex] = (found.payload, found.compile_seconds, found.kind)
    return out


def test_pack_and_unpack_round_trip_each_distinct_piece_once(tmp_path: Path) -> None:
    built = small_store(tmp_path / "built")
    archive = tmp_path / "cache.tar"
    packed = cli("pack", "--dir", str(tmp_path / "built"), "-o", str(archive), "--json")
    assert packed.returncode == 0, packed.stderr
    report = json.loads(packed.stdout)
    assert (report["pieces"], report["models"], report["namespaces"]) == (5, 1, ["ns", "other"])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        blobs = [tar.extractfile(n).read() for n in names[:-1]]  # type: ignore[union-attr]
    assert names[-1] == MANIFEST and len(blobs) == len(set(blobs)) == report["blobs"] == 6
    # The model's bundled pieces are the pieces' own blobs: each distinct piece is in the archive once.
    for payload in (built[d(0)], built[d(1)]):
        assert blobs.count(payload) == 1

    out = tmp_path / "elsewhere"
    unpacked = cli("unpack", str(archive), "--dir", str(out), "--json")
    assert unpacked.returncode == 0, unpacked.stderr
    assert json.loads(unpacked.stdout)["added"] == 6
    assert contents(out) == contents(tmp_path / "built")
    assert contents(out, "other") == {d(5): (b"other namespace", 0.5, "piece")}
    assert _core.Store(out, "ns", create=False).description() == '{"torch": "x"}'
    again = json.loads(cli("unpack", str(archive), "--dir", str(out), "--json").stdout)
    assert (again["added"], again["already_present"]) == (0, 6)

    only = tmp_path / "models.tar"
    assert (
        cli("pack", "--dir", str(tmp_path / "built"), "-o", str(only), "--models-only", "--namespace", "ns").returncode
        == 0
    )
    cli("unpack", str(only), "--dir", str(tmp_path / "models"))
    assert sorted(contents(tmp_path / "models")) == sorted([d(0), d(1), d(9)])
    assert not (tmp_path / "models" / "v1" / "other").exists()
    bad = cli("pack", "--dir", str(tmp_path / "built"), "-o", str(only), "--namespace", "nope")
    assert bad.returncode == 2 and "not a namespace" in bad.stderr
    # Neither command imports torch.
    code = (
        "import sys; from isocache.__main__ import main; "
        f"main(['pack', '--dir', {str(tmp_path / 'built')!r}, '-o', {str(only)!r}]); "
        f"main(['unpack', {str(only)!r}, '--dir', {str(tmp_path / 'again')!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert light.returncode == 0, light.stderr


def _rewrite(archive: Path, out: Path, change: Any) -> None:
    """`archive`'s members through `change(info, data) -> [(info, data), ...]` into `out`."""
    with tarfile.open(archive) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isreg() else b""  # type: ignore[union-attr]
            for new_info, new_data in change(info, data):
                dst.addfile(new_info, io.BytesIO(new_data) if new_info.isreg() else None)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _extra(kind: bytes, name: str, target: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return [(info, b"")]


def _nested(info: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    if info.name == MANIFEST:
        return []
    copy = tarfile.TarInfo(info.name.replace("blobs/", "blobs/x/"))
    copy.size = len(data)
    return [(copy, data)]


def test_unpack_refuses_damaged_or_hostile_archives_and_writes_nothing(tmp_path: Path) -> None:
    small_store(tmp_path / "built")
    archive = tmp_path / "cache.tar"
    assert cli("pack", "--dir", str(tmp_path / "built"), "-o", str(archive)).returncode == 0
    raw = archive.read_bytes()
    target = tmp_path / "target"
    small_store(target)  # an existing store, which a refused archive leaves as it was
    before = tree(target)
    cases: dict[str, Path] = {}
    for n, cut in enumerate((100, 1500, len(raw) // 2, len(raw.rstrip(b"\0")) + 10)):
        cases[f"truncated at {cut}"] = tmp_path / f"cut{n}.tar"
        cases[f"truncated at {cut}"].write_bytes(raw[:cut])
    piece = raw.find(b"piece 2 ")
    cases["a piece's byte changed"] = tmp_path / "flip.tar"
    cases["a piece's byte changed"].write_bytes(_flip(raw, piece + 5))
    manifest = raw.find(b'"artifacts"')
    cases["the manifest changed"] = tmp_path / "manifest.tar"
    cases["the manifest changed"].write_bytes(_flip(raw, manifest + 3))
    cases["not a tar"] = tmp_path / "garbage.tar"
    cases["not a tar"].write_bytes(b"\x00garbage" * 1000)
    hostile = {
        "a symbolic link": lambda: _extra(tarfile.SYMTYPE, "isocache-pack/blobs/" + "a" * 64, "/etc/passwd"),
        "a hard link": lambda: _extra(tarfile.LNKTYPE, "isocache-pack/blobs/" + "b" * 64, MANIFEST),
        "a device": lambda: _extra(tarfile.CHRTYPE, "isocache-pack/blobs/" + "c" * 64),
        "an absolute path": lambda: _extra(tarfile.REGTYPE, "/isocache-pack/x"),
        "a path with ..": lambda: _extra(tarfile.REGTYPE, "isocache-pack/../../x"),
        "a directory": lambda: _extra(tarfile.DIRTYPE, "isocache-pack/blobs"),
    }
    for what, extra in hostile.items():
        cases[what] = tmp_path / f"{what.replace(' ', '_')}.tar"
        _rewrite(
            archive,
            cases[what],
            lambda info, data, extra=extra: [(info, data), *(extra() if info.name == MANIFEST else [])],
        )
    cases["a member in a folder of its own"] = tmp_path / "nested.tar"
    _rewrite(archive, cases["a member in a folder of its own"], lambda i, data: [(i, data), *_nested(i, data)])
    cases["no manifest"] = tmp_path / "no-manifest.tar"
    _rewrite(archive, cases["no manifest"], lambda i, data: [] if i.name == MANIFEST else [(i, data)])
    cases["a blob replaced by another"] = tmp_path / "swap.tar"
    _rewrite(archive, cases["a blob replaced by another"], lambda i, data: [(i, data.replace(b"piece 3", b"piece 1"))])
    for what, path in cases.items():
        for out in (target, tmp_path / "fresh"):
            r = cli("unpack", str(path), "--dir", str(out))
            assert r.returncode == 1, (what, r.stdout, r.stderr)
            assert "refusing" in r.stderr and "nothing was written" in r.stderr, (what, r.stderr)
        assert tree(target) == before, what
        assert not (tmp_path / "fresh").exists(), what
    assert cli("unpack", str(archive), "--dir", str(tmp_path / "fresh")).returncode == 0  # the original is fine


def test_a_signed_archive_needs_its_key(tmp_path: Path) -> None:
    key = config.parse_key(KEY)
    small_store(tmp_path / "built", key)
    signed, plain = tmp_path / "signed.tar", tmp_path / "plain.tar"
    assert cli("pack", "--dir", str(tmp_path / "built"), "-o", str(signed), env={"ISOCACHE_KEY": KEY}).returncode == 0
    small_store(tmp_path / "unsigned")
    assert cli("pack", "--dir", str(tmp_path / "unsigned"), "-o", str(plain)).returncode == 0
    other = {"ISOCACHE_KEY": "ff" * 16}
    r = cli("unpack", str(signed), "--dir", str(tmp_path / "x"), env=other)
    assert r.returncode == 1 and "signature" in r.stderr and not (tmp_path / "x").exists()
    r = cli("unpack", str(plain), "--dir", str(tmp_path / "x"), env={"ISOCACHE_KEY": KEY})
    assert r.returncode == 1 and "not signed" in r.stderr and not (tmp_path / "x").exists()
    assert cli("unpack", str(signed), "--dir", str(tmp_path / "x"), env={"ISOCACHE_KEY": KEY}).returncode == 0
    assert len(contents(tmp_path / "x", key=key)) == 5  # signed with the key as they were written


def test_unpacking_onto_a_store_in_use_shows_readers_only_whole_artifacts(tmp_path: Path) -> None:
    built = small_store(tmp_path / "built")
    archive = tmp_path / "cache.tar"
    assert cli("pack", "--dir", str(tmp_path / "built"), "-o", str(archive)).returncode == 0
    target = tmp_path / "target"
    store = _core.Store(target, "ns")
    store.put(d(7), b"already here", 2.0)
    stop, seen, bad = threading.Event(), set(), []

    def read() -> None:
        reader = _core.Store(target, "ns", create=False)
        while not stop.is_set():
            for digest, payload in built.items():
                found = reader.get_checked(digest)
                if found.status == "hit":
                    seen.add(digest)
                    if found.payload != payload:
                        bad.append(digest)
                elif found.status == "corrupt":
                    bad.append(digest)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert cli("unpack", str(archive), "--dir", str(target)).returncode == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad and store.get_checked(d(7)).payload == b"already here"
    assert set(contents(target)) == {*built, d(7)}


def test_base_tier_reads_and_never_writes(tmp_path: Path) -> None:
    built = small_store(tmp_path / "base")
    base_root = tmp_path / "base"
    bad = Path(_core.Store(base_root, "ns").object_path(d(3)))
    bad.write_bytes(_flip(bad.read_bytes(), 200))
    read_only(base_root)
    before = tree(base_root)
    assert BaseTier.open([tmp_path / "missing", base_root], "nowhere", None) is None
    tier = BaseTier.open([tmp_path / "missing", base_root], "ns", None)
    assert tier is not None
    hit = tier.get(d(0))
    assert hit is not None and (hit.value, hit.compile_seconds, hit.tier) == (built[d(0)], 1.5, "base")
    assert tier.get(d(3)) is None and tier.get(d(8)) is None  # a bad artifact is a miss, left in place
    assert tier.contains(d(1)) and not tier.put(d(8), b"x", 1.0) and tier.lease(d(8), 0.0) is not None
    tier.discard(d(0))
    local = _core.Store(tmp_path / "local", "ns")
    from isocache.tiers.local import LocalTier

    entries = Entries(LocalTier(local), tier)
    found = entries.get(d(9))
    assert found is not None and found.value == built[d(9)]
    assert entries.put(d(9), b"saved here", 0.0, kind="model")
    assert local.get_checked(d(9)).payload == b"saved here"
    no_local = Entries(None, tier)  # no usable local store (a read-only HOME): the base still serves
    hit = no_local.get(d(9))
    assert hit is not None and hit.value == built[d(9)] and not no_local.put(d(9), b"x", 0.0, kind="model")
    assert tree(base_root) == before, "a base store is never written"
    assert tier.stats.snapshot()["hits"] == 3
    keyed = BaseTier.open([base_root], "ns", config.parse_key(KEY))
    assert keyed is not None and keyed.get(d(0)) is None, "with a key, unsigned artifacts are refused"
    assert tree(base_root) == before
    writable(base_root)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a reader as nobody")
def test_a_root_owned_base_serves_another_user(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="isocache-base-"))  # /tmp: its parents let another user reach it
    try:
        folder.chmod(0o755)
        built = small_store(folder / "base")
        writable(folder / "base")  # readable by all, written by root only
        # Loaded as root, then run as nobody (the interpreter itself may live where nobody can read).
        code = textwrap.dedent(
            f"""
            import json, os
            from isocache import _core
            os.setegid(65534)
            os.seteuid(65534)
            base = _core.Store({str(folder / "base")!r}, "ns", create=False, base=True)
            try:
                _core.Store({str(folder / "base")!r}, "ns", create=False)
                own = "accepted"
            except _core.InsecureStoreError as e:
                own = str(e)
            print(json.dumps(dict(payload=base.get_checked({d(0)!r}).payload.decode(), own=own, uid=os.geteuid())))
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ, cwd=folder
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["uid"] == 65534 and r["payload"] == built[d(0)].decode()
        assert "owned by uid 0, not by you" in r["own"], "as a store of its own it is refused"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- a warm start in a fresh container ----------------------------------------------------------

BUILD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from support import MODELS, token_ids
    import isocache
    model, ids = MODELS["llama"](2), token_ids()
    with torch.no_grad():
        isocache.compile(model)(ids)  # the saved model
        torch.compile(MODELS["llama"](2), backend=isocache.Backend())(ids)  # its pieces, as the backend cuts them
    print(json.dumps(isocache.stats()))
    """
)

READ = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.path.insert(0, {tests!r})
    from support import MODELS, reset_process_state, token_ids
    import isocache
    from torch._dynamo.utils import counters
    ids, out = token_ids(), {{}}
    with torch.no_grad():
        model = MODELS["llama"](2)
        expected = model(ids).last_hidden_state
        compiled = isocache.compile(model)
        err = (compiled(ids).last_hidden_state - expected).abs().max().item()
        out["compile"] = dict(isocache.stats(), err=err, frames=counters["stats"]["unique_graphs"])
        backend = compiled._backend
        base = backend.base(backend.namespace_for(ids.device))
        out["compile"]["base"] = base.stats.snapshot() if base is not None else None
        reset_process_state()  # as another process: nothing in memory
        backend = isocache.Backend()
        err = (torch.compile(MODELS["llama"](2), backend=backend)(ids).last_hidden_state - expected).abs().max().item()
        base = backend.base(backend.namespace_for(ids.device))
        out["backend"] = dict(isocache.stats(), err=err, base=base.stats.snapshot() if base is not None else None)
    print(json.dumps(out))
    """
)


def _container(home: Path, work: Path, base: Path) -> dict[str, str]:
    """A fresh container's environment: its own HOME (an empty local store under it) and Inductor cache,
    nothing of isocache's set but the base store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISOCACHE_", "XDG_", "TORCHINDUCTOR_"))}
    home.mkdir(mode=0o700, parents=True)
    work.mkdir(parents=True)
    return {
        **env,
        "HOME": str(home),
        "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor"),
        "ISOCACHE_BASE": str(base),
        "ISOCACHE_COMPILE_WORKERS": "0",
    }


def _mount_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount --bind /tmp /tmp"], capture_output=True
    )
    return probe.returncode == 0


def _run(code: str, env: dict[str, str], cwd: Path, read_only_mount: Path | None = None) -> dict[str, Any]:
    """`code` in a fresh interpreter; under `read_only_mount`, with that directory mounted read-only
    (a user and mount namespace: any write to it fails with EROFS)."""
    argv = [sys.executable, "-c", code]
    if read_only_mount is not None:
        ro = str(read_only_mount)
        mount = f'mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && exec "$0" -c "$1"'
        argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, *argv[:1], code]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def test_a_fresh_container_starts_warm_from_a_packed_read_only_base(tmp_path: Path) -> None:
    # Machine one builds the cache (in CI) and packs it.
    built = tmp_path / "ci" / "cache"
    env = {
        **_container(tmp_path / "ci" / "home", tmp_path / "ci" / "work", tmp_path / "none"),
        "ISOCACHE_DIR": str(built),
    }
    del env["ISOCACHE_BASE"]
    first = _run(BUILD.format(tests=str(TESTS)), env, tmp_path / "ci" / "work")
    assert first["compiled"] >= 3
    archive = tmp_path / "cache.tar"
    assert cli("pack", "--dir", str(built), "-o", str(archive)).returncode == 0

    # A tampered copy is refused whole; the real one is unpacked into the image, read-only (owned by
    # root when the tests run as root, as in an image built by root).
    raw = archive.read_bytes()
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(archive) as tar:
        piece = max(tar.getmembers(), key=lambda m: m.size if m.name != MANIFEST else 0)  # a blob's bytes
    tampered.write_bytes(_flip(raw, piece.offset_data + piece.size // 2))
    base = tmp_path / "image" / "opt" / "isocache-base"
    r = cli("unpack", str(tampered), "--dir", str(base))
    assert r.returncode == 1 and "nothing was written" in r.stderr and not base.exists()
    assert cli("unpack", str(archive), "--dir", str(base)).returncode == 0
    assert base.stat().st_uid == os.geteuid()
    read_only(base)
    before = tree(base)

    # Machine two: a fresh container (new HOME, empty local store, another working directory).
    ro_mount = base if _mount_namespaces_work() else None
    env = _container(tmp_path / "pod" / "home", tmp_path / "pod" / "work", base)
    r = _run(READ.format(tests=str(TESTS)), env, tmp_path / "pod" / "work", read_only_mount=ro_mount)
    compiled, backend = r["compile"], r["backend"]
    assert compiled["err"] < 1e-4 and backend["err"] < 1e-4
    assert compiled["compiled"] == 0 and compiled["loaded"] >= 3
    if dynamo.aot_compile_supported():  # (older torch: isocache.compile traces, and loads pieces from the base)
        assert compiled["frames"] == 0 and compiled["models_loaded"] == 1, "the saved model loaded without tracing"
        assert compiled["base"]["hits"] == 1, "the saved model came from the base store"
    assert backend["compiled"] == 0 and backend["loaded"] >= 3, "the backend loaded every piece"
    assert backend["base"]["hits"] == backend["loaded"] and backend["base"]["errors"] == 0
    assert "isocache:" not in "".join(line for line in r["stderr"].splitlines() if "WARNING" in line)
    assert tree(base) == before, "the base store was not written"
    local = tmp_path / "pod" / "home" / ".cache" / "isocache"
    assert not [p for p in local.rglob("*") if p.is_file() and p.parent.parent.name == "objects"], (
        "nothing was copied from the base store into the local store"
    )
    writable(base)


def test_isocache_base_is_parsed_in_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ISOCACHE_BASE", os.pathsep.join([str(a), "", "b", str(a), " "]))
    assert config.current().base == (a, b)
    monkeypatch.setenv("ISOCACHE_BASE", os.pathsep.join(str(tmp_path / str(i)) for i in range(20)))
    assert len(config.current().base) == config.MAX_BASE_DIRS
    assert "more than 16 stores" in caplog.text
    monkeypatch.delenv("ISOCACHE_BASE")
    assert config.current().base == ()
