"""The store shared by many processes: real processes, real signals, real files."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import isocache
from isocache import _core
from isocache.backend import process_index
from support import compile_llama

TESTS = Path(__file__).resolve().parent


# A process that compiles a 4-layer Llama with isocache and reports its counters.
MODEL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import MODELS, token_ids
    go = os.environ.get("ISOCACHE_TEST_GO")
    if go:  # start together: wait for the starting gun
        while not os.path.exists(go):
            time.sleep(0.01)
    import isocache
    {patch}
    model, ids = MODELS["llama"](4), token_ids()
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        actual = torch.compile(model, backend="isocache")(ids).last_hidden_state
    print(json.dumps(dict(isocache.stats(), err=(actual - expected).abs().max().item(),
                          seconds=time.perf_counter() - start)))
    """
)


def model_process(cache: Path, patch: str = "", **env: str) -> subprocess.Popen[str]:
    script = MODEL_SCRIPT.format(tests=str(TESTS), patch=patch)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ISOCACHE_DIR": str(cache), **env},
    )


def result(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize("workers", ["0", "1"], ids=["in-process", "compile-workers"])
def test_four_processes_compile_each_distinct_piece_once(tmp_path: Path, workers: str) -> None:
    go = tmp_path / "go"
    procs = [
        model_process(tmp_path / "cache", ISOCACHE_TEST_GO=str(go), ISOCACHE_COMPILE_WORKERS=workers) for _ in range(4)
    ]
    time.sleep(1.0)
    go.touch()
    results = [result(p) for p in procs]
    assert sum(r["compiled"] for r in results) == 3, results
    for r in results:
        assert r["compiled"] + r["loaded"] == 3
        assert r["failed"] == 0
        assert r["err"] < 1e-4
    # One machine-wide set of workers (one slot here): the others compile what they lease in their own process.
    assert sum(r["workers_started"] for r in results) <= int(workers), results


SLOW_COMPILE = """
import pathlib, time
from isocache._torch import inductor
_real = inductor.compile_piece
def _slow(*a, **k):
    pathlib.Path(os.environ["ISOCACHE_TEST_MARKER"]).touch()
    time.sleep(120)  # killed long before this ends
    return _real(*a, **k)
inductor.compile_piece = _slow
"""


def test_lease_holder_killed_mid_compile_is_taken_over(tmp_path: Path) -> None:
    marker = tmp_path / "compiling"
    holder = model_process(tmp_path / "cache", patch=SLOW_COMPILE, ISOCACHE_TEST_MARKER=str(marker))
    deadline = time.time() + 300
    while not marker.exists():
        assert holder.poll() is None, holder.communicate()[1][-3000:]
        assert time.time() < deadline, "the holder never started compiling"
        time.sleep(0.05)
    waiter = model_process(tmp_path / "cache")
    time.sleep(3.0)  # the waiter reaches the held lease and waits on it
    assert waiter.poll() is None, "the waiter must wait while the holder compiles"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    r = result(waiter, timeout=300)
    assert r["compiled"] == 3 and r["failed"] == 0
    assert r["err"] < 1e-4
    report = _core.Store(tmp_path / "cache", _core.list_namespaces(tmp_path / "cache")[0]).verify()
    assert (report.checked, report.bad) == (3, [])


def core_module_path() -> str:
    return str(Path(_core.__file__).resolve())


# A writer that imports only the Rust core (no torch) and publishes forever.
WRITER = textwrap.dedent(
    """
    import hashlib, importlib.util, random, sys
    spec = importlib.util.spec_from_file_location("isocache._core", {core!r})
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    store = core.Store({root!r}, "ns")
    print("ready", flush=True)
    rng = random.Random()
    while True:
        i = rng.randrange(24)
        digest = hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest()
        payload = hashlib.sha256(digest.encode()).digest() * (8192 * (1 + i % 4))
        store.put(digest, payload, float(i))
    """
)


def expected_payloads() -> dict[str, bytes]:
    import hashlib

    out = {}
    for i in range(24):
        digest = hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest()
        out[digest] = hashlib.sha256(digest.encode()).digest() * (8192 * (1 + i % 4))
    return out


def test_writers_killed_at_random_never_leave_a_corrupt_artifact(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    script = WRITER.format(core=core_module_path(), root=str(root))
    rng = random.Random(1234)
    killed = 0
    for _batch in range(10):
        procs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(5)
        ]
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        for p in procs:
            time.sleep(rng.uniform(0.0, 0.08))
            p.send_signal(signal.SIGKILL)
            p.wait()
            assert p.returncode == -signal.SIGKILL
            killed += 1
    assert killed == 50
    store = _core.Store(root, "ns")  # opening cleans temp files of dead writers
    assert list(Path(store.path, "tmp").iterdir()) == []
    payloads = expected_payloads()
    seen = 0
    for digest, payload in payloads.items():
        got = store.get_checked(digest)
        if got.payload is not None:
            seen += 1
            assert (got.payload, got.compile_seconds) == (payload, float(list(payloads).index(digest)))
    assert seen > 0, "the writers published something"
    assert store.quarantined == 0
    report = store.verify()
    assert (report.checked, report.bad) == (seen, [])
    cli = subprocess.run(
        [sys.executable, "-m", "isocache", "verify", "--dir", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["bad"] == []


def new_process_state() -> None:
    torch._dynamo.reset()
    process_index().clear()
    isocache.reset_stats()


def artifacts(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("objects/*/*"))


def test_bit_flips_and_truncation_are_quarantined_and_recompiled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    cache = tmp_path / "cache"
    compile_llama(cache)
    files = artifacts(cache)
    assert len(files) == 3
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[0].write_bytes(bytes(data))
    files[1].write_bytes(files[1].read_bytes()[:-100])
    new_process_state()
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["loaded"], s["quarantined"]) == (2, 1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("checksum" in m for m in messages) == 1 and sum("length" in m for m in messages) == 1
    assert len(list(cache.rglob("quarantine/*"))) == 2
    namespace = _core.list_namespaces(cache)[0]
    report = _core.Store(cache, namespace).verify()
    assert (report.checked, report.bad) == (3, [])


def test_symlink_planted_in_the_store_is_never_followed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    compile_llama(cache)
    victim = artifacts(cache)[0]
    outside = tmp_path / "outside"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)
    new_process_state()
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["loaded"]) == (1, 2)
    assert outside.exists() and not victim.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
def test_store_owned_by_someone_else_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 12345, 12345)
    with pytest.raises(_core.InsecureStoreError, match="owned by uid 12345"):
        _core.Store(cache)
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "without a persistent store" in r.getMessage()]
    assert len(warnings) == 1 and "owned by" in warnings[0]
    assert isocache.stats()["compiled"] == 3
    assert not artifacts(cache)


