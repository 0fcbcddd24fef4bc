"""One GPU check in under five minutes: the demo and the model tests on CUDA.

On a machine with a GPU but no Rust toolchain, build the abi3 wheel first where
Rust is available (``maturin build --release``), carry ``target/wheels`` and::

    pip install --no-deps target/wheels/isocache-*.whl
    python benches/gpu_check.py

Prints one line per step and exits non-zero when any step fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], env: dict[str, str]) -> tuple[bool, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    took = time.perf_counter() - start
    ok = proc.returncode == 0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    print(f"[{'ok' if ok else 'FAIL'}] {name} ({took:.1f} s)")
    for line in tail:
        print(f"    {line}")
    return ok, proc.stdout


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, Python {sys.version.split()[0]}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ISOCACHE_DIR": str(Path(tmp) / "cache")}
        demo = [sys.executable, "-m", "isocache", "demo", "--device", "cuda", "--layers", "8"]
        ok, _ = step("demo on CUDA, cold store", demo, env)
        results.append(ok)
        ok, out = step("demo on CUDA, second process", demo, env)
        results.append(ok and "0 compiled" in out)
        if ok and "0 compiled" not in out:
            print("    expected the second process to compile nothing")
        ok, _ = step(
            "model tests on CUDA",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "tests/test_backend.py",
                "tests/test_precompile.py",
                "-m",
                "cuda",
            ],
            env,
        )
        results.append(ok)
    print(f"gpu check: {sum(results)}/{len(results)} steps passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
