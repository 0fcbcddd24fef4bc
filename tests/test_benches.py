"""The benchmark harness runs end to end with its smallest settings (so it cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_harness_smallest_settings(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benches" / "run.py"),
            "--layers", "2", "--repeats", "1", "--hidden", "64", "--seq", "16", "--steady", "2",
            "--processes", "1", "2", "--out", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("digest.json", "reuse.json", "startup.json", "summary.md", "startup.png", "processes.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    startup = json.loads((tmp_path / "startup.json").read_text())
    methods = {row["method"] for row in startup["rows"].values()}
    assert methods == {"eager", "dynamo", "inductor", "regional", "aot_compile", "isocache", "isocache_compile"}
    for row in startup["rows"].values():
        assert row["max_abs_err"] < 1e-3, row["method"]
    iso = startup["rows"]["isocache_compile/2"]
    assert iso["isocache_compiled_cold_warm_loaded"][0][1] == 0, "the warm run compiles nothing"
    assert startup["processes"]["2"]["compiled"] == startup["processes"]["1"]["compiled"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| target | measured | met |" in summary
