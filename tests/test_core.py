"""The Rust core's Python surface: Store, Index, errors and stubs."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import isocache
from isocache import _core
from isocache.tiers.local import read_payload

D1 = "a" * 64
D2 = "0123456789abcdef" * 4


def test_errors_share_one_base() -> None:
    for exc in (_core.InvalidDigestError, _core.InvalidKeyError, _core.StoreError, _core.InsecureStoreError):
        assert issubclass(exc, isocache.CacheError)
    assert issubclass(_core.InsecureStoreError, _core.StoreError)
    assert isocache.CacheError is _core.CacheError


def test_store_round_trip(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c", namespace="ns")
    assert store.get_checked(D1).payload is None and D1 not in store
    store.put(D1, b"artifact", compile_seconds=2.5)
    found = store.get_checked(D1)
    assert (found.payload, found.compile_seconds) == (b"artifact", 2.5)
    assert D1 in store and store.contains(D1)
    assert Path(store.object_path(D1)).parent.name == D1[:2]
    assert [d for d, *_ in store.list()] == [D1]
    assert store.remove(D1) and not store.remove(D1)
    assert store.get_checked(D1).payload is None


def test_store_defaults_to_isocache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_DIR", str(tmp_path / "from_env"))
    store = _core.Store()
    assert Path(store.root) == tmp_path / "from_env"
    assert (tmp_path / "from_env" / "v1" / "default").is_dir()
    assert os.stat(tmp_path / "from_env").st_mode & 0o777 == 0o700


def test_bad_digest_is_a_clear_error(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c")
    for bad in ("xyz", D1.upper(), "g" * 64):
        with pytest.raises(_core.InvalidDigestError, match="64 lowercase hex"):
            store.put(bad, b"x")
    with pytest.raises(isocache.CacheError, match="namespace"):
        _core.Store(tmp_path / "c", namespace="../escape")


def test_corrupt_file_is_a_miss_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path / "c")
    store.put(D1, b"x" * 1000)
    path = Path(store.object_path(D1))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_payload(store, D1) is None
    assert store.quarantined == 1
    assert not path.exists()
    assert list((Path(store.path) / "quarantine").iterdir())
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "checksum" in msgs[0] and D1 in msgs[0]


def test_insecure_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(_core.InsecureStoreError, match="chmod go-w"):
        _core.Store(root)


def test_signed_store_refuses_unsigned_artifacts(tmp_path: Path) -> None:
    plain = _core.Store(tmp_path / "c")
    signed = _core.Store(tmp_path / "c", key=b"a team secret of 16+ bytes")
    assert signed.signed and not plain.signed
    plain.put(D1, b"unsigned")
    assert signed.get_checked(D1).payload is None
    signed.put(D2, b"signed")
    assert signed.get_checked(D2).payload == b"signed"
    assert _core.Store(tmp_path / "c", key=b"another secret, 16+ bytes").get_checked(D2).payload is None


def test_short_keys_are_refused_with_a_way_out(tmp_path: Path) -> None:
    assert issubclass(_core.InvalidKeyError, isocache.CacheError)
    for short in (b"", b"secret", b"x" * 15):
        for call in (
            lambda short=short: _core.Store(tmp_path / "c", key=short),
            lambda short=short: _core.pack_artifact(D1, b"payload", key=short),
            lambda short=short: _core.unpack_artifact(D1, _core.pack_artifact(D1, b"payload"), key=short),
        ):
            with pytest.raises(_core.InvalidKeyError, match="at least 16 bytes") as info:
                call()
            assert "python -m isocache keygen" in str(info.value)
    key = b"k" * 16
    image = _core.pack_artifact(D1, b"payload", 1.5, key=key)
    assert _core.unpack_artifact(D1, image, key=key) == (b"payload", 1.5)


def test_key_fingerprint_is_short_stable_and_one_way() -> None:
    key = bytes(range(32))
    fp = _core.key_fingerprint(key)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert fp == _core.key_fingerprint(key)
    assert fp != _core.key_fingerprint(key[:-1] + b"\x00")
    assert fp not in key.hex()
    # Derived from the key stretched with Argon2id (rust/key.rs), first 8 bytes: pinned so that
    # machines running different isocache builds agree on Redis key prefixes.
    assert _core.key_fingerprint(b"0123456789abcdef") == "65b22e134c92148a"


def test_index_claim_publish_and_hits() -> None:
    index = _core.Index()
    assert index.get(D1) is None and len(index) == 0
    assert index.claim(D1)
    assert not index.claim(D1)
    entry = index.get(D1)
    assert entry is not None and entry.state == "compiling" and entry.value is None
    fn = lambda x: x + 1  # noqa: E731
    index.publish(D1, fn, compile_seconds=1.5)
    assert index.record_hit(D1) == 1
    entry = index.get(D1)
    assert entry is not None
    assert (entry.state, entry.value, entry.hits, entry.compile_seconds) == ("ready", fn, 1, 1.5)
    index.fail(D2, "inductor failed")
    failed = index.get(D2)
    assert failed is not None and failed.state == "failed" and failed.reason == "inductor failed"
    assert D1 in index and len(index.entries()) == 2
    index.clear()
    assert len(index) == 0


def test_index_one_compile_per_digest_across_threads() -> None:
    index = _core.Index()
    compiled: list[int] = []
    results: list[object] = []

    def worker(i: int) -> None:
        if index.claim(D1):
            time.sleep(0.05)  # a slow compile, while others wait
            compiled.append(i)
            index.publish(D1, f"callable-{i}")
        entry = index.wait(D1, 5.0)
        assert entry is not None
        results.append(entry.value)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiled) == 1
    assert results == [f"callable-{compiled[0]}"] * 8


def test_index_wait_returns_none_when_abandoned() -> None:
    index = _core.Index()
    assert index.claim(D1)
    timer = threading.Timer(0.05, index.abandon, args=(D1,))
    timer.start()
    assert index.wait(D1, 5.0) is None
    assert index.claim(D1), "an abandoned digest can be claimed again"


def test_canonical_target_names() -> None:
    import operator

    import torch

    assert _core.canonical_target(torch.ops.aten.add.Tensor) == "aten::add.Tensor"
    assert _core.canonical_target(operator.mul) == "_operator.mul"
    assert _core.canonical_target(torch.nn.functional.silu) == "torch.nn.functional.silu"
    with pytest.raises(isocache.CacheError, match="local function"):
        _core.canonical_target(lambda x: x)


@pytest.mark.static
def test_stubs_match_the_extension() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "isocache._core"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rust_core_never_logs() -> None:
    """Logging is the Python caller's: the core returns what happened (`Lookup`) and never reaches for `logging`."""
    rust = Path(__file__).resolve().parents[1] / "rust"
    assert [str(p) for p in rust.rglob("*.rs") if "logging" in p.read_text()] == []


