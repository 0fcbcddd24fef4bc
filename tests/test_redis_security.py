"""Issue 11, the Redis items, tried as an attacker would: a real `redis-server`, real processes.

Anyone who can write to Redis can write any value, and loading a value runs its
code. So: no key, no Redis tier; keys carry the key's fingerprint; bad values
are a miss and stay where they are; planted leases do not stall a fleet; the
heartbeat survives hiccups; secrets in the URL never reach a log line.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import isocache
from isocache import _core
from isocache._redact import redact_url, scrub
from isocache.backend import process_index
from isocache.tiers import NO_LEASE
from isocache.tiers.redis import RedisTier
from isocache.tiers.redis_lease import RemoteLease
from support import RedisServer, reset_process_state
from test_redis import compile_llama, fetched
from test_shared_store import model_process

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (apt-get install redis-server)"
)

FLEET_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
OTHER_KEY = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
KEY = bytes.fromhex(FLEET_KEY)
DIGEST = "ab" * 32
OTHER_DIGEST = "cd" * 32


Server = RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "redis")
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, bytes]:
    """What a machine with the fleet key published for a 4-layer Llama (3 pieces)."""
    tmp = tmp_path_factory.mktemp("publisher")
    s = Server(tmp / "redis")
    try:
        proc = model_process(tmp / "machine_a", ISOCACHE_REDIS_URL=s.url, ISOCACHE_KEY=FLEET_KEY)
        data, _ = run(proc)
        assert data["compiled"] == 3
        values = s.values()
    finally:
        s.kill()
    assert len(values) == 3
    return values


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("ISOCACHE_KEY", "ISOCACHE_REDIS_URL", "ISOCACHE_REDIS_INSECURE", "ISOCACHE_REDIS_TTL"):
        monkeypatch.delenv(name, raising=False)
    reset_process_state()
    yield
    reset_process_state()


def run(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[dict[str, Any], str]:
    """A model process's counters and its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the process did not finish within {timeout:.0f} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), err


class _WritesMarker:
    """Unpickling this writes a file: stands in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code from Redis ran here"))


def evil_payload(marker: Path) -> bytes:
    """A payload in isocache's bundled framing whose loading runs a pickle (it writes `marker`)."""
    from isocache._torch import inductor

    return inductor._BUNDLED + pickle.dumps(_WritesMarker(marker))


def new_machine() -> None:
    """This process forgets everything, as another machine would know nothing."""
    torch._dynamo.reset()
    process_index().clear()
    isocache.reset_stats()


# -- item 1: no key, no Redis ----------------------------------------------------------


def test_a_writer_to_redis_cannot_run_code_on_other_machines(
    tmp_path: Path, server: Server, published: dict[bytes, bytes]
) -> None:
    marker = tmp_path / "pwned"
    evil = evil_payload(marker)
    for i, key in enumerate(published):
        digest = key.decode().rsplit(":", 1)[1]
        # Checksums are right; one is signed with a key the fleet does not use, the others not at all.
        signer = bytes.fromhex(OTHER_KEY) if i == 1 else None
        server.client.set(key, _core.pack_artifact(digest, evil, 1.0, signer))
    planted = server.values()

    # A machine without a key never talks to Redis: it compiles, and says how to make a key.
    before = server.connections()
    data, err = run(model_process(tmp_path / "machine_b", ISOCACHE_REDIS_URL=server.url))
    assert not marker.exists(), "a value planted in Redis ran code on a machine without a key"
    assert server.connections() == before, "a machine without a key connected to Redis"
    assert (data["compiled"], data["loaded"], data["remote_hits"]) == (3, 0, 0)
    assert data["err"] < 1e-4
    assert err.count("python -m isocache keygen") == 1 and "export ISOCACHE_KEY=" in err, err[-3000:]

    # A machine with the key rejects every planted value, compiles, and replaces them with its own.
    data, err = run(model_process(tmp_path / "machine_c", ISOCACHE_REDIS_URL=server.url, ISOCACHE_KEY=FLEET_KEY))
    assert not marker.exists(), "a value planted in Redis ran code on a machine with the key"
    assert (data["compiled"], data["loaded"], data["remote_hits"], data["remote_errors"]) == (3, 0, 0, 3)
    assert data["err"] < 1e-4
    assert err.count("rejecting remote artifact") == 3, err[-3000:]
    repaired = server.values()
    assert repaired.keys() == planted.keys() and not set(repaired.values()) & set(planted.values())
    for key, image in repaired.items():
        _core.unpack_artifact(key.decode().rsplit(":", 1)[1], image, KEY)  # signed with the fleet key


