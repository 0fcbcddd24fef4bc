"""The benchmark harness runs end to end (so it cannot rot).

The default suite runs it with its smallest settings and isocache's own
methods against eager; the run against every peer is marked ``slow``
(``python -m pytest -m slow``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = {"eager", "dynamo", "inductor", "regional", "aot_compile", "isocache", "isocache_compile"}


def run_harness(out: Path, methods: list[str], processes: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "run.py"),
            "--layers",
            "2",
            "--repeats",
            "1",
            "--hidden",
            "64",
            "--seq",
            "16",
            "--steady",
            "2",
            "--methods",
            *methods,
            "--processes",
            *processes,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("digest.json", "reuse.json", "startup.json", "summary.md", "startup.png", "processes.png"):
        assert (out / name).stat().st_size > 0, name
    startup: dict[str, object] = json.loads((out / "startup.json").read_text())
    summary = (out / "summary.md").read_text()
    assert "| target | measured | met |" in summary
    return startup


def check_rows(startup: dict[str, object], methods: set[str]) -> None:
    rows = startup["rows"]
    assert isinstance(rows, dict)
    assert {row["method"] for row in rows.values()} == methods
    for row in rows.values():
        assert row["max_abs_err"] < 1e-3, row["method"]
    iso = rows["isocache_compile/2"]
    assert iso["isocache_compiled_cold_warm_loaded"][0][1] == 0, "the warm run compiles nothing"


def test_benchmark_harness_smallest_settings(tmp_path: Path) -> None:
    # isocache.compile runs the backend's pipeline; the backend alone is measured by the slow run.
    # aot_compile: the peer whose harness code reaches into isocache (it broke once unnoticed).
    from isocache._torch import dynamo

    # torch's aot_compile (the peer) exists from the torch isocache.compile's warm start needs.
    methods = ["eager", "isocache_compile"]
    if dynamo.aot_compile_supported():
        methods.insert(1, "aot_compile")
    startup = run_harness(tmp_path, methods, ["1"])
    check_rows(startup, set(methods))
    (one,) = startup["processes"].values()  # type: ignore[attr-defined]
    assert one["compiled"] == 3 and one["peak_pss_bytes"] > 0 and one["peak_python_processes"] >= 1, one


@pytest.mark.slow
def test_benchmark_harness_every_peer(tmp_path: Path) -> None:
    startup = run_harness(tmp_path, sorted(ALL_METHODS), ["1", "2"])
    check_rows(startup, ALL_METHODS)
    processes = startup["processes"]
    assert isinstance(processes, dict)
    assert processes["2"]["compiled"] == processes["1"]["compiled"]


def test_generate_benchmark_smallest_settings(tmp_path: Path) -> None:
    from isocache._torch import dynamo

    if not dynamo.aot_compile_supported():
        pytest.skip("isocache.compile's warm start needs a newer torch (tests/test_torch_versions.py)")
    size = ["--layers", "2", "--hidden", "64", "--prompt", "8", "--new", "8", "--repeats", "1", "--steady", "1"]
    methods = ["--methods", "eager", "isocache_compile", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "generate.py"), *size, *methods],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert set(rows) == {"eager", "isocache_compile"}
    assert all(row["tokens_equal"] for row in rows.values())
    (warm,) = rows["isocache_compile"]["isocache_warm"]
    assert (warm["compiled"], warm["models_loaded"], warm["trace_seconds"]) == (0, 2, 0.0)
    summary = (tmp_path / "summary.md").read_text()
    assert "time to first token" in summary and "| target | measured | met |" in summary
