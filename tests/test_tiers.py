"""The tier chain on real tiers: the process index (`_core.Index`) and the store (`_core.Store`).

Values here are small byte strings and the "loaded" value is a callable that
returns them; what the chain does with them (order, back-fill, publish,
leases, counts) is what a piece's artifact goes through. A third tier, an
in-memory stand-in for an object store, shows that adding a tier is one class.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from isocache import _core
from isocache.report import counters
from isocache.tiers import NO_LEASE, Hit, Lease, TierStats, Unloadable
from isocache.tiers.chain import Chain, Produced
from isocache.tiers.local import LocalTier
from isocache.tiers.memory import MemoryTier
from isocache.tiers.redis import RedisTier


def digest(i: int | str) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=32).hexdigest()


class ObjectStoreTier:
    """A whole new byte tier (a stand-in for an object store): this class is all it takes."""

    name = "objects"
    holder = "another uploader"
    network = True

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.stats = TierStats(self.name)
        self.leases: list[float | None] = []  # expected_seconds of each lease asked for

    def get(self, digest: str) -> Hit[bytes] | None:
        found = self.objects.get(digest)
        self.stats.count(**({"hits": 1} if found else {"misses": 1}))
        return None if found is None else Hit(found[0], found[1], self.name)

    def contains(self, digest: str) -> bool:
        return digest in self.objects

    def put(self, digest: str, value: bytes, compile_seconds: float) -> bool:
        self.objects.setdefault(digest, (value, compile_seconds))
        self.stats.count(puts=1)
        return True

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        self.leases.append(expected_seconds)
        return NO_LEASE

    def discard(self, digest: str) -> None:
        self.objects.pop(digest, None)


class Event:
    """What the chain notes waits in (a CompileEvent has these two fields)."""

    def __init__(self) -> None:
        self.wait_seconds = 0.0
        self.reason: str | None = None


def load(payload: bytes) -> Callable[[], bytes]:
    """The test's loader: bytes starting with b"bad" do not load."""
    if payload.startswith(b"bad"):
        raise Unloadable("not a piece")
    return lambda: payload


class Producer:
    def __init__(self, payload: bytes | None = b"compiled", seconds: float = 2.0) -> None:
        self.calls = 0
        self.payload = payload
        self.seconds = seconds
        self._lock = threading.Lock()

    def __call__(self) -> Produced[Callable[[], bytes]]:
        with self._lock:
            self.calls += 1
        payload = self.payload
        return Produced(lambda: payload or b"", payload, self.seconds)


@pytest.fixture
def memory() -> MemoryTier:
    return MemoryTier(_core.Index())


@pytest.fixture
def local(tmp_path: Path) -> LocalTier:
    return LocalTier(_core.Store(tmp_path / "store", "ns"))


def test_every_tier_has_the_protocol() -> None:
    for cls in (MemoryTier, LocalTier, RedisTier, ObjectStoreTier):
        for name in ("get", "contains", "put", "lease", "discard"):
            assert callable(getattr(cls, name)), (cls, name)
        for name in ("name", "holder", "network"):
            assert isinstance(getattr(cls, name), (str, bool)), (cls, name)


def test_lookup_order_and_back_fill(memory: MemoryTier, local: LocalTier) -> None:
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    d = digest("order")
    objects.put(d, b"from objects", 3.0)

    found = chain.find(d, load)
    assert found is not None and (found.tier, found.reused, found.compile_seconds) == ("objects", False, 3.0)
    assert found.value() == b"from objects"
    # Back-filled: the local store and memory have it now.
    assert local.peek(d) == Hit(b"from objects", 3.0, "local")
    assert memory.contains(d)

    again = chain.find(d, load)
    assert again is not None and (again.tier, again.reused) == ("memory", True)
    assert again.value is found.value

    memory.index.clear()  # as a new process on this machine: the local store answers
    third = chain.find(d, load)
    assert third is not None and third.tier == "local"
    assert objects.stats.snapshot()["hits"] == 1, "a faster tier answered; the slow one was not asked"
    assert local.stats.snapshot() == {"hits": 1, "misses": 1, "errors": 0, "puts": 1, "quarantined": 0}
    assert memory.stats.snapshot()["hits"] == 1