def test_group_writable_store_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o775)
    with pytest.raises(_core.InsecureStoreError, match="chmod go-w"):
        _core.Store(cache)
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert not artifacts(cache)


def test_new_directories_and_files_are_private(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    compile_llama(cache)
    for path in [cache, *cache.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        elif path.suffix != ".lock" and path.name != "stats":
            assert mode == 0o600, path


def test_first_use_of_a_key_signs_the_store_and_other_keys_stay_unloadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    cache = tmp_path / "cache"
    compile_llama(cache)  # unsigned
    damaged, *intact = artifacts(cache)
    assert intact, "more than one piece"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("ISOCACHE_KEY", "team-secret, at least 16 bytes")
    new_process_state()
    caplog.clear()
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["loaded"]) == (1, len(intact)), "the intact ones were signed and loaded"
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if "first use" in m] == [
        f"isocache: first use of ISOCACHE_KEY in {damaged.parents[2]}: signed {len(intact)} existing artifacts "
        "with it; 1 failed their check and were moved aside"
    ], lines
    assert not [m for m in lines if "bad artifact" in m], "no warning per artifact"

    new_process_state()
    caplog.clear()
    compile_llama(cache)
    assert (isocache.stats()["compiled"], isocache.stats()["loaded"]) == (0, len(intact) + 1), "all signed now"
    assert not [r for r in caplog.records if "first use" in r.getMessage()], "once per key"

    monkeypatch.setenv("ISOCACHE_KEY", "someone else, also 16+ bytes")
    new_process_state()
    caplog.clear()
    compile_llama(cache)
    assert (isocache.stats()["compiled"], isocache.stats()["loaded"]) == (len(intact) + 1, 0), "other key: never"
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if "first use" in m] == [
        f"isocache: first use of ISOCACHE_KEY in {damaged.parents[2]}: "
        f"{len(intact) + 1} signed with another key were moved aside"
    ], lines
    assert not [m for m in lines if "bad artifact" in m], "no warning per artifact"


