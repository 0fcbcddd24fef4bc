"""Shared fixtures: tiny `transformers` models from configs, Dynamo capture."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Keep compiles on the two CI cores predictable and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compile worker processes are tested by test_compile_workers.py, the demo test and the
# multi-process test; elsewhere pieces compile in-process, so each test's counts and
# timings do not depend on worker start-up (CI has two cores).
os.environ.setdefault("ISOCACHE_COMPILE_WORKERS", "0")
# An empty Inductor cache for the session, as on CI's clean checkout: a cache that earlier
# runs on this machine filled hides what only a first compile does.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="isocache-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker its own directory, as a machine of its own: compile workers are one
    # set per Inductor directory (machine-wide slots), and a test that starts them needs them free.
    _own = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(_own, mode=0o700, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _own
# Under pytest-xdist (scripts/check runs two workers) the cores are shared between workers:
# each worker's tests, and the processes they start (OMP_NUM_THREADS), take their share, since
# OpenMP threads that lose their core spin and slow a forward many times over.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
torch.set_num_threads(_threads)

from support import DEVICES, HAS_CUDA, MODELS, capture, reset_process_state, token_ids

__all__ = ["DEVICES", "HAS_CUDA", "MODELS", "capture", "token_ids"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test parametrized with the "cuda" device is marked ``cuda`` (``-m cuda`` selects the GPU
    checks) and skipped, with the reason, where no GPU is present."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "cuda" in callspec.params.values():
            item.add_marker(pytest.mark.cuda)
            if not HAS_CUDA:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def fresh_process() -> Iterator[None]:
    """Each test starts as a new process would: Dynamo's caches, the index, counters, warnings."""
    reset_process_state()
    yield
    reset_process_state()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh private ISOCACHE_DIR for the test."""
    d = tmp_path / "isocache"
    monkeypatch.setenv("ISOCACHE_DIR", str(d))
    return d


@pytest.fixture
def caplog_isocache(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="isocache")
    return caplog
