"""The Redis tier against a real `redis-server` on a random loopback port."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import isocache
from conftest import MODELS, token_ids
from isocache import _core
from isocache._redact import redact_url
from isocache._torch import inductor
from isocache.backend import process_index
from isocache.report import CompileEvent, counters
from isocache.tiers import Unloadable
from isocache.tiers.chain import Chain, Produced
from isocache.tiers.local import LocalTier
from isocache.tiers.memory import MemoryTier
from isocache.tiers.redis import RedisTier
from isocache.tiers.redis_lease import RemoteLease
from support import RedisServer, reset_process_state
from test_shared_store import model_process, result

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


# The Redis tier is on only with a signing key (or ISOCACHE_REDIS_INSECURE=1): every test
# here runs with one, in this process and in the processes it starts.
FLEET_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ISOCACHE_KEY", FLEET_KEY)
    monkeypatch.delenv("ISOCACHE_REDIS_INSECURE", raising=False)
    reset_process_state()
    yield
    reset_process_state()


def test_second_machine_loads_every_piece_from_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"ISOCACHE_REDIS_URL": redis_server.url}
    first = result(model_process(tmp_path / "machine_a", **env))
    assert (first["compiled"], first["remote_misses"]) == (3, 3)
    second = result(model_process(tmp_path / "machine_b", **env))
    assert second["compiled"] == 0
    assert second["loaded"] == 3 and second["remote_hits"] == 3
    assert second["err"] < 1e-4
    # Written through: a third process on machine B loads locally.
    third = result(model_process(tmp_path / "machine_b", **env))
    assert (third["compiled"], third["loaded"], third["remote_hits"]) == (0, 3, 0)
    stats = json.loads(
        subprocess.run(
            [sys.executable, "-m", "isocache", "stats", "--dir", str(tmp_path / "machine_b"), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    (ns,) = stats["namespaces"]
    assert (ns["remote_hits"], ns["remote_misses"], ns["remote_errors"]) == (3, 0, 0)


def test_four_machines_compile_each_piece_once(tmp_path: Path, redis_server: RedisServer) -> None:
    go = tmp_path / "go"
    procs = [
        model_process(tmp_path / f"machine_{i}", ISOCACHE_REDIS_URL=redis_server.url, ISOCACHE_TEST_GO=str(go))
        for i in range(4)
    ]
    time.sleep(1.0)
    go.touch()
    results = [result(p) for p in procs]
    assert sum(r["compiled"] for r in results) == 3, results
    for r in results:
        assert r["compiled"] + r["loaded"] == 3 and r["err"] < 1e-4


def compile_llama(cache: Path, url: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, ids = MODELS["llama"](3), token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        backend = isocache.Backend(cache_dir=cache, redis_url=url)
        actual = torch.compile(model, backend=backend)(ids).last_hidden_state
    return actual, expected


def test_redis_killed_mid_run_costs_one_warning(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    real = inductor.compile_piece
    calls = {"n": 0}

    def compile_then_kill(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            redis_server.kill()  # Redis dies between two compiles
        return real(*args, **kwargs)

    monkeypatch.setattr(inductor, "compile_piece", compile_then_kill)
    with counters.expect(compiled=3, failed=0, remote_errors=lambda d: d >= 1):
        actual, expected = compile_llama(tmp_path / "cache", redis_server.url)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
    assert len(warnings) == 1 and "unavailable" in warnings[0] and "retrying" in warnings[0]


def test_unreachable_redis_never_fails_a_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    start = time.perf_counter()
    actual, expected = compile_llama(tmp_path / "cache", f"redis://127.0.0.1:{port}/0")
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert isocache.stats()["compiled"] == 3
    assert sum("Redis" in r.getMessage() for r in caplog.records) == 1
    assert time.perf_counter() - start < 120


@pytest.mark.parametrize("poison", ["checksum", "signature"])
def test_poisoned_remote_value_is_rejected_and_recompiled(
    poison: str,
    tmp_path: Path,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    compile_llama(tmp_path / "a", redis_server.url)
    keys = sorted(k for k in redis_server.client.keys("isocache:v1:*") if b":lease:" not in k)
    assert len(keys) == 3
    if poison == "checksum":
        value = bytearray(redis_server.client.get(keys[0]))
        value[-1] ^= 0x01
        redis_server.client.set(keys[0], bytes(value))
    else:
        # Re-signed by someone holding another key, written where this key's values live:
        # the checksum is fine, the signature is not.
        from isocache import _core

        digest = keys[0].decode().rsplit(":", 1)[1]
        payload, secs = _core.unpack_artifact(digest, redis_server.client.get(keys[0]))
        redis_server.client.set(keys[0], _core.pack_artifact(digest, payload, secs, b"attacker-key-0123456789"))
    torch._dynamo.reset()
    process_index().clear()
    isocache.reset_stats()
    actual, expected = compile_llama(tmp_path / "b", redis_server.url)  # another machine
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["loaded"]) == (1, 2)
    messages = [r.getMessage() for r in caplog.records if "rejecting remote artifact" in r.getMessage()]
    assert len(messages) == 1 and poison in messages[0]


def test_ttl_is_applied(tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_REDIS_TTL", "3600")
    compile_llama(tmp_path / "cache", redis_server.url)
    keys = [k for k in redis_server.client.keys("isocache:v1:*") if b":lease:" not in k]
    assert keys and all(0 < redis_server.client.ttl(k) <= 3600 for k in keys)
    assert not redis_server.client.keys("isocache:v1:*:lease:*"), "leases are released"


def test_remote_lease_heartbeat_and_takeover(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, "ns", key=bytes.fromhex(FLEET_KEY), lease_ms=300)
    digest = "b" * 64
    held = tier.lease(digest, 0.0)
    assert isinstance(held, RemoteLease)
    assert tier.lease(digest, 0.0) is None
    time.sleep(0.8)  # well past lease_ms: the heartbeat keeps it
    assert tier.lease(digest, 0.0) is None
    held._stop.set()  # the holder stops renewing (as if it hung or died)
    got = tier.lease(digest, 5.0)
    assert isinstance(got, RemoteLease), "a waiter takes over once the lease expires"
    got.release()
    assert redis_server.client.get(tier._leases.key(digest)) is None


def test_url_password_is_not_logged() -> None:
    assert redact_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert "hunter2" not in repr(RedisTier("redis://:hunter2@host:1/0", "ns", key=bytes.fromhex(FLEET_KEY)))


def fetched(tier: RedisTier, digest: str) -> tuple[bytes, float] | None:
    """What `tier.get` found, as (payload, compile seconds)."""
    hit = tier.get(digest)
    return None if hit is None else (hit.value, hit.compile_seconds)


def _load(payload: bytes) -> Any:
    if payload.startswith(b"bad"):
        raise Unloadable("not a piece")
    return lambda: payload


def test_redis_in_the_chain_waits_bounded_and_says_why(tmp_path: Path, redis_server: RedisServer) -> None:
    key = bytes.fromhex(FLEET_KEY)
    other_machine = RedisTier(redis_server.url, "ns", key=key)
    tier = RedisTier(redis_server.url, "ns", key=key, wait_floor=0.5, wait_multiple=2.0)
    local = LocalTier(_core.Store(tmp_path / "local", "ns"))
    digest = "c" * 64
    local.put(digest, b"bad: does not load here", 0.3)  # known: a 0.3 s compile
    held = other_machine.lease(digest, 0.0, expected_seconds=0.1)
    assert isinstance(held, RemoteLease)
    try:
        event = CompileEvent(0, 1, "static", digest=digest)
        start = time.monotonic()
        result = Chain(MemoryTier(_core.Index()), [local, tier], wait_timeout=60.0).obtain(
            digest, _load, lambda: Produced(lambda: b"", b"made here", 1.0), event
        )
        assert isinstance(result, Produced)
        assert 0.5 < time.monotonic() - start < 10, "bounded by 2 x the 0.3 s known, floor 0.5 s"
        assert event.reason is not None and "another machine" in event.reason and "compiling here" in event.reason
        assert event.wait_seconds > 0.5
    finally:
        held.release()
    assert fetched(tier, digest) == (b"made here", 1.0), "published to Redis"
    assert local.get(digest) is not None and local.get(digest).value == b"made here"  # type: ignore[union-attr]


def test_redis_lease_records_the_expected_seconds(tmp_path: Path, redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, "ns", key=bytes.fromhex(FLEET_KEY))
    assert tier.put("f" * 64, b"published earlier", 50.0)  # the longest compile the tier has seen
    local = LocalTier(_core.Store(tmp_path / "local", "ns"))
    digest = "d" * 64
    local.put(digest, b"bad: does not load here", 7.0)
    seen: list[bytes] = []

    def produce() -> Produced[Any]:
        seen.append(redis_server.client.get(tier._leases.key(digest)))
        return Produced(lambda: b"", b"made here", 1.0)

    event = CompileEvent(0, 1, "static", digest=digest)
    Chain(MemoryTier(_core.Index()), [local, tier]).obtain(digest, _load, produce, event)
    (value,) = seen
    assert b":7.000:" in value, value  # token:expected:signature
    assert not redis_server.client.exists(tier._leases.key(digest)), "released"


def test_a_rejected_value_is_read_once(redis_server: RedisServer, tmp_path: Path) -> None:
    tier = RedisTier(redis_server.url, "ns", key=bytes.fromhex(FLEET_KEY))
    digest = "e" * 64
    redis_server.client.set(tier._artifact_key(digest), _core.pack_artifact(digest, b"unsigned", 1.0))
    chain = Chain(MemoryTier(_core.Index()), [LocalTier(_core.Store(tmp_path / "local", "ns")), tier])
    with counters.expect(remote_errors=1, remote_hits=0):
        result = chain.obtain(digest, _load, lambda: Produced(lambda: b"", b"made here", 1.0), CompileEvent(0, 1, "s"))
    assert isinstance(result, Produced)
    assert tier.stats.errors == 1 and tier.stats.puts == 1, "read once, then replaced by the compiled value"
    assert tier.contains(digest) and fetched(tier, digest) == (b"made here", 1.0)
