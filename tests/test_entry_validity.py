"""A saved `isocache.compile` entry runs only where everything its trace depended on is unchanged, and is
found again wherever it is valid (another configuration, another working directory, a relocated store).

Each case runs fresh processes on one store and compares outputs with eager: a trace, a warm start
that loads, then the change, which must trace again (with one INFO line naming what changed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

from isocache._torch import dynamo
from support import TESTS, VALIDITY_HELPERS, run_python, validity_model

pytestmark = pytest.mark.skipif(
    not dynamo.aot_compile_supported(),
    reason="saved entries need torch >= {}.{} (tests/test_torch_versions.py covers the fallback)".format(
        *dynamo.AOT_COMPILE_SINCE
    ),
)

SCRIPT = """
import json, logging, sys, torch
sys.path.insert(0, {tests!r})
import isocache
from support import MODELS, token_ids
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("isocache").addHandler(Keep())
logging.getLogger("isocache").setLevel(logging.INFO)
{setup}
with torch.no_grad():
    compiled = {compile}
    actual = compiled(x)
    expected = model(x)
actual, expected = (getattr(t, "last_hidden_state", t) for t in (actual, expected))
from torch._dynamo.utils import counters
print(json.dumps(dict(isocache.stats(), err=(actual - expected).abs().max().item(),
                      frames=counters["stats"]["unique_graphs"], log=records)))
"""

TINY = """
import valmodel
model, x = valmodel.Tiny().eval(), torch.randn(2, 16)
"""


def run(
    cache: Path, setup: str, src: Path | None = None, compile: str = "isocache.compile(model)", **kwargs: Any
) -> dict[str, Any]:
    env = {"PYTHONPATH": str(src)} if src is not None else {}
    code = SCRIPT.format(tests=str(TESTS), setup=textwrap.dedent(setup), compile=compile)
    return run_python(code, cache, env={**env, **kwargs.pop("env", {})}, **kwargs)


def info(r: dict[str, Any], start: str) -> list[str]:
    return [m for level, m in r["log"] if level == "INFO" and m.startswith(start)]


def source_tree(tmp: Path, factor: int = 2) -> Path:
    return validity_model(tmp / "src", factor)


def loads(r: dict[str, Any]) -> bool:
    """The process loaded its entry: no Dynamo frame traced, nothing compiled."""
    return r["models_loaded"] == 1 and r["frames"] == 0 and r["compiled"] == 0


def traced_again(r: dict[str, Any], because: str) -> None:
    """The process refused the saved entry, said why in one INFO line, traced, and matched eager."""
    assert r["err"] < 1e-5
    assert r["models_loaded"] == 0 and r["frames"] >= 1
    (line,) = info(r, "isocache: not using the saved compiled")
    assert because in line, line


def saved_store(folder: Path, run: Callable[[Path, str, Path], dict[str, Any]]) -> Path:
    """`folder` holding the Tiny model's entry (traced by `run`, then loaded by a second process), beside its source."""
    src, cache = source_tree(folder), folder / "cache"
    first = run(cache, TINY, src)
    assert first["err"] < 1e-5 and first["models_loaded"] == 0 and first["frames"] >= 1
    assert loads(run(cache, TINY, src)), "the second process loads the entry instead of tracing"
    return folder


