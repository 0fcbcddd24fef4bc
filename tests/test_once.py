"""Warn once: one line per key and process, from a bounded memory that forgets its oldest keys first."""

from __future__ import annotations

import logging
import threading

import pytest

from isocache import _once


@pytest.fixture(autouse=True)
def forget() -> None:
    _once.forget()


def test_a_key_is_logged_once_at_its_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    assert _once.warn_once("k", "isocache: %s happened", "this")
    assert not _once.warn_once("k", "isocache: %s happened", "this")
    assert _once.info_once("other", "isocache: worth knowing")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "isocache: this happened"),
        (logging.INFO, "isocache: worth knowing"),
    ]


def test_memory_is_bounded_and_forgets_the_oldest_key_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="isocache")  # thousands of lines: keep them out of the report
    for i in range(_once.MAX_KEYS):
        assert _once.warn_once(("key", i), "isocache: %d", i)
    assert not _once.warn_once(("key", 0), "isocache: 0"), "a full memory still holds its oldest key"
    assert _once.warn_once("one more", "isocache: one more")
    assert _once.warn_once(("key", 0), "isocache: 0"), "the oldest key was forgotten to make room"
    assert not _once.warn_once(("key", _once.MAX_KEYS - 1), "isocache: newest"), "newer keys stay"
    assert not _once.warn_once("one more", "isocache: one more")
    assert _once.warn_once(("key", 1), "isocache: 1"), "then the next oldest"


def test_threads_log_a_key_once() -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def say() -> None:
        barrier.wait()
        results.append(_once.warn_once("shared", "isocache: shared"))

    threads = [threading.Thread(target=say) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
