"""The backend end to end: real Inductor compiles of real models on CPU (and CUDA when present)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import isocache
from conftest import DEVICES, MODELS, capture, token_ids
from isocache import _core
from isocache._torch import inductor, release
from isocache.backend import Backend, process_index
from isocache.report import counters
from support import run_python

SUMMARY = re.compile(
    r"^isocache: compile range (?P<range>.+): (?P<n>\d+) pieces? \((?P<c>\d+) compiled, "
    r"(?P<l>\d+) loaded, (?P<r>\d+) reused(?:, (?P<f>\d+) failed)?\) in \d+\.\d{3} s"
    r"(?: after \d+\.\d{3} s of Dynamo tracing)?$"
)


def summaries(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    out = []
    for r in caplog.records:
        if r.name == "isocache" and r.levelno == logging.INFO and r.getMessage().startswith("isocache: compile range"):
            m = SUMMARY.match(r.getMessage())
            assert m, f"malformed summary line: {r.getMessage()!r}"
            out.append(m)
    return out


def piece_paths(caplog: pytest.LogCaptureFixture) -> list[str]:
    paths = []
    for r in caplog.records:
        m = re.match(r"isocache: piece \d+/\d+ (\w+) ", r.getMessage())
        if m:
            paths.append(m.group(1))
    return paths


def run_model(model: torch.nn.Module, *args: Any, backend: Any, dynamic: bool | None = False) -> Any:
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=dynamic)(*args)


def hidden(out: Any) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def assert_matches_eager(model: torch.nn.Module, *args: Any, backend: Any, **tolerance: float) -> None:
    with torch.no_grad():
        expected = hidden(model(*args))
    actual = hidden(run_model(model, *args, backend=backend))
    torch.testing.assert_close(actual, expected, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_match_eager_and_compile_once_per_distinct_piece(
    name: str, device: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    compiled_per_depth = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        process_index().clear()
        isocache.reset_stats()
        model = MODELS[name](layers).to(device)
        ids = token_ids(device=device)
        with torch.no_grad():
            expected = hidden(model(ids))
        actual = hidden(run_model(model, ids, backend=isocache.Backend(cache_dir=tmp_path / f"{name}{layers}")))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        s = isocache.stats()
        assert s["pieces"] == layers + 1
        assert s["failed"] == 0
        assert s["loaded"] == 0
        assert s["reused"] == s["pieces"] - s["compiled"] - s["loaded"]
        assert s["graphs"] == 1
        compiled_per_depth[layers] = s["compiled"]
        (line,) = summaries(caplog)[-1:]
        assert int(line["n"]) == layers + 1 and int(line["c"]) == s["compiled"]
    assert compiled_per_depth[2] == compiled_per_depth[6] == 3


def test_compiling_again_in_the_same_process_reuses_every_piece(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    model, ids = MODELS["llama"](3), token_ids()
    backend = isocache.Backend(cache_dir=tmp_path)
    first = hidden(run_model(model, ids, backend=backend))
    torch._dynamo.reset()  # the index outlives Dynamo's caches
    caplog.clear()
    with counters.expect(compiled=0, loaded=0, reused=4, graphs=1):
        second = hidden(run_model(model, ids, backend=backend))
    torch.testing.assert_close(first, second)
    (line,) = summaries(caplog)
    assert (line["c"], line["l"], line["r"], line["f"]) == ("0", "0", "4", None)
    assert piece_paths(caplog)[-1] == "reuse", "a graph whose last piece is a REUSE still reports"


def test_last_piece_load_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    model, ids = MODELS["gpt2"](2), token_ids()
    backend = isocache.Backend(cache_dir=tmp_path)
    with torch.no_grad():
        expected = hidden(model(ids))
    run_model(model, ids, backend=backend)
    torch._dynamo.reset()
    process_index().clear()  # as if a new process: only the store remains
    caplog.clear()
    actual = hidden(run_model(model, ids, backend=backend))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    (line,) = summaries(caplog)
    assert (line["c"], line["l"], line["r"]) == ("0", "3", "0")
    assert piece_paths(caplog)[-1] == "load"


class Repeated(torch.nn.Module):
    """Linear, then attention, repeated: the linear pieces after the first are isometric, so the last piece is a REUSE."""

    def __init__(self, blocks: int = 3, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linears = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.linears[:-1]:
            x = torch.relu(lin(x))
            x = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return torch.relu(self.linears[-1](x))


def test_graph_ending_in_a_reused_piece(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    model, x = Repeated().eval(), torch.randn(2, 4, 8, 16)
    assert_matches_eager(model, x, backend=isocache.Backend(cache_dir=tmp_path))
    (line,) = summaries(caplog)
    assert (line["n"], line["c"], line["l"], line["r"]) == ("4", "2", "0", "2")
    assert piece_paths(caplog) == ["compile", "compile", "reuse", "reuse"]


def test_failed_compile_falls_back_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    real = inductor.compile_piece
    calls = {"n": 0}

    def flaky(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # Inductor "fails" on the last distinct piece
            raise RuntimeError("simulated Inductor failure")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(inductor, "compile_piece", flaky)
    model, ids = MODELS["llama"](2), token_ids()
    assert_matches_eager(model, ids, backend=isocache.Backend(cache_dir=tmp_path), rtol=1e-4, atol=1e-4)
    (line,) = summaries(caplog)
    assert (line["c"], line["r"], line["f"]) == ("2", "0", "1")
    assert piece_paths(caplog)[-1] == "failed", "a graph whose last piece fails still reports"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated Inductor failure" in warnings[0] and "plain Inductor" in warnings[0]
    assert isocache.stats()["failed"] == 1


def test_unserializable_piece_stays_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="isocache")

    def broken(artifact: Any) -> bytes:
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(inductor, "serialize", broken)
    model, x = Repeated().eval(), torch.randn(2, 4, 8, 16)
    assert_matches_eager(model, x, backend=isocache.Backend(cache_dir=tmp_path))
    (line,) = summaries(caplog)
    assert (line["c"], line["r"], line["f"]) == ("0", "2", "2")
    assert any("cannot be serialized" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.rglob("objects/*/*")), "nothing half-made reaches the store"


def test_isocache_disable_is_a_plain_inductor_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_DISABLE", "1")
    model, x = Repeated().eval(), torch.randn(2, 4, 8, 16)
    assert_matches_eager(model, x, backend=isocache.Backend(cache_dir=tmp_path))
    assert isocache.stats()["pieces"] == 0
    assert not tmp_path.exists() or not list(tmp_path.rglob("objects/*/*"))


def test_dynamic_shapes_report_the_range_and_serve_other_sizes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    model = MODELS["llama"](3)
    backend = isocache.Backend(cache_dir=tmp_path)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for seq in (16, 40, 7):
            x = token_ids(seq=seq)
            torch._dynamo.mark_dynamic(x, 1, min=2, max=128)
            torch.testing.assert_close(hidden(compiled(x)), hidden(model(x)), rtol=1e-4, atol=1e-4)
    lines = summaries(caplog)
    assert len(lines) == 1, "one graph serves every size in the range"
    assert re.fullmatch(r"s\d+ in \[2, 128\]", lines[0]["range"]), "each symbol once, with Dynamo's name"
    assert lines[0]["c"] == "3"


def test_static_and_dynamic_pieces_do_not_mix(tmp_path: Path) -> None:
    model, ids = MODELS["llama"](2), token_ids()
    backend = isocache.Backend(cache_dir=tmp_path)
    run_model(model, ids, backend=backend, dynamic=False)
    torch._dynamo.reset()
    with counters.expect(reused=0, compiled=lambda d: d >= 3), torch.no_grad():
        out = hidden(torch.compile(model, backend=backend, dynamic=True)(ids))
        torch.testing.assert_close(out, hidden(model(ids)), rtol=1e-4, atol=1e-4)


class Broken(torch.nn.Module):
    """Two identical halves with a graph break in between: two Dynamo graphs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = torch.relu(self.a[i](x))
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.block(x, 0), 1)
        torch._dynamo.graph_break()
        return self.block(self.block(x, 2), 3)