def warm_copy(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `saved` for one test (which may change its source): the store and the source folder."""
    shutil.copytree(saved, tmp_path / "saved")
    return tmp_path / "saved" / "cache", tmp_path / "saved" / "src"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_store(tmp_path_factory.mktemp("saved"), run)


@pytest.fixture
def warm(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    return warm_copy(saved, tmp_path)


def test_a_helper_edited_in_another_file_is_caught(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    (src / "helpers.py").write_text(VALIDITY_HELPERS.format(factor=3))
    traced_again(run(cache, TINY, src), "helpers.helper")
    (src / "helpers.py").write_text(VALIDITY_HELPERS.format(factor=2) + "\n# a comment changes no code\n")
    assert loads(run(cache, TINY, src)), "the first variant is found again"


def test_a_module_global_set_at_run_time_is_caught(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    traced_again(run(cache, TINY + "valmodel.SCALE = 2.0\n", src), "SCALE")


def test_an_attribute_set_at_run_time_is_caught(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    traced_again(run(cache, TINY + "model.blocks[1].alpha = 0.25\n", src), "alpha")


def test_train_after_an_entry_saved_in_eval_is_caught(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    traced_again(run(cache, TINY + "model.train()\n", src), "training")


def test_a_replaced_method_is_caught(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    r = run(cache, TINY + "valmodel.Block.forward = lambda self, x: torch.tanh(self.lin(x))\n", src)
    traced_again(r, "valmodel.Block")


LOCAL = """
class Local(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16)
    def forward(self, x):
        return torch.relu(self.lin(x)) {op} 1
"""
# As a notebook runs a cell (code with no file, defined in __main__), and as a script's own class.
NO_FILE = 'exec(compile(LOCAL, "<notebook cell 3>", "exec"), globals())\n'
MAIN = "{local}\n"


@pytest.mark.parametrize("setup", [NO_FILE, MAIN], ids=["exec", "main"])
def test_code_without_a_file_is_checked_by_its_code(setup: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def script(op: str) -> str:
        local = LOCAL.format(op=op)
        return f"LOCAL = {local!r}\n" + setup.format(local=local) + "model, x = Local().eval(), torch.randn(2, 16)\n"

    first = run(cache, script("+"))
    assert first["err"] < 1e-5 and first["models_loaded"] == 0
    assert loads(run(cache, script("+")))
    traced_again(run(cache, script("-")), "Local")


def test_alternating_attribute_values_coexist(tmp_path: Path) -> None:
    src, cache = source_tree(tmp_path), tmp_path / "cache"
    a = "import valmodel\nmodel, x = valmodel.Tiny(0.5).eval(), torch.randn(2, 16)\n"
    b = a.replace("Tiny(0.5)", "Tiny(0.25)")
    results = [run(cache, setup, src) for setup in (a, b, a, b)]
    assert all(r["err"] < 1e-5 for r in results)
    assert [r["models_loaded"] for r in results] == [0, 0, 1, 1]
    assert [r["frames"] for r in results][2:] == [0, 0], "traced twice, then loaded twice"
    # The command line shows the other variant and what differs (without importing torch).
    explained = subprocess.run(
        [sys.executable, "-m", "isocache", "explain", "--dir", str(cache), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    (model,) = json.loads(explained.stdout)
    (variant,) = model["variants"]
    assert any("alpha" in line and "0.25" in line and "0.5" in line for line in variant["differs"]), variant


@pytest.mark.slow  # the attribute alternation above covers variants, test_precompile a changed configuration
def test_alternating_configurations_coexist(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = 'model, x = MODELS["llama"](2), token_ids()\n'
    b = a + "model.config.rms_norm_eps = 1e-3\nfor m in model.modules():\n    m.variance_epsilon = 1e-3\n"
    results = [run(cache, setup) for setup in (a, b, a, b)]
    assert all(r["err"] < 1e-4 for r in results)
    assert [r["models_loaded"] for r in results] == [0, 0, 1, 1]
    assert [r["compiled"] for r in results][2:] == [0, 0]


@pytest.mark.parametrize("path", ["compile", "backend"])
def test_a_relocated_store_in_another_directory_loads_everything(path: str, tmp_path: Path) -> None:
    """A store copied elsewhere, used from another working directory with another HOME: every piece
    (and, for isocache.compile, the entry) loads; nothing is compiled."""
    setup = 'model, x = MODELS["llama"](2), token_ids()\n'
    how = "isocache.compile(model)" if path == "compile" else 'torch.compile(model, backend="isocache")'
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first = run(one / "store", setup, compile=how, cwd=one, env={"HOME": str(one)})
    assert first["err"] < 1e-4 and first["compiled"] == 3
    shutil.copytree(one / "store", two / "store")
    shutil.rmtree(one / "store")
    second = run(two / "store", setup, compile=how, cwd=two, env={"HOME": str(two)})
    assert second["err"] < 1e-4
    assert second["compiled"] == 0 and second["loaded"] == 3
    if path == "compile":
        assert loads(second)


SWITCH = """
import json, sys, torch
import isocache, valmodel
model, x = valmodel.Tiny().eval(), torch.randn(2, 16)
with torch.no_grad():
    compiled = isocache.compile(model)
    errors = [(compiled(x) - model(x)).abs().max().item()]
    model.train()  # after the entry was loaded or traced: its code branches on self.training
    errors.append((compiled(x) - model(x)).abs().max().item())
print(json.dumps(dict(isocache.stats(), errors=errors)))
"""


def test_train_after_the_first_call_runs_the_right_code(warm: tuple[Path, Path]) -> None:
    cache, src = warm
    r = run_python(SWITCH, cache, env={"PYTHONPATH": str(src)})
    assert r["models_loaded"] == 1
    assert max(r["errors"]) < 1e-5, r["errors"]
