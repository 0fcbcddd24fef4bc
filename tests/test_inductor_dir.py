"""Code that isocache loads is written only to private directories (Inductor's output included).

Inductor's directory is chosen once per process, checked by a no-follow walk, held by descriptor and
re-checked before each compile or load (`_torch.inductor_dir`); these run real compiles in fresh processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from isocache._torch import inductor_dir

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, isocache
    from pathlib import Path
    from isocache._torch import inductor_dir
    def f(x):
        return torch.cos(x) * 3 - 1
    def g(x):
        return torch.sin(x) * 2 + 1
    x = torch.randn(8)
    assert torch.allclose(torch.compile(f, backend="isocache")(x), f(x))
    sos = lambda d: sum(n.endswith(".so") for _, _, names in os.walk(d) for n in names)
    before = None
    if len(sys.argv) > 1:  # the directory renamed away and another put in its place, between two compiles
        d = Path(sys.argv[1])
        before = sos(d)
        d.rename(str(d) + "-moved")
        d.mkdir(mode=0o700)
        assert torch.allclose(torch.compile(g, backend="isocache")(x), g(x))
    s = isocache.stats()
    print(json.dumps({"compiled": s["compiled"], "loaded": s["loaded"], "in_use": inductor_dir.in_use(),
                      "env": os.environ["TORCHINDUCTOR_CACHE_DIR"], "sos_before_swap": before}))
    """
)


def run(tmp_path: Path, inductor: Path, *args: str, store: Path | None = None, **env: str) -> dict[str, Any]:
    environ = {
        **os.environ,
        "ISOCACHE_DIR": str(store or tmp_path / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], env=environ, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def held_by_descriptor(out: dict[str, Any]) -> bool:
    """Inductor was given the checked directory (the one isocache holds open)."""
    return bool(out["env"] == out["in_use"])


def test_private_inductor_dir_is_used_as_is(tmp_path: Path) -> None:
    mine = tmp_path / "inductor"
    out = run(tmp_path, mine)
    assert "not using Inductor's cache directory" not in out["stderr"]
    assert out["in_use"] == str(mine) and held_by_descriptor(out)
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
        out = run(tmp_path, shared)
        assert out["stderr"].count("not using Inductor's cache directory") == 1, out["stderr"]
        assert (out["compiled"], out["loaded"]) == ((1, 0) if run_number == 1 else (0, 1))
        assert out["in_use"] == str(tmp_path / "cache" / "inductor") and held_by_descriptor(out)
    assert files_under(shared) == [], "nothing is written to (or run from) a directory others can change"
    private = tmp_path / "cache" / "inductor"
    assert files_under(private)
    assert private.stat().st_mode & 0o077 == 0


def test_a_refused_store_root_is_never_used(tmp_path: Path) -> None:
    team = tmp_path / "team"  # a team directory anyone can write, given as ISOCACHE_DIR
    shared = tmp_path / "shared-inductor"
    for d in (team, shared):
        d.mkdir()
        d.chmod(0o777)
    out = run(tmp_path, shared, store=team)
    assert out["stderr"].count("fresh private temporary directory") == 1, out["stderr"]
    assert out["compiled"] == 1
    used = Path(out["in_use"])
    assert used.name.startswith("isocache-inductor-") and held_by_descriptor(out)
    assert not used.exists(), "the temporary directory is removed at exit"
    assert files_under(team) == [] and files_under(shared) == []
    assert not (team / "inductor").exists()


def test_a_symlinked_inductor_dir_in_the_store_is_not_followed(tmp_path: Path) -> None:
    store, elsewhere, shared = tmp_path / "cache", tmp_path / "elsewhere", tmp_path / "shared-inductor"
    store.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o777)
    (store / "inductor").symlink_to(elsewhere)
    out = run(tmp_path, shared, store=store)
    assert "symbolic link" in out["stderr"] and out["stderr"].count("fresh private temporary directory") == 1
    assert out["compiled"] == 1, "the store itself is private and used"
    assert files_under(elsewhere) == [] and files_under(shared) == []


def test_a_swap_after_the_first_compile_redirects_nothing(tmp_path: Path) -> None:
    """Between two compiles in one process (Inductor's compile subprocesses and a compile worker
    included), the checked directory is renamed away and another put in its place: the next
    compile notices and moves on to the store's directory, never into the replacement."""
    mine = tmp_path / "inductor"
    out = run(tmp_path, mine, str(mine), TORCHINDUCTOR_COMPILE_THREADS="2", ISOCACHE_COMPILE_WORKERS="1")
    assert out["compiled"] == 2 and held_by_descriptor(out)
    assert out["stderr"].count("no longer names the directory checked before") == 1, out["stderr"]
    assert files_under(mine) == [], "nothing was written to (so nothing loaded from) the directory put in its place"
    store_dir = tmp_path / "cache" / "inductor"
    assert out["in_use"] == str(store_dir)
    assert any(p.suffix == ".so" for p in files_under(store_dir)), "g compiled into the store's private directory"


def test_problems_are_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert inductor_dir.private_dir_problem(str(d)) is None
    d.chmod(0o770)
    assert "lets others write" in (inductor_dir.private_dir_problem(str(d)) or "")
    d.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    assert "symbolic link" in (inductor_dir.private_dir_problem(str(link)) or ""), "a link is a problem"
    f = tmp_path / "f"
    f.write_text("")
    assert "not a directory" in (inductor_dir.private_dir_problem(str(f)) or "")
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    (open_parent / "child").mkdir(mode=0o700)
    open_parent.chmod(0o777)
    assert "writable by others" in (inductor_dir.private_dir_problem(str(open_parent / "child")) or "")
    open_parent.chmod(0o1777)  # sticky, like /tmp
    assert inductor_dir.private_dir_problem(str(open_parent / "child")) is None