def test_faster_tier_wins(memory: MemoryTier, local: LocalTier) -> None:
    objects = ObjectStoreTier()
    d = digest("both")
    local.put(d, b"local copy", 1.0)
    objects.put(d, b"remote copy", 1.0)
    found = Chain(memory, [local, objects]).find(d, load)
    assert found is not None and found.value() == b"local copy"
    assert objects.stats.snapshot()["hits"] == 0


def test_miss_everywhere(memory: MemoryTier, local: LocalTier) -> None:
    chain = Chain(memory, [local, ObjectStoreTier()])
    assert chain.find(digest("nowhere"), load) is None
    assert not chain.known(digest("nowhere"))


def test_compile_is_published_to_every_byte_tier(memory: MemoryTier, local: LocalTier) -> None:
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    d = digest("publish")
    produce = Producer(b"artifact", 4.0)
    result = chain.obtain(d, load, produce, Event())
    assert isinstance(result, Produced) and produce.calls == 1
    assert local.peek(d) == Hit(b"artifact", 4.0, "local")
    assert objects.objects[d] == (b"artifact", 4.0)
    assert memory.contains(d) and chain.known(d)
    # Once there, nothing is produced again.
    found = chain.obtain(d, load, produce, Event())
    assert not isinstance(found, Produced) and found.reused and produce.calls == 1


def test_memory_only_value_is_not_published(memory: MemoryTier, local: LocalTier) -> None:
    chain = Chain(memory, [local])
    d = digest("memory only")
    result = chain.obtain(d, load, Producer(payload=None), Event())
    assert isinstance(result, Produced)
    assert memory.contains(d) and not local.contains(d)


def test_one_write_through_applies_the_size_cap(
    memory: MemoryTier, local: LocalTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "300K")
    for i in range(3):  # older artifacts, written around the chain
        local.store.put(digest(i), bytes(100 * 1024), 1.0)
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    writes: list[tuple[str, ...]] = []
    real = chain.write_through

    def spy(tiers: Any, d: str, payload: bytes, seconds: float) -> None:
        writes.append(tuple(t.name for t in tiers))
        real(tiers, d, payload, seconds)

    monkeypatch.setattr(chain, "write_through", spy)
    filled, published = digest("filled"), digest("published")
    objects.put(filled, bytes(100 * 1024), 1.0)
    assert chain.find(filled, load) is not None  # back-fill
    assert local.store.total_bytes() <= 300 * 1024 and local.contains(filled)
    assert isinstance(chain.obtain(published, load, Producer(bytes(100 * 1024)), Event()), Produced)  # publish
    assert local.store.total_bytes() <= 300 * 1024 and local.contains(published)
    assert writes == [("local",), ("local", "objects")], "back-fill and publish: the same write-through"
    assert not local.contains(digest(0)), "least recently used first"