def test_gc_under_a_small_cap_while_another_process_reads(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    payloads = expected_payloads()
    for i, (d, p) in enumerate(payloads.items()):
        store.put(d, p, float(i))
    reader = textwrap.dedent(
        f"""
        import hashlib, importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("isocache._core", {core_module_path()!r})
        core = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(core)
        store = core.Store({str(root)!r}, "ns")
        digests = [hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest() for i in range(24)]
        hits = misses = 0
        end = time.time() + 4
        while time.time() < end:
            for i, d in enumerate(digests):
                got = store.get_checked(d).payload
                if got is None:
                    misses += 1
                    continue
                assert got == hashlib.sha256(d.encode()).digest() * (8192 * (1 + i % 4)), d
                hits += 1
        assert store.quarantined == 0
        print(hits, misses)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cap = 600_000
    end = time.time() + 4
    rounds = 0
    while time.time() < end:
        assert store.gc(cap).remaining_bytes <= cap
        for d, p in list(payloads.items())[rounds % 24 :: 5]:
            store.put(d, p, 0.0)  # refill, so the reader keeps racing evictions
        rounds += 1
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    hits, misses = map(int, out.split())
    assert hits > 0 and misses > 0, "the reader saw both hits and evictions"
    assert rounds > 5


def test_size_cap_is_enforced_after_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "300K")
    cache = tmp_path / "cache"
    actual, expected = compile_llama(cache)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    total = sum(p.stat().st_size for p in artifacts(cache))
    assert 0 < total <= 300 * 1024


def _mount_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _mount_namespaces_work(), reason="needs unshare with user and mount namespaces")
def test_full_disk_never_fails_a_compile(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    script = MODEL_SCRIPT.format(tests=str(TESTS), patch="")
    # A private 96 kB filesystem for the store: every artifact write hits ENOSPC.
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=96k,mode=0700 none {small} && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ISOCACHE_DIR": str(small / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["compiled"] == 3 and r["failed"] == 0 and r["err"] < 1e-4
    assert proc.stderr.count("the store could not be written") == 1, proc.stderr[-3000:]
    assert "No space left on device" in proc.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "isocache", *args], capture_output=True, text=True, timeout=300)


def test_command_line_on_a_store(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    payloads = list(expected_payloads().items())[:4]
    for d, p in payloads:
        store.put(d, p, 2.0)
    store.record_usage(hits=3, misses=1, saved_seconds=6.0)

    stats = json.loads(cli("stats", "--dir", str(root), "--json").stdout)
    (ns,) = stats["namespaces"]
    assert (ns["artifacts"], ns["hits"], ns["misses"], ns["hit_rate"], ns["compile_seconds_saved"]) == (
        4,
        3,
        1,
        0.75,
        6.0,
    )
    text = cli("stats", "--dir", str(root)).stdout
    assert "75%" in text and "hit rate" in text

    listing = json.loads(cli("ls", "--dir", str(root), "--json").stdout)
    assert sorted(e["digest"] for e in listing) == sorted(d for d, _ in payloads)
    assert all(e["compile_seconds"] == 2.0 for e in listing)

    bad = Path(store.object_path(payloads[0][0]))
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    check = cli("verify", "--dir", str(root))
    assert check.returncode == 1 and "1 bad" in check.stdout and payloads[0][0][:16] in check.stdout
    assert cli("verify", "--dir", str(root), "--fix").returncode == 0
    assert cli("verify", "--dir", str(root)).returncode == 0

    gc = json.loads(cli("gc", "--dir", str(root), "--max-bytes", "70000", "--json").stdout)
    assert gc["remaining_bytes"] <= 70000 and gc["removed"] >= 1
    cleared = json.loads(cli("clear", "--dir", str(root), "--json").stdout)
    assert cleared["removed"] == gc["remaining"]
    assert store.list() == []