@pytest.mark.static
def test_package_type_checks_strictly() -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the typed binding: Digest, Lookup, reports, kinds, the running size ----


def test_digest_is_a_frozen_hashable_value() -> None:
    d = _core.Digest.from_hex(D1)
    assert d.hex == str(d) == D1 and repr(d) == f"Digest('{D1}')"
    assert d == _core.Digest(D1) and hash(d) == hash(_core.Digest(D1))
    assert d != _core.Digest(D2) and d != D1, "a Digest equals a Digest, not its hex"
    assert sorted([_core.Digest(D2), d]) == sorted([d, _core.Digest(D2)])
    assert len({d, _core.Digest(D1), _core.Digest(D2)}) == 2
    assert pickle.loads(pickle.dumps(d)) == d
    with pytest.raises(AttributeError):
        d.hex = D2  # type: ignore[misc]
    for bad in ("xyz", D1.upper(), "g" * 64):
        with pytest.raises(_core.InvalidDigestError, match="64 lowercase hex"):
            _core.Digest.from_hex(bad)
    with pytest.raises(TypeError, match="Digest or its 64 hex characters"):
        _core.Index().get(1234)  # type: ignore[arg-type]


def test_index_and_store_take_a_digest_or_its_hex(tmp_path: Path) -> None:
    d = _core.Digest(D1)
    index = _core.Index()
    assert index.claim(d) and not index.claim(D1)
    entry = index.get(D1)
    assert entry is not None and entry.digest == d and entry.state == "compiling"
    index.publish(D1, "fn")
    assert d in index and index.record_hit(d) == 1
    store = _core.Store(tmp_path / "c", "ns")
    store.put(d, b"x")
    assert store.get_checked(D1).payload == b"x" and D1 in store and d in store
    assert store.object_path(d) == store.object_path(D1)
    image = _core.pack_artifact(d, b"p", 1.0)
    assert _core.unpack_artifact(D1, image) == (b"p", 1.0)


