"""Compile workers: distinct pieces compile at once in other processes, and every failure falls back."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import isocache
from isocache import _core, compile_workers
from isocache._torch import inductor
from isocache.report import counters
from support import MODELS, compile_llama, token_ids

needs_workers = pytest.mark.skipif(
    not inductor.workers_supported(),
    reason="compile workers need torch >= {}.{} (test_workers_say_once_that_this_torch_is_too_old)".format(
        *inductor.WORKERS_SINCE
    ),
)


@pytest.fixture(autouse=True)
def workers_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_COMPILE_WORKERS", "2")  # the rest of the suite compiles in-process
    # A pool warmed before a compile must outlive the trace that precedes the first piece, however
    # long a busy machine takes (the idle-exit test sets its own).
    monkeypatch.setenv("ISOCACHE_WORKER_IDLE", "600")


def warm_pool() -> compile_workers.CompileWorkers:
    pool = compile_workers.pool("cpu")
    assert pool is not None and pool.size == 2
    with pool.claim():  # however long a busy machine takes to warm them up
        assert all(pool.wait_ready(k) for k in range(pool.size)), "both workers warmed up"
    return pool


def _kernel_sources_built_since(start: float) -> list[str]:
    """The C++ source of each kernel library built in Inductor's directory since `start`."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    built = [p for p in Path(cache_dir()).rglob("*.so") if p.stat().st_mtime >= start - 1]
    return [p.with_suffix(".cpp").read_text() for p in built if p.with_suffix(".cpp").exists()]


