"""The command line shows kinds and uses the core's one eviction order."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from isocache import _core

D1 = "a" * 64
D2 = "0123456789abcdef" * 4
D3 = "fedcba9876543210" * 4


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isocache", *args], capture_output=True, text=True, timeout=300, env=env
    )


def cli_json(*args: str) -> Any:
    proc = cli(*args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def store_with_a_model(root: Path) -> _core.Store:
    store = _core.Store(root, "ns")
    store.put(D1, b"p" * 872, 1.0)
    store.put(D2, b"m" * 872, 5.0, kind="model")
    return store


def test_ls_and_stats_show_kinds(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store_with_a_model(root)
    listing = cli_json("ls", "--dir", str(root))
    assert {e["digest"]: e["kind"] for e in listing} == {D1: "piece", D2: "model"}
    text = cli("ls", "--dir", str(root)).stdout
    assert "kind" in text.splitlines()[0] and "model" in text and "piece" in text
    (ns,) = cli_json("stats", "--dir", str(root))["namespaces"]
    assert (ns["artifacts"], ns["pieces"], ns["models"], ns["bytes"]) == (2, 1, 1, 2000)
    stats = cli_json("stats", "--dir", str(root))
    assert (stats["artifacts"], stats["bytes"]) == (2, 2000), "the root's running size"
    assert "models" in cli("stats", "--dir", str(root)).stdout


def test_verify_names_the_failed_check_and_counts_kinds(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = store_with_a_model(root)
    store.put(D3, b"q" * 100)
    path = store.object_path(D3)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    report = cli_json("verify", "--dir", str(root))
    assert (report["checked"], report["pieces"], report["models"]) == (3, 1, 1)
    (bad,) = report["bad"]
    assert (bad["digest"], bad["corruption"], bad["reason"]) == (D3, "checksum", "checksum mismatch")
    text = cli("verify", "--dir", str(root)).stdout
    assert "1 pieces and 1 models good, 1 bad" in text and "checksum" in text


def test_gc_evicts_across_namespaces_least_recently_used_first(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = store_with_a_model(root)
    other = _core.Store(root, "other")
    other.put(D3, b"o" * 872)
    for s, d, t in ((store, D1, 30), (store, D2, 10), (other, D3, 20)):
        os.utime(s.object_path(d), (1_000_000 + t, 1_000_000 + t))
    r = cli_json("gc", "--dir", str(root), "--max-bytes", "1500")
    assert (r["removed"], r["remaining"], r["remaining_bytes"]) == (2, 1, 1000)
    assert r["removed_by_kind"] == {"piece": 1, "model": 1}
    assert store.get_checked(D1).payload is not None and store.get_checked(D2).payload is None
    assert other.get_checked(D3).payload is None
    assert _core.root_size(root).bytes == 1000
    text = cli("gc", "--dir", str(root), "--max-bytes", "0").stdout
    assert "removed 1 artifacts (1 pieces, 0 models" in text


def test_demo_runs_and_its_second_run_compiles_nothing(tmp_path: Path) -> None:
    """The README's first command: the second process loads every distinct piece (on every supported torch).
    Its second run is the demo's part of `test_every_command_speaks_json`."""
    args = ("demo", "--layers", "3", "--device", "cpu", "--dir", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if k != "ISOCACHE_COMPILE_WORKERS"}  # as a user runs it
    env["ISOCACHE_COMPILE_WORKERS"] = "1"  # the default on two cores, whatever this machine has
    first, second = cli(*args, env=env), cli(*args, "--json", env=env)
    for proc in (first, second):
        assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "output matches eager: yes" in first.stdout
    counts = re.search(r"pieces: (\d+) \((\d+) compiled, (\d+) loaded, (\d+) reused", first.stdout)
    assert counts and [int(g) for g in counts.groups()][1:3] == [3, 0], f"3 distinct pieces compiled: {first.stdout}"
    assert "run it again" in first.stdout
    # Each figure once: the compile time the INFO line gives, rounded the same, and no second one.
    (line,) = [x for x in first.stdout.splitlines() if x.startswith("first call:")]
    timed = re.fullmatch(
        r"first call: [\d.]+ s \(Dynamo tracing ([\d.]+) s; 3 distinct pieces compiled, 1 reused in ([\d.]+) s; "
        r"the other [\d.]+ s: .*\)",
        line,
    )
    assert timed, line
    info = re.search(r"isocache: compile range .*\) in ([\d.]+) s after ([\d.]+) s of Dynamo tracing", first.stderr)
    assert info, first.stderr[-2000:]
    # the same figures as the INFO line's, to the rounding
    assert abs(float(timed[2]) - float(info[1])) < 0.006 and abs(float(timed[1]) - float(info[2])) < 0.006
    assert [x for x in first.stdout.splitlines() if re.search(r"\d s\b", x)] == [line], "no second compile time"
    assert "isocache: isocache" not in first.stdout + first.stderr
    data = json.loads(second.stdout)  # nothing else on stdout
    assert data["matches_eager"] is True and (data["compiled"], data["loaded"]) == (0, 3), data


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one model entry saved by `isocache.compile` (a 4-layer Llama); read only."""
    import torch

    import isocache
    from isocache._torch import dynamo
    from support import MODELS, token_ids

    if not dynamo.aot_compile_supported():
        pytest.skip("isocache.compile saves models on a newer torch (tests/test_torch_versions.py)")
    root = tmp_path_factory.mktemp("saved") / "cache"
    model = MODELS["llama"](4)
    model.config.use_cache = False
    with torch.no_grad():
        isocache.compile(model, cache_dir=root)(token_ids())
    return root


def test_explain_shows_which_pieces_of_a_saved_model_share_a_digest(saved_model: Path) -> None:
    (entry,) = cli_json("explain", "--dir", str(saved_model))
    assert (entry["model"], entry["pieces"], entry["distinct"]) == ("LlamaModel", 5, 3)
    assert [g["pieces"] for g in entry["digests"]] == [[0], [1, 2, 3], [4]]
    assert all(g["in_store"] for g in entry["digests"])
    text = cli("explain", "--dir", str(saved_model)).stdout
    assert "LlamaModel" in text and "5 pieces, 3 compiled" in text and "pieces 1-3 (3)" in text


@pytest.mark.parametrize("command", ["ls", "explain", "stats", "verify"])
def test_the_read_only_commands_never_import_torch(command: str, saved_model: Path) -> None:
    """On a store holding a saved model (whose entry `explain` reads), in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from isocache.__main__ import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([{command!r}, "--dir", {str(saved_model)!r}])
        assert code == 0, (code, out.getvalue())
        assert "torch" not in sys.modules, "the command imported torch"
        print(out.getvalue())
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert command != "explain" or "LlamaModel" in proc.stdout, "the saved model is read"