def test_paths_are_pathlib_paths(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c", "ns")
    assert isinstance(store.root, Path) and store.root == tmp_path / "c"
    assert isinstance(store.path, Path) and store.path == tmp_path / "c" / "v1" / "ns"
    assert store.object_path(D1) == store.path / "objects" / D1[:2] / D1


def test_get_checked_returns_a_typed_result_and_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    store = _core.Store(tmp_path / "c")
    miss = store.get_checked(D1)
    assert (miss.status, miss.payload, miss.kind, miss.corruption, miss.fate) == ("miss", None, None, None, None)
    store.put(D1, b"x" * 1000, compile_seconds=2.5)
    hit = store.get_checked(_core.Digest(D1))
    assert (hit.status, hit.payload, hit.compile_seconds, hit.kind) == ("hit", b"x" * 1000, 2.5, "piece")
    assert hit.digest == _core.Digest(D1) and hit.corruption is None
    path = store.object_path(D1)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    bad = store.get_checked(D1)
    assert (bad.status, bad.payload, bad.corruption, bad.fate) == ("corrupt", None, "checksum", "quarantined")
    assert bad.reason == "checksum mismatch"
    assert bad.quarantined_to is not None and bad.quarantined_to.parent == store.path / "quarantine"
    assert bad.quarantined_to.exists() and not path.exists()
    assert store.quarantined == 1
    assert caplog.records == [], "the caller reports it, not the binding"
    # Read-only: refused, left where it is.
    store.put(D2, b"y" * 10)
    p2 = store.object_path(D2)
    p2.write_bytes(p2.read_bytes()[:20])
    ro = _core.Store(tmp_path / "c", create=False).get_checked(D2)
    assert (ro.status, ro.corruption, ro.fate, ro.quarantined_to) == ("corrupt", "truncated", "left_in_place", None)


def test_corruption_kinds_are_a_closed_set(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c")
    cases = {
        "length": lambda b: b[:-1],
        "magic": lambda b: b"X" + b[1:],
        "version": lambda b: b[:8] + b"\x09" + b[9:],
    }
    for expected, damage in cases.items():
        store.put(D1, b"payload")
        path = store.object_path(D1)
        path.write_bytes(damage(path.read_bytes()))
        assert store.get_checked(D1).corruption == expected
    store.put(D1, b"payload")
    signed = _core.Store(tmp_path / "c", key=b"a team secret of 16+ bytes")
    assert signed.get_checked(D1).corruption == "unsigned"
    signed.put(D1, b"payload")
    other = _core.Store(tmp_path / "c", key=b"another secret, 16+ bytes")
    assert other.get_checked(D1).corruption == "signature"
    target = store.object_path(D2)
    target.parent.mkdir(exist_ok=True)
    target.symlink_to(tmp_path / "elsewhere")
    assert store.get_checked(D2).corruption == "symlink"
    image = _core.pack_artifact(D1, b"p")
    with pytest.raises(_core.CorruptArtifactError, match="another digest") as info:
        _core.unpack_artifact(D2, image)
    assert info.value.kind == "digest"


def test_model_entries_are_a_kind_the_store_knows(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c", "ns")
    store.put(D1, b"whole model", 3.0, kind="model")
    store.put(D2, b"a piece", 1.0)
    assert store.get_checked(D1).kind == "model" and store.get_checked(D2).kind == "piece"
    found = store.get_checked(D1)
    assert (found.payload, found.compile_seconds) == (b"whole model", 3.0), "a read returns it"
    kinds = {o.digest.hex: o.kind for o in store.objects()}
    assert kinds == {D1: "model", D2: "piece"}
    report = store.verify()
    assert (report.checked, report.pieces, report.models, report.bad) == (2, 1, 1, [])
    with pytest.raises(ValueError, match=r"piece.*model"):
        store.put(D1, b"x", kind="graph")  # type: ignore[arg-type]
    image = _core.pack_artifact(D1, b"m", kind="model")
    assert _core.unpack_artifact(D1, image) == (b"m", 0.0)


def test_reports_are_typed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = _core.Store(root, "ns")
    store.put(D1, b"x" * 100, 1.5)
    (info,) = store.objects()
    assert (info.namespace, info.digest, info.size, info.compile_seconds, info.kind) == (
        "ns",
        _core.Digest(D1),
        228,
        1.5,
        "piece",
    )
    assert store.list() == [(D1, 228, info.last_used, 1.5)], "the tuple form stays for older callers"
    store.record_usage(hits=2, misses=1, saved_seconds=3.0)
    usage = store.usage()
    assert (usage.hits, usage.misses, usage.saved_seconds, usage.remote_errors) == (2, 1, 3.0, 0)
    path = store.object_path(D1)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    report = store.verify()
    (bad,) = report.bad
    assert (bad.name, bad.digest, bad.corruption, bad.fate) == (D1, _core.Digest(D1), "checksum", None)
    fixed = store.verify(fix=True).bad[0]
    assert fixed.fate == "quarantined" and fixed.quarantined_to is not None and fixed.quarantined_to.exists()
    (q,) = store.quarantine()
    assert q.name.startswith(D1 + ".") and q.size == 228 and q.quarantined_at <= time.time()
    gc = store.gc(0)
    assert (gc.removed, gc.quarantine_removed, gc.freed_bytes, gc.remaining, gc.remaining_bytes) == (0, 1, 228, 0, 0)


def test_the_root_keeps_a_running_size(tmp_path: Path) -> None:
    root = tmp_path / "c"
    assert _core.root_size(root).bytes == 0, "no root: nothing, and nothing created"
    assert not root.exists()
    a, b = _core.Store(root, "a"), _core.Store(root, "b")
    a.put(D1, b"x" * 100)
    b.put(D2, b"y" * 200)
    size = _core.root_size(root)
    assert (size.bytes, size.artifacts) == (228 + 328, 2)
    assert a.root_size().bytes == b.root_size().bytes == size.bytes
    assert (root / "v1" / "size").is_file()
    b.remove(D2)
    assert _core.root_size(root).bytes == 228
    from isocache._maintenance import total_bytes

    assert total_bytes(root) == 228


def test_a_put_over_the_cap_evicts_least_recently_used_across_namespaces(tmp_path: Path) -> None:
    root = tmp_path / "c"
    a, b = _core.Store(root, "a"), _core.Store(root, "b")
    digests = [f"{i:064x}" for i in range(6)]
    for i, d in enumerate(digests[:5]):
        (a if i % 2 == 0 else b).put(d, b"z" * 872)  # 1000 bytes on disk
        os.utime((a if i % 2 == 0 else b).object_path(d), (1_000_000 + i, 1_000_000 + i))
    assert a.put(digests[5], b"z" * 872, max_bytes=6000) is None, "under the cap: nothing to do"
    report = b.put(f"{7:064x}", b"z" * 872, max_bytes=6000, kind="model")
    assert report is not None
    assert [(o.namespace, o.digest.hex) for o in report.evicted] == [("a", digests[0]), ("b", digests[1])]
    assert (report.removed, report.remaining, report.remaining_bytes) == (2, 5, 5000)
    assert _core.root_size(root).bytes == 5000
    gc = _core.gc_root(root, 3000)
    assert (gc.removed, gc.remaining_bytes) == (2, 3000)
    assert [o.digest.hex for o in gc.evicted] == [digests[2], digests[3]]
    assert _core.gc_root(tmp_path / "missing", 0).removed == 0


def test_a_factory_made_function_published_under_its_name_is_named_by_it() -> None:
    import torch.nn.functional as F

    # `max_pool2d` is `boolean_dispatch(...)`'s local `fn`, published as torch.nn.functional.max_pool2d.
    assert "<locals>" in F.max_pool2d.__qualname__
    assert _core.canonical_target(F.max_pool2d) == "torch.nn.functional.max_pool2d"

    def local(x: Any) -> Any:
        return x

    with pytest.raises(_core.CacheError, match="local function"):
        _core.canonical_target(local)


@pytest.mark.parametrize("timeout", [1e300, float("inf"), 10**30])
def test_a_huge_lease_wait_is_bounded_and_never_panics(tmp_path: Path, timeout: float) -> None:
    """The review's reproduction: a second holder waiting with a huge timeout panicked in Rust
    (`Duration::from_secs_f64`, `Instant + Duration`), and a PanicException crossed into Python."""
    store = _core.Store(tmp_path / "c", namespace="ns")
    held = store.lease(D1)
    assert held is not None
    threading.Timer(0.3, held.release).start()
    start = time.monotonic()
    lease = store.lease(D1, timeout=timeout)
    assert lease is not None and lease.held, "it waited for the release"
    assert time.monotonic() - start < 30
    lease.release()
    # NaN or a negative wait only tries; the index's wait is bounded the same way.
    with store.lease(D1):
        assert store.lease(D1, timeout=float("nan")) is None
        assert store.lease(D1, timeout=-1.0) is None
    index = _core.Index()
    assert index.claim(D2)
    threading.Timer(0.2, index.abandon, (D2,)).start()
    assert index.wait(D2, timeout) is None


def test_byte_caps_above_u64_are_saturated_not_overflow_errors(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c", namespace="ns")
    assert store.put(D1, b"x" * 100, max_bytes=10**30) is None
    assert store.gc(10**400).removed == 0
    assert _core.gc_root(tmp_path / "c", 2**70).removed == 0
    with pytest.raises(ValueError, match=">= 0"):
        store.gc(-1)
    assert issubclass(_core.InternalError, isocache.CacheError)


_HOLD_SIZE_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "r+b")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_put_while_another_process_holds_the_size_lock_is_quick_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped process holding `<root>/v1/size` used to cost every put a 10 s wait."""
    from isocache.tiers.local import LocalTier

    caplog.set_level(logging.WARNING, logger="isocache")
    root = tmp_path / "c"
    tier = LocalTier.open(str(root), "ns", None)
    assert tier is not None
    assert tier.put(D1, b"first", 0.0)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SIZE_LOCK, str(root / "v1" / "size")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        start = time.monotonic()
        assert tier.put(D2, b"second", 0.0)
        assert tier.put("b" * 64, b"third", 0.0)
        assert time.monotonic() - start < 2.0
        assert tier.store.size_lock_skips == 2
        assert tier.store.get_checked(D2).payload == b"second"
        assert tier.store.root_size().artifacts == 3, "readers scan a record marked for a recount"
    finally:
        child.kill()
        child.wait()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "size lock" in warnings[0] and str(root) in warnings[0], warnings
    # The lock is free: the next put recounts the record, and waits for nothing.
    assert tier.put("c" * 64, b"fourth", 0.0)
    assert tier.store.size_lock_skips == 2
    assert not (root / "v1" / "size.stale").exists()
    assert _core.root_size(root).artifacts == 4