@needs_workers
def test_distinct_pieces_compile_at_once_in_workers_and_are_published(cache_dir: Path) -> None:
    pool = warm_pool()
    start = time.time()
    with counters.expect(compiled=3, loaded=0, failed=0):
        actual, expected = compile_llama(cache_dir, 2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    sources = _kernel_sources_built_since(start)
    assert len(sources) == len(set(sources)), "a kernel a worker built was built again here: their build keys differ"
    results = list(pool.history)
    assert len(results) == 3, "every distinct piece was compiled by a worker"
    assert {r.pid for r in results} == set(pool.pids), "both workers compiled"
    first, second = sorted(results, key=lambda r: r.sent)[:2]
    assert second.sent < first.received, "two pieces were being compiled at the same time"
    (namespace,) = _core.list_namespaces(cache_dir)
    assert len(_core.Store(cache_dir, namespace).list()) == 3, "the store holds every piece"

    isocache.reset_stats()
    torch._dynamo.reset()
    from isocache.tiers.memory import process_index

    process_index().clear()
    with counters.expect(compiled=0, loaded=3):
        again, _ = compile_llama(cache_dir, 2)
    assert len(pool.history) == 3, "a warm start loads; nothing is sent to the workers"
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


@needs_workers
def test_a_compile_does_not_wait_for_warm_ups_once_this_process_compiled_every_piece(cache_dir: Path) -> None:
    pool = compile_workers.pool("cpu")
    assert pool is not None

    def let_go() -> None:
        for pid in pool.pids:
            os.kill(pid, signal.SIGCONT)

    for pid in pool.pids:  # workers that do not finish warming up until let go
        os.kill(pid, signal.SIGSTOP)
    later = threading.Timer(120, let_go)  # a compile that waits for them fails below instead of hanging
    later.start()
    with pool.claim():
        try:
            with counters.expect(compiled=3, failed=0):
                actual, expected = compile_llama(cache_dir, 2)
            assert not pool.ready(), "the compile returned while the workers were still warming up"
        finally:
            later.cancel()
            let_go()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert not pool.history, "this process compiled every piece"


@needs_workers
def test_dead_workers_fall_back_to_compiling_here(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    pool = warm_pool()
    for pid in pool.pids:
        os.kill(pid, signal.SIGKILL)
    with counters.expect(compiled=3, failed=0):
        actual, expected = compile_llama(cache_dir, 2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    died = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert len(died) == 1 and "compiled here" in died[0], died
    assert not pool.history


@needs_workers
def test_a_piece_a_worker_cannot_compile_takes_the_path_it_takes_here(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    pool = warm_pool()
    # A C++ compiler that does not exist (a valid option, so the backend takes it): each worker reports
    # the failure, then this process tries and falls back.
    backend = isocache.Backend(cache_dir=cache_dir, inductor_options={"cpp.cxx": (None, "no-such-compiler")})
    model, ids = MODELS["llama"](2), token_ids()
    with torch.no_grad(), counters.expect(compiled=0, failed=3):
        actual = torch.compile(model, backend=backend)(ids).last_hidden_state
        torch.testing.assert_close(actual, model(ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    reasons = [r.getMessage() for r in caplog.records if "worker could not compile" in r.getMessage()]
    assert len(reasons) == 3 and all("no-such-compiler" in m for m in reasons), reasons
    assert len(pool) == 2, "a failed piece does not cost a worker"


@needs_workers
def test_workers_never_outlive_their_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys, time
        from isocache import compile_workers
        pool = compile_workers.pool("cpu", 2)
        print(" ".join(map(str, pool.pids)), flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "ISOCACHE_DIR": str(tmp_path / "cache")}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60  # a worker still warming up notices after its warm-up
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "workers exit when the process that started them dies"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_are_off_with_zero_or_one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_COMPILE_WORKERS", "0")
    assert compile_workers.pool("cpu") is None
    monkeypatch.delenv("ISOCACHE_COMPILE_WORKERS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert compile_workers.default_count() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    assert compile_workers.default_count() == 4


@pytest.mark.skipif(inductor.workers_supported(), reason="this torch supports compile workers")
def test_workers_say_once_that_this_torch_is_too_old(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    assert compile_workers.pool("cpu") is None and compile_workers.pool("cpu") is None
    with counters.expect(compiled=3, failed=0):
        actual, expected = compile_llama(cache_dir, 2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if "compile workers need torch" in r.getMessage()]
    assert len(lines) == 1 and torch.__version__ in lines[0], lines


_ISAS = textwrap.dedent(
    """
    import json, os, sys
    from torch._inductor import cpu_vec_isa
    checks = []
    real_check = cpu_vec_isa.VecISA.check_build
    def counted(self, code):
        checks.append(str(self))
        return real_check(self, code)
    cpu_vec_isa.VecISA.check_build = counted
    if sys.argv[1] == "isocache":
        from isocache import process
        from isocache._torch import inductor
        process.ensure_private_inductor_dir()
        inductor.probe_cpu_isas()
    builds = lambda: sum(name.endswith(".so") for _, _, names in os.walk(os.environ["TORCHINDUCTOR_CACHE_DIR"])
                         for name in names)
    before = builds()
    valid = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    print(json.dumps({"valid": valid, "picked": str(cpu_vec_isa.pick_vec_isa()), "built_after_probe": builds() - before,
                      "checks": len(checks)}))
    """
)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the vector-ISA probe is x86's")
def test_the_isa_probe_builds_once_and_inductor_picks_what_it_would_alone(tmp_path: Path) -> None:
    import json

    found = {}
    for how in ("isocache", "inductor"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / how))
        out = subprocess.run([sys.executable, "-c", _ISAS, how], env=env, capture_output=True, text=True, check=True)
        found[how] = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["isocache"]["valid"] == found["inductor"]["valid"]
    assert found["isocache"]["picked"] == found["inductor"]["picked"]
    assert found["isocache"]["built_after_probe"] == 0, "Inductor's own check built nothing more"
    if len(found["inductor"]["valid"]) > 1:
        assert found["inductor"]["built_after_probe"] >= len(found["inductor"]["valid"]), "alone it builds each"
    # A later process with the same Inductor directory takes the recorded outcome: no build, no loader process.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "isocache"))
    out = subprocess.run([sys.executable, "-c", _ISAS, "isocache"], env=env, capture_output=True, text=True, check=True)
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert (again["valid"], again["picked"]) == (found["inductor"]["valid"], found["inductor"]["picked"])
    assert found["isocache"]["checks"] >= 1 and again["checks"] == 0, (found, again)


@needs_workers
def test_workers_exit_when_idle_and_a_later_compile_starts_fresh_ones(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOCACHE_WORKER_IDLE", "1")
    pool = warm_pool()
    with pool.claim(), counters.expect(compiled=3):  # held while tracing, as isocache.compile holds it
        compile_llama(cache_dir, 2)
    assert pool.history, "the workers compiled"
    _wait_until(lambda: pool.closed and not any(_alive(p) for p in pool.pids), "idle workers exit")
    _wait_until(lambda: not _slot_files_open(), "the closed pool gave back its machine-wide slots")
    fresh = compile_workers.pool("cpu")
    assert fresh is not None and fresh is not pool, "a fresh pool for the next compile"
    fresh.close()


def _slot_files_open() -> bool:
    """Whether this process still holds a compile-worker slot (a lock file ``compile-worker-<i>.lock``)."""
    found = False
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found = found or "compile-worker-" in os.readlink(f"/proc/self/fd/{fd}")
    return found


@needs_workers
def test_workers_still_warming_up_stop_once_nothing_is_queued(cache_dir: Path) -> None:
    pool = compile_workers.pool("cpu")
    assert pool is not None
    with pool.claim():
        pass  # nothing to compile: the claim ends before any worker is warm
    assert not pool.ready() and len(pool) == 0, "no worker warms up for nothing"
    _wait_until(lambda: not any(_alive(p) for p in pool.pids), "the warming workers were stopped")


@needs_workers
def test_processes_on_one_machine_share_one_set_of_workers(tmp_path: Path) -> None:
    mine = compile_workers.pool("cpu")
    assert mine is not None and mine.size == 2
    script = "from isocache import compile_workers; print(compile_workers.pool('cpu') is None)"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert other.stdout.strip() == "True", other.stderr[-2000:]
    mine.close()
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert other.stdout.strip() == "False", "the slots are free once this process's workers are gone"


def _wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