def test_graph_breaks_share_pieces_and_report_per_graph(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    model, x = Broken().eval(), torch.randn(2, 4, 8, 16)
    assert_matches_eager(model, x, backend=isocache.Backend(cache_dir=tmp_path))
    lines = summaries(caplog)
    assert len(lines) == 2, "each Dynamo graph reports its own line"
    s = isocache.stats()
    assert s["graphs"] == 2
    assert s["compiled"] == 1, "the second graph reuses the first graph's piece"
    assert lines[1]["c"] == "0"


#: torch 2.11-2.12 cannot serialize compiled training graphs (see isocache._torch.inductor.serialize).
SAVES_TRAINING_GRAPHS = release() >= inductor.TRAINING_GRAPHS_SINCE


def test_gradients_match_eager(tmp_path: Path) -> None:
    model, ids = MODELS["llama"](2).train(), token_ids()
    model.config.attention_dropout = 0.0
    eager_loss = hidden(model(ids)).square().mean()
    eager_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    backend = isocache.Backend(cache_dir=tmp_path)
    for attempt in ("compile", "load"):
        model.zero_grad()
        torch._dynamo.reset()
        process_index().clear()
        loss = hidden(torch.compile(model, backend=backend)(ids)).square().mean()
        loss.backward()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
        for n, p in model.named_parameters():
            if n in expected:
                torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-5, msg=f"{attempt}: {n}")
    s = isocache.stats()
    assert s["failed"] == 0
    if SAVES_TRAINING_GRAPHS:
        assert s["loaded"] >= 3
    else:  # compiled again (and said once): this torch cannot save training graphs
        assert s["loaded"] == 0 and s["compiled"] >= 6


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import MODELS, token_ids
    model, ids = MODELS["llama"](4), token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        actual = torch.compile(model, backend="isocache")(ids).last_hidden_state
    import isocache  # only to read the counters: the backend was found by its entry point
    print(json.dumps(dict(isocache.stats(), err=(actual - expected).abs().max().item())))
    """
)


def run_script(cache: Path, script: str = SCRIPT) -> dict[str, Any]:
    return run_python(script.format(tests=str(Path(__file__).parent)), cache, timeout=600)


def test_second_process_loads_every_distinct_piece(tmp_path: Path) -> None:
    first = run_script(tmp_path / "cache")
    assert first["compiled"] == 3 and first["loaded"] == 0 and first["err"] < 1e-4
    second = run_script(tmp_path / "cache")
    assert second["compiled"] == 0
    assert second["loaded"] == 3
    assert second["reused"] == 2
    assert second["err"] < 1e-4


def test_unencodable_piece_is_compiled_but_never_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    scale = 2.0

    class WithLocal(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            @torch._dynamo.allow_in_graph
            def local_op(t: torch.Tensor) -> torch.Tensor:
                return t * scale

            return local_op(x) + 1

    x = torch.randn(4)
    actual = run_model(WithLocal(), x, backend=isocache.Backend(cache_dir=tmp_path))
    torch.testing.assert_close(actual, x * 2 + 1)
    assert any("never shared" in r.getMessage() for r in caplog.records)


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from isocache.resolver import _Progress

    assert _Progress(5)._bar is None  # pytest's stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = _Progress(5)
    assert bar._bar is not None
    bar.advance()
    bar.close()


def test_entry_point_is_registered() -> None:
    assert "isocache" in torch._dynamo.list_backends()


@pytest.mark.parametrize("ops", [["aten::relu"], ["torch.relu"], [torch.relu]])
def test_custom_splitting_ops(ops: list[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    model, x = Repeated().eval(), torch.randn(2, 4, 8, 16)
    backend = isocache.Backend(cache_dir=tmp_path, splitting_ops=ops, split="attention")
    assert_matches_eager(model, x, backend=backend)
    (line,) = summaries(caplog)
    if ops == ["aten::relu"]:
        # Dynamo graphs call torch.relu, not the aten op: attention is no longer a cut either
        # (with the default split="auto", the repeated linears would be: tests/test_model_zoo.py).
        assert line["n"] == "1"
    else:
        # Cut at each relu instead of at attention:
        # linear | relu | sdpa+linear | relu | sdpa+linear | relu | sdpa+linear | relu
        assert (line["n"], line["c"], line["r"]) == ("4", "2", "2")


def test_splitting_op_without_a_name_is_a_clear_error() -> None:
    with pytest.raises(isocache.CacheError, match="pass its name as a string"):
        isocache.Backend(splitting_ops=[lambda x: x])


def test_compile_graph_describes_what_it_made(tmp_path: Path) -> None:
    ((gm, inputs),) = capture(Repeated().eval(), torch.randn(2, 4, 8, 16))
    backend = isocache.Backend(cache_dir=tmp_path)
    with torch.no_grad():
        compiled = backend.compile_graph(gm, inputs)
        assert compiled.namespace == backend.namespace_for(torch.device("cpu"))
    assert compiled.graph is compiled.forward
    names = [name for name, _ in compiled.pieces]
    assert len(names) == 4 and len({d for _, d in compiled.pieces}) == 2
    assert all(callable(compiled.graph.__dict__[name]) for name in names), "the pieces are installed"
    store = _core.Store(tmp_path, compiled.namespace.name)
    assert sorted(d for d, *_ in store.list()) == sorted({d for _, d in compiled.pieces})
    assert backend.namespace_for(torch.device("cpu")) != compiled.namespace, "grad mode separates namespaces"


def test_compile_graph_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_DISABLE", "1")
    ((gm, inputs),) = capture(Repeated().eval(), torch.randn(2, 4, 8, 16))
    compiled = isocache.Backend(cache_dir=False).compile_graph(gm, inputs)
    assert compiled.graph is None and compiled.namespace is None and compiled.pieces == ()
    assert callable(compiled.forward)


def test_counters_expect_reports_what_differs() -> None:
    with counters.expect(compiled=0, loaded=lambda d: d == 0):
        pass
    with pytest.raises(AssertionError, match="compiled: expected 1, got 0"), counters.expect(compiled=1):
        pass
    with pytest.raises(AttributeError, match="no such isocache counter"), counters.expect(compiles=1):
        pass
    assert set(isocache.stats()) == {f for f in counters.snapshot().as_dict()}


def test_tracing_time_is_reported_in_the_summary_and_the_counters(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isocache")
    model, ids = MODELS["llama"](2), token_ids()
    with torch.no_grad(), counters.expect(trace_seconds=lambda d: d > 0):
        torch.compile(model, backend=Backend(cache_dir=False))(ids)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("isocache: compile range")]
    assert re.search(r"after \d+\.\d{3} s of Dynamo tracing$", line), line


TORCH_LOGS_SCRIPT = """
import torch, isocache
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
    def forward(self, x):
        h = torch.relu(self.a(x))
        return torch.nn.functional.scaled_dot_product_attention(h, h, h)
with torch.no_grad():
    torch.compile(Tiny(), backend=isocache.Backend(cache_dir=False))(torch.randn(1, 2, 4, 16))
"""


@pytest.mark.parametrize("setting", ["", "isocache", "+isocache"])
def test_torch_logs_shows_isocache_lines(setting: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    if setting:
        env["TORCH_LOGS"] = setting
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_LOGS_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = re.search(r"isocache: compile range \(1, 2, 4, 16\): 1 piece \(1 compiled", proc.stderr)
    piece_lines = re.search(r"isocache: piece 1/1 compile", proc.stderr)
    assert bool(summary) == bool(setting), proc.stderr[-2000:]
    assert bool(piece_lines) == (setting == "+isocache"), proc.stderr[-2000:]
