"""Code that isocache loads is written only to private directories (Inductor's output included)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from isocache._torch import inductor

SCRIPT = textwrap.dedent(
    """
    import os, torch, isocache
    def f(x):
        return torch.cos(x) * 3 - 1
    x = torch.randn(8)
    out = torch.compile(f, backend="isocache")(x)
    assert torch.allclose(out, f(x))
    s = isocache.stats()
    print("paths", s["compiled"], s["loaded"], os.environ["TORCHINDUCTOR_CACHE_DIR"])
    """
)


def run(tmp_path: Path, inductor_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ISOCACHE_DIR": str(tmp_path / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_private_inductor_dir_is_used_as_is(tmp_path: Path) -> None:
    mine = tmp_path / "inductor"
    proc = run(tmp_path, mine)
    assert proc.returncode == 0, proc.stderr
    assert "not private" not in proc.stderr
    assert proc.stdout.split()[-1] == str(mine)
    assert files_under(mine)


@pytest.mark.parametrize("owner", ["me", "someone-else"])
def test_inductor_dir_others_can_write_is_not_used(tmp_path: Path, owner: str) -> None:
    shared = tmp_path / "shared-inductor"
    shared.mkdir()
    if owner == "me":
        shared.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a directory to another user")
        os.chown(shared, 12345, 12345)
    for run_number in (1, 2):  # compile, then load in a new process
        proc = run(tmp_path, shared)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("Inductor's cache directory") == 1, proc.stderr
        assert "not private" in proc.stderr
        compiled, loaded, used = proc.stdout.split()[1:]
        assert (int(compiled), int(loaded)) == ((1, 0) if run_number == 1 else (0, 1))
        assert used == str(tmp_path / "cache" / "inductor")
    assert files_under(shared) == [], "nothing is written to (or run from) a directory others can change"
    private = tmp_path / "cache" / "inductor"
    assert files_under(private)
    assert private.stat().st_mode & 0o077 == 0


def test_problems_are_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert inductor.private_dir_problem(str(d)) is None
    d.chmod(0o770)
    assert "lets others write" in (inductor.private_dir_problem(str(d)) or "")
    d.chmod(0o700)
    f = tmp_path / "f"
    f.write_text("")
    assert "not a directory" in (inductor.private_dir_problem(str(f)) or "")
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    (open_parent / "child").mkdir(mode=0o700)
    open_parent.chmod(0o777)
    assert "lets others replace it" in (inductor.private_dir_problem(str(open_parent / "child")) or "")
    open_parent.chmod(0o1777)  # sticky, like /tmp
    assert inductor.private_dir_problem(str(open_parent / "child")) is None
