"""The Rust core's Python surface: Store, Index, errors and stubs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import isocache
from isocache import _core

D1 = "a" * 64
D2 = "0123456789abcdef" * 4


def test_errors_share_one_base() -> None:
    for exc in (_core.InvalidDigestError, _core.InvalidKeyError, _core.StoreError, _core.InsecureStoreError):
        assert issubclass(exc, isocache.CacheError)
    assert issubclass(_core.InsecureStoreError, _core.StoreError)
    assert isocache.CacheError is _core.CacheError


def test_store_round_trip(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "c", namespace="ns")
    assert store.get(D1) is None and D1 not in store
    store.put(D1, b"artifact", compile_seconds=2.5)
    assert store.get(D1) == b"artifact"
    assert store.lookup(D1) == (b"artifact", 2.5)
    assert D1 in store and store.contains(D1)
    assert Path(store.object_path(D1)).parent.name == D1[:2]
    assert [d for d, *_ in store.list()] == [D1]
    assert store.remove(D1) and not store.remove(D1)
    assert store.get(D1) is None


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
    assert store.get(D1) is None
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
    assert signed.get(D1) is None
    signed.put(D2, b"signed")
    assert signed.get(D2) == b"signed"
    assert _core.Store(tmp_path / "c", key=b"another secret, 16+ bytes").get(D2) is None


def test_short_keys_are_refused_with_a_way_out(tmp_path: Path) -> None:
    assert issubclass(_core.InvalidKeyError, isocache.CacheError)
    for short in (b"", b"secret", b"x" * 15):
        for call in (
            lambda: _core.Store(tmp_path / "c", key=short),
            lambda: _core.pack_artifact(D1, b"payload", key=short),
            lambda: _core.unpack_artifact(D1, _core.pack_artifact(D1, b"payload"), key=short),
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
    # BLAKE3 derive_key("isocache 2026 key fingerprint v1", key), first 8 bytes: pinned
    # so that machines running different isocache builds agree on Redis key prefixes.
    assert _core.key_fingerprint(b"0123456789abcdef") == "d12c7efd7ab47600"


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


def test_stubs_match_the_extension() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "isocache._core"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