def test_explain_without_saved_models_says_why(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store_with_a_model(root)  # its "model" is not an entry isocache.compile wrote
    proc = cli("explain", "--dir", str(root))
    assert proc.returncode == 0 and "no saved models" in proc.stdout


def test_stats_shows_what_makes_each_namespace_and_diff_names_grad_mode(tmp_path: Path) -> None:
    import torch

    import isocache

    root = tmp_path / "cache"
    backend = isocache.Backend(cache_dir=root, compile_workers=0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(2, 8)
    torch.compile(model, backend=backend)(x)  # a training graph: grad mode is on
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    namespaces = {ns["namespace"]: ns["fields"] for ns in cli_json("stats", "--dir", str(root))["namespaces"]}
    assert sorted(f["grad_mode"] for f in namespaces.values()) == ["disabled", "enabled"]
    for fields in namespaces.values():
        assert fields["torch"] == torch.__version__ and fields["device"] == "cpu"
        assert {"capability", "inductor_config", "inductor_options", "python"} <= fields.keys()
    text = cli("stats", "--dir", str(root)).stdout
    assert "what makes each namespace" in text and "grad_mode" in text and torch.__version__ in text

    on, off = sorted(namespaces, key=lambda ns: namespaces[ns]["grad_mode"], reverse=True)
    diff = cli_json("stats", "--dir", str(root), "--diff", on, off[:12])  # a unique prefix will do
    assert [d["field"] for d in diff["differ"]] == ["grad_mode"], "only grad mode differs"
    assert (diff["differ"][0][on], diff["differ"][0][off]) == ("enabled", "disabled")
    proc = cli("stats", "--dir", str(root), "--diff", on, off)
    assert proc.returncode == 0 and "1 field differs" in proc.stdout and "grad_mode" in proc.stdout
    assert "no field differs" in cli("stats", "--dir", str(root), "--diff", on, on).stdout


def test_stats_diff_names_what_it_cannot_compare(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store_with_a_model(root)  # a namespace with no recorded fields
    _core.Store(root, "other").describe('{"grad_mode": "enabled"}')
    assert "has no record of its fields" in cli("stats", "--dir", str(root)).stdout
    proc = cli("stats", "--dir", str(root), "--diff", "ns", "other")
    assert proc.returncode == 2 and "ns has no record of its fields" in proc.stderr
    proc = cli("stats", "--dir", str(root), "--diff", "ns", "cpu-0000")
    assert proc.returncode == 2 and "'cpu-0000' is not a namespace of this store (namespaces: ns, other)" in proc.stderr


#: Arguments each command runs with in `test_every_command_speaks_json` (beyond --dir and --json);
#: the demo's --json run is in `test_demo_runs_and_its_second_run_compiles_nothing`.
COMMAND_ARGS: dict[str, tuple[str, ...]] = {
    "demo": (),
    "stats": (),
    "ls": (),
    "verify": (),
    "explain": (),
    "gc": ("--max-bytes", "10G"),
    "clear": (),
    "keygen": (),
    "pack": ("-o", "{archive}"),
    "unpack": ("{archive}",),
}


def test_every_command_is_driven_by_the_json_test() -> None:
    from isocache.__main__ import COMMANDS

    assert sorted(c.name for c in COMMANDS) == sorted(COMMAND_ARGS), "a new command: add it to COMMAND_ARGS"


@pytest.mark.parametrize("command", [c for c in COMMAND_ARGS if c != "demo"])
@pytest.mark.parametrize("before", [True, False], ids=["options-first", "options-last"])
def test_every_command_speaks_json(command: str, before: bool, tmp_path: Path) -> None:
    """One grammar: --dir and --json before or after the command's name, one JSON document on stdout."""
    root = tmp_path / "cache"
    store_with_a_model(root)
    options = ("--dir", str(root), "--json")
    archive = str(tmp_path / "cache.tar")
    if command == "unpack":
        assert cli("pack", "--dir", str(root), "-o", archive).returncode == 0
    own = tuple(arg.format(archive=archive) for arg in COMMAND_ARGS[command])
    argv = (*options, command, *own) if before else (command, *own, *options)
    proc = cli(*argv)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data is not None
    if command in ("stats", "ls"):  # --dir was read wherever it came
        assert (data["artifacts"] if command == "stats" else len(data)) == 2
    if command == "keygen":
        assert len(bytes.fromhex(data["key"])) == 32 and proc.stderr == ""


def test_an_empty_store_reads_the_same_in_every_command(tmp_path: Path) -> None:
    said = set()
    for command in ("stats", "ls", "verify", "gc", "clear"):
        proc = cli(command, "--dir", str(tmp_path / "none"))
        assert proc.returncode == 0, proc.stderr
        said.add(proc.stdout.strip())
    assert said == {f"no artifacts in {tmp_path / 'none'} (an empty store, or none yet)"}


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """`python -m isocache ls | head`: whoever reads stops; no traceback, exit status 0."""
    root = tmp_path / "cache"
    store_with_a_model(root)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "isocache", "ls", "--dir", str(root)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_exit_status_two_for_usage_errors(tmp_path: Path) -> None:
    for argv in (("stats", "--bogus"), ("nonsense",), ("keygen", "--fix")):
        proc = cli(*argv)
        assert proc.returncode == 2 and "usage:" in proc.stderr, argv