class _FullStore:
    """A real store whose writes fail as on a full disk."""

    def __init__(self, store: _core.Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __contains__(self, d: str) -> bool:
        return d in self._store

    def put(self, *args: Any, **kwargs: Any) -> None:
        raise _core.StoreError("No space left on device (os error 28)")


def test_write_through_warns_the_same_for_back_fill_and_publish(
    memory: MemoryTier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    local = LocalTier(_FullStore(_core.Store(tmp_path / "full", "ns")))  # type: ignore[arg-type]
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    objects.put(digest("a"), b"from objects", 1.0)
    assert chain.find(digest("a"), load) is not None, "a failed back-fill never fails the lookup"
    assert isinstance(chain.obtain(digest("b"), load, Producer(), Event()), Produced)
    assert digest("b") in objects.objects, "the other tiers still get it"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "the store could not be written" in warnings[0] and "No space" in warnings[0]
    assert local.stats.snapshot()["errors"] == 2


def test_value_that_does_not_load_is_a_miss_in_any_tier(
    memory: MemoryTier, local: LocalTier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    d = digest("bad local")
    local.put(d, b"bad bytes", 7.0)
    objects.put(d, b"good bytes", 7.0)
    found = chain.find(d, load)
    assert found is not None and found.tier == "objects" and found.value() == b"good bytes"
    assert local.peek(d) == Hit(b"good bytes", 7.0, "local"), "discarded, then back-filled with what loads"

    # Nowhere loads: produced, with one warning, and the wait bound knows its compile time.
    e = digest("bad everywhere")
    local.put(e, b"bad here", 9.0)
    objects.put(e, b"bad there", 9.0)
    produce = Producer(b"fresh")
    result = chain.obtain(e, load, produce, Event())
    assert isinstance(result, Produced) and produce.calls == 1
    assert objects.leases[-1] == 9.0, "expected_seconds from the value that did not load"
    assert local.peek(e) == Hit(b"fresh", 2.0, "local") and objects.objects[e] == (b"fresh", 2.0)
    assert objects.stats.snapshot()["hits"] == 2, "a value that did not load is not read again"
    messages = [r.getMessage() for r in caplog.records]
    assert sum(d[:16] in m for m in messages) == 1 and sum(e[:16] in m for m in messages) == 1


def test_local_loads_note_compile_seconds(memory: MemoryTier, local: LocalTier) -> None:
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects])
    d = digest("noted")
    local.put(d, b"value", 42.0)
    assert chain.find(d, load) is not None
    assert isinstance(chain.obtain(digest("next"), load, Producer(), Event()), Produced)
    assert objects.leases == [42.0], "a local load's compile seconds bound the waits on slower tiers"


def test_counts_under_eight_threads(memory: MemoryTier, local: LocalTier) -> None:
    objects = ObjectStoreTier()
    chain = Chain(memory, [local, objects], wait_timeout=60.0)
    digests = [digest(f"threads {i}") for i in range(25)]
    produce = Producer()
    results: list[Any] = []
    lock = threading.Lock()
    before = counters.snapshot()

    def work(offset: int) -> None:
        for i in range(len(digests)):
            d = digests[(i + offset) % len(digests)]
            r = chain.obtain(d, load, produce, Event())
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work, args=(t * 3,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = len(digests)
    assert len(results) == 8 * n
    assert produce.calls == n, "one producer per digest"
    assert sum(isinstance(r, Produced) for r in results) == n
    assert memory.stats.hits == 7 * n, "every other call reused what one thread made"
    assert local.stats.snapshot() == {"hits": 0, "misses": n, "errors": 0, "puts": n, "quarantined": 0}
    assert objects.stats.snapshot() == {"hits": 0, "misses": n, "errors": 0, "puts": n, "quarantined": 0}
    assert counters.snapshot().minus(before).quarantined == 0


def test_tier_stats_are_exact_under_threads() -> None:
    stats = TierStats("t", process={"errors": "remote_errors"})
    before = counters.snapshot()

    def work() -> None:
        for _ in range(5000):
            stats.count(hits=1, errors=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.hits == stats.errors == 40_000
    assert counters.snapshot().minus(before).remote_errors == 40_000, "fed to the process counters too"
    with pytest.raises(ValueError):
        TierStats("t", process={"nonsense": "remote_errors"})


def test_wait_for_another_process_then_load(memory: MemoryTier, local: LocalTier, tmp_path: Path) -> None:
    other = _core.Store(tmp_path / "store", "ns")  # another process's handle on the same store
    d = digest("leased")
    held = other.lease(d, 0.0)
    assert held is not None
    chain = Chain(memory, [local], wait_timeout=30.0)
    produce = Producer()
    event = Event()
    out: list[Any] = []
    waiter = threading.Thread(target=lambda: out.append(chain.obtain(d, load, produce, event)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "it waits while the other process holds the lease"
    other.put(d, b"made elsewhere", 5.0)
    held.release()
    waiter.join(30)
    (found,) = out
    assert not isinstance(found, Produced) and found.tier == "local" and found.value() == b"made elsewhere"
    assert produce.calls == 0 and event.wait_seconds >= 0.4 and event.reason is None


def test_wait_that_ends_without_a_result_says_so(memory: MemoryTier, local: LocalTier, tmp_path: Path) -> None:
    other = _core.Store(tmp_path / "store", "ns")
    d = digest("never released")
    held = other.lease(d, 0.0)
    assert held is not None
    try:
        event = Event()
        produce = Producer()
        result = Chain(memory, [local], wait_timeout=0.3).obtain(d, load, produce, event)
        assert isinstance(result, Produced) and produce.calls == 1
        assert event.reason is not None and "another process" in event.reason and "compiling here" in event.reason
        assert event.wait_seconds >= 0.25
    finally:
        held.release()


def test_wait_for_another_thread(memory: MemoryTier, local: LocalTier) -> None:
    d = digest("claimed")
    assert memory.index.claim(d)  # another thread is producing it
    chain = Chain(memory, [local], wait_timeout=0.3)
    event = Event()
    result = chain.obtain(d, load, Producer(), event)
    assert isinstance(result, Produced)
    assert event.reason is not None and "another thread" in event.reason

    e = digest("claimed, then published")
    assert memory.index.claim(e)
    threading.Timer(0.2, lambda: memory.index.publish(e, lambda: b"by the other thread", 1.0)).start()
    produce = Producer()
    event = Event()
    found = Chain(memory, [local], wait_timeout=30.0).obtain(e, load, produce, event)
    assert not isinstance(found, Produced) and found.reused and found.value() == b"by the other thread"
    assert produce.calls == 0 and event.reason is None


def test_a_producer_that_raises_gives_up_its_claims(memory: MemoryTier, local: LocalTier) -> None:
    d = digest("interrupted")

    def interrupted() -> Produced[Callable[[], bytes]]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Chain(memory, [local]).obtain(d, load, interrupted, Event())
    assert memory.index.get(d) is None, "the thread claim is given up"
    lease = local.store.lease(d, 0.0)
    assert lease is not None, "the local lease is released"
    lease.release()


def test_store_errors_are_misses(memory: MemoryTier, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")

    class Unreadable(_FullStore):
        def get_checked(self, d: str) -> Any:
            raise _core.StoreError("Input/output error (os error 5)")

        def lease(self, d: str, timeout: float) -> Any:
            raise _core.StoreError("no locks here")

    local = LocalTier(Unreadable(_core.Store(tmp_path / "s", "ns")))  # type: ignore[arg-type]
    assert local.get(digest(1)) is None and local.get(digest(2)) is None
    assert local.lease(digest(1), 0.0) is NO_LEASE
    assert local.stats.errors == 2
    result = Chain(memory, [local]).obtain(digest(3), load, Producer(), Event())
    assert isinstance(result, Produced)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not be read" in m for m in messages) == 1
    assert sum("leases unavailable" in m for m in messages) == 1


def test_quarantine_is_counted_and_warned_once(local: LocalTier, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    d = digest("flipped")
    local.put(d, b"x" * 4096, 1.0)
    path = Path(local.store.object_path(d))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with counters.expect(quarantined=1):
        assert local.get(d) is None
        assert local.get(d) is None  # gone to quarantine: a plain miss now
    assert local.stats.quarantined == 1 and local.stats.misses == 2
    (warning,) = [r.getMessage() for r in caplog.records]
    assert d in warning and "checksum" in warning


def test_typed_lookup_results(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`Store.get_checked`'s typed results (Rust logs nothing): this tier logs and counts a bad file."""
    from types import SimpleNamespace

    caplog.set_level(logging.WARNING, logger="isocache")
    answers = {
        digest("hit"): SimpleNamespace(status="hit", payload=b"payload", compile_seconds=3.0),
        digest("miss"): SimpleNamespace(status="miss"),
        digest("bad"): SimpleNamespace(
            status="corrupt", reason="checksum mismatch", fate="quarantined", quarantined_to="/q/bad"
        ),
        digest("raced"): SimpleNamespace(status="corrupt", reason="length 3, header says 9", fate="gone"),
    }

    class Checked(_FullStore):
        def get_checked(self, d: str) -> Any:
            return answers[d]

    local = LocalTier(Checked(_core.Store(tmp_path / "s", "ns")))  # type: ignore[arg-type]
    hit = local.get(digest("hit"))
    assert hit is not None and (hit.value, hit.compile_seconds, hit.tier) == (b"payload", 3.0, "local")
    with counters.expect(quarantined=2):
        assert local.get(digest("miss")) is None
        assert local.get(digest("bad")) is None
        assert local.get(digest("raced")) is None
    assert local.stats.snapshot() == {"hits": 1, "misses": 3, "errors": 0, "puts": 0, "quarantined": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"isocache: ignoring bad artifact {digest('bad')}: checksum mismatch (moved to /q/bad)",
        f"isocache: ignoring bad artifact {digest('raced')}: length 3, header says 9 (already moved by another process)",
    ]