def test_without_a_key_the_tier_is_off_with_one_warning(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv("ISOCACHE_REDIS_URL", server.url)
    before = server.connections()
    assert RedisTier.configured(None, "ns", None) is None
    assert RedisTier.configured(server.url, "ns2", None) is None
    assert RedisTier.configured(None, "ns", b"short key") is None  # under 16 bytes: never used to sign
    assert server.connections() == before
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "python -m isocache keygen" in warning and "export ISOCACHE_KEY=" in warning
    assert "ISOCACHE_REDIS_INSECURE=1" in warning
    with pytest.raises(isocache.CacheError):
        RedisTier(server.url, "ns")  # the class itself refuses to work unsigned by accident


INSECURE_SCRIPT = """
import logging, sys
from isocache.tiers.redis import RedisTier
a = RedisTier.configured(sys.argv[1], "ns", None)
b = RedisTier.configured(sys.argv[1], "other-ns", None)
published = a.put("ab" * 32, b"payload", 1.0)
hit = a.get("ab" * 32)
fetched = None if hit is None else (hit.value, hit.compile_seconds)
print("|".join(map(str, (a.prefix, published, fetched, b.prefix))))
"""


def test_insecure_opt_in_is_unsigned_and_warned_in_every_process(server: Server) -> None:
    outputs = []
    for _ in range(2):  # every process says it
        proc = subprocess.run(
            [sys.executable, "-c", INSECURE_SCRIPT, server.url],
            capture_output=True,
            text=True,
            env={**os.environ, "ISOCACHE_REDIS_INSECURE": "1"},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("ISOCACHE_REDIS_INSECURE=1") == 1, proc.stderr
        assert "can run code" in proc.stderr
        outputs.append(proc.stdout.strip().split("|"))
    (prefix, published, fetched, other), second = outputs
    assert prefix == "isocache:v1:unsigned:ns" and other == "isocache:v1:unsigned:other-ns"
    assert (published, fetched) == ("True", "(b'payload', 1.0)")
    assert second[1:3] == ["False", fetched], "the second process finds the first one's value (SET NX)"
    # Machines with a key never read what insecure machines wrote.
    assert RedisTier(server.url, "ns", key=KEY).get("ab" * 32) is None


# -- item 5: key fingerprints, SET NX, nothing deleted -----------------------------------------


def test_key_rotation_two_keys_one_server(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv("ISOCACHE_KEY", FLEET_KEY)
    compile_llama(tmp_path / "a", server.url)  # machine A, old key
    old = server.values()
    assert len(old) == 3

    new_machine()
    monkeypatch.setenv("ISOCACHE_KEY", OTHER_KEY)
    actual, expected = compile_llama(tmp_path / "b", server.url)  # machine B, new key
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["remote_misses"], s["remote_errors"]) == (3, 3, 0), "B saw values of another key"
    assert not [r for r in caplog.records if "rejecting" in r.getMessage()]
    both = server.values()
    assert len(both) == 6 and all(both[k] == v for k, v in old.items()), "B deleted or overwrote A's values"
    fingerprints = {k.split(b":")[2] for k in both}
    assert fingerprints == {
        _core.key_fingerprint(KEY).encode(),
        _core.key_fingerprint(bytes.fromhex(OTHER_KEY)).encode(),
    }
    assert not any(FLEET_KEY[:8].encode() in k or OTHER_KEY[:8].encode() in k for k in both)

    new_machine()
    monkeypatch.setenv("ISOCACHE_KEY", FLEET_KEY)
    actual, expected = compile_llama(tmp_path / "c", server.url)  # machine C, old key: A's work is there
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    s = isocache.stats()
    assert (s["compiled"], s["loaded"], s["remote_hits"]) == (0, 3, 3)


def test_publish_never_overwrites_a_good_value_and_repairs_a_bad_one(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    tier = RedisTier(server.url, "ns", key=KEY)
    assert tier.put(DIGEST, b"first", 1.0)
    assert not tier.put(DIGEST, b"second", 2.0), "SET NX: the first value stays"
    assert fetched(tier, DIGEST) == (b"first", 1.0)

    # A value this key cannot verify: a miss with one warning; it stays until this machine publishes.
    bad = _core.pack_artifact(OTHER_DIGEST, b"forged", 1.0, bytes.fromhex(OTHER_KEY))
    server.client.set(tier._artifact_key(OTHER_DIGEST), bad)
    assert tier.get(OTHER_DIGEST) is None
    assert tier.get(OTHER_DIGEST) is None
    assert server.client.get(tier._artifact_key(OTHER_DIGEST)) == bad
    assert [r.getMessage() for r in caplog.records if "rejecting" in r.getMessage()] and len(caplog.records) == 1
    assert tier._connection.available and tier.stats.errors == 2 and tier.stats.hits == 1
    assert tier.put(OTHER_DIGEST, b"mine", 1.0), "the keyed writer replaces the value it rejected"
    assert fetched(tier, OTHER_DIGEST) == (b"mine", 1.0)

    # A machine with another key sees nothing of this key's values, and removes nothing.
    other = RedisTier(server.url, "ns", key=bytes.fromhex(OTHER_KEY))
    assert other.get(DIGEST) is None and other.stats.misses == 1 and other.stats.errors == 0
    assert fetched(tier, DIGEST) == (b"first", 1.0)


def test_wrong_redis_type_is_a_miss_for_that_digest_only(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    tier = RedisTier(server.url, "ns", key=KEY)
    assert tier.put(DIGEST, b"good", 1.0)
    server.client.rpush(tier._artifact_key(OTHER_DIGEST), b"not an artifact")
    assert tier.get(OTHER_DIGEST) is None
    assert tier._connection.available, "one odd key switched the whole tier off"
    assert fetched(tier, DIGEST) == (b"good", 1.0)
    start = time.monotonic()
    assert tier.lease(OTHER_DIGEST, 30.0) is NO_LEASE  # no wait behind it either
    assert time.monotonic() - start < 5
    assert not tier.contains(OTHER_DIGEST), "a miss: the chain compiles it"
    assert tier.put(OTHER_DIGEST, b"mine", 1.0)  # a keyed writer replaces what cannot be a value
    assert fetched(tier, OTHER_DIGEST) == (b"mine", 1.0)
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len([r for r in caplog.records if "wrong type" in r.getMessage()]) == 1


# -- item 5: leases ------------------------------------------------------------------------


@pytest.mark.parametrize("plant", ["no-ttl", "ttl-one-day", "list"])
def test_stale_lease_is_taken_over(server: Server, plant: str) -> None:
    tier = RedisTier(server.url, "ns", key=KEY, lease_ms=1000)
    key = tier._leases.key(DIGEST)
    if plant == "no-ttl":
        server.client.set(key, "x")
    elif plant == "ttl-one-day":
        server.client.set(key, "x", ex=86400)
    else:
        server.client.rpush(key, "x")
    lease = tier.lease(DIGEST, 0.0)
    assert isinstance(lease, RemoteLease), "a lease nobody renews stalled the piece"
    assert 0 < server.client.pttl(key) <= 1000
    assert tier.lease(DIGEST, 0.0) is None, "a live lease is not stale"
    lease.release()
    assert server.client.exists(key) == 0


def test_planted_leases_do_not_stall_a_fleet(tmp_path: Path, server: Server, published: dict[bytes, bytes]) -> None:
    """`SET lease-key x` without a TTL (and its cousins) in front of every piece: compiles go ahead."""
    leases = []
    for i, key in enumerate(published):
        prefix, digest = key.decode().rsplit(":", 1)
        lease = f"{prefix}:lease:{digest}"
        leases.append(lease)
        if i == 0:
            server.client.set(lease, "x")
        elif i == 1:
            server.client.set(lease, "x", ex=86400)
        else:
            server.client.rpush(lease, "x")
    data, err = run(
        model_process(tmp_path / "machine_b", ISOCACHE_REDIS_URL=server.url, ISOCACHE_KEY=FLEET_KEY), timeout=400
    )
    assert data["compiled"] == 3 and data["err"] < 1e-4
    assert data["seconds"] - data["compile_seconds"] < 60, "it waited behind leases nobody holds"
    assert "stale Redis lease" in err
    assert not any(server.client.exists(lease) for lease in leases), "the leases taken over are released"
    assert len(server.values()) == 3


def test_wait_is_bounded_by_the_expected_compile_seconds(server: Server) -> None:
    holder = RedisTier(server.url, "ns", key=KEY)
    waiter = RedisTier(server.url, "ns", key=KEY, wait_floor=1.0, wait_multiple=2.0)
    lease = holder.lease(DIGEST, 0.0, expected_seconds=0.25)  # the holder expects a short compile
    assert isinstance(lease, RemoteLease)
    try:
        start = time.monotonic()
        assert waiter.lease(DIGEST, 60.0) is None
        assert 0.9 < time.monotonic() - start < 10, "floor 1 s, 2 x 0.25 s expected"
        start = time.monotonic()
        assert waiter.lease(DIGEST, 60.0, expected_seconds=1.0) is None
        assert 1.9 < time.monotonic() - start < 10, "2 x what this process expects"
        start = time.monotonic()
        assert waiter.lease(DIGEST, 0.5, expected_seconds=100.0) is None
        assert time.monotonic() - start < 5, "never beyond the cap"
    finally:
        lease.release()
    # Nothing known at all: the floor; defaults are a multiple of 4 with a 30 s floor.
    assert waiter._leases.bound(7.0) == 1.0
    default = RedisTier(server.url, "ns", key=KEY)
    assert default._leases.bound(600.0, 5.0) == 30.0 and default._leases.bound(600.0, 60.0) == 240.0
    assert default.put(OTHER_DIGEST, b"compiled here", 20.0)  # the longest compile this tier has seen counts too
    assert default._leases.bound(600.0) == 80.0 and default._leases.bound(50.0) == 50.0


def test_heartbeat_survives_a_paused_server(server: Server) -> None:
    """Redis stops answering for longer than the client's retries: the lease is still extended after."""
    tier = RedisTier(server.url, "ns", key=KEY, lease_ms=15_000, timeout=0.25)
    start = time.monotonic()
    lease = tier.lease(DIGEST, 0.0)
    assert isinstance(lease, RemoteLease)
    value = server.client.get(tier._leases.key(DIGEST))
    try:
        time.sleep(max(0.0, 4.5 - (time.monotonic() - start)))  # just before the first heartbeat (5 s)
        server.client.execute_command("CLIENT", "PAUSE", 8000, "ALL")
        time.sleep(max(0.0, 16.5 - (time.monotonic() - start)))  # past the lease's first expiry (15 s)
        assert server.client.get(tier._leases.key(DIGEST)) == value, "the heartbeat gave up during the pause"
        assert server.client.pttl(tier._leases.key(DIGEST)) > 5000
        assert lease.held
    finally:
        lease.release()
    assert not server.client.exists(tier._leases.key(DIGEST))


def test_heartbeat_survives_a_killed_connection_and_stops_when_lost(server: Server) -> None:
    tier = RedisTier(server.url, "ns", key=KEY, lease_ms=1500)
    lease = tier.lease(DIGEST, 0.0)
    assert isinstance(lease, RemoteLease)
    key = tier._leases.key(DIGEST)
    value = server.client.get(key)
    for _ in range(3):
        server.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        time.sleep(0.5)
    time.sleep(1.0)
    assert server.client.get(key) == value and lease.held
    server.client.set(key, "taken over by another machine", px=60_000)
    time.sleep(1.5)
    assert lease.lost and not lease.held
    assert server.client.get(key) == b"taken over by another machine"
    lease.release()  # not ours: left alone
    assert server.client.get(key) == b"taken over by another machine"


# -- item 7: secrets in URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secrets", "shown"),
    [
        ("redis://host/0?password=hunter2", ["hunter2"], "redis://host/0?password=***"),
        ("redis://:pa@ss@host", ["pa@ss", "@ss@"], "redis://:***@host"),
        ("redis://alice:hunter2@host:6379/0", ["hunter2"], "redis://alice:***@host:6379/0"),
        (
            "rediss://alice@host:6380/1?db=1&Password=s3cr%40t&username=bob",
            ["alice", "s3cr"],
            "rediss://***@host:6380/1?db=1&Password=***&username=bob",
        ),
        ("unix://:hunter2@/run/redis.sock?db=0", ["hunter2"], "unix://:***@/run/redis.sock?db=0"),
        ("redis://:hunter2#frag@host/0", ["hunter2", "frag"], None),
    ],
)
def test_url_secrets_are_redacted(url: str, secrets: list[str], shown: str | None) -> None:
    redacted = redact_url(url)
    assert not any(s in redacted for s in secrets), redacted
    if shown is not None:
        assert redacted == shown
    message = scrub(f"Error connecting to {url}: bad password {secrets[0]}", url)
    assert not any(s in message for s in secrets), message


def test_no_secret_reaches_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    guarded = Server(tmp_path / "guarded", "--requirepass", "right-password-1")
    try:
        urls = [
            f"redis://:wrong-password-1@127.0.0.1:{guarded.port}/0",
            f"redis://127.0.0.1:{guarded.port}/0?password=wrong-password-2",
            f"redis://:pa@ss-word-3@127.0.0.1:{guarded.port}/0",
            "redis://:wrong-password-4@127.0.0.1:notaport/0",
        ]
        for url in urls:
            tier = RedisTier(url, "ns", key=KEY)
            assert tier.get(DIGEST) is None and not tier._connection.available
            assert tier.lease(DIGEST, 0.0) is NO_LEASE
            assert "wrong" not in repr(tier) and "ss-word" not in repr(tier), repr(tier)
    finally:
        guarded.kill()
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "unavailable" in m]) == len(urls)
    for line in lines:
        assert "wrong-password" not in line and "pa@ss" not in line and "ss-word" not in line, line
