"""``torch.compile(model, backend="isocache")`` starts warm from the entry an earlier process saved
(`backend_warm.py`), under the same checks as ``isocache.compile``'s entries, and changes nothing else:
eager calls, and the same model compiled with another backend, run the class forward.

Each cross-process case runs fresh processes on one store (`test_entry_validity.run`, with the
backend instead of ``isocache.compile``) and compares outputs with eager.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import isocache
from isocache import backend_warm
from isocache._torch import dynamo
from support import VALIDITY_HELPERS
from test_entry_validity import TINY, saved_store, traced_again, warm_copy
from test_entry_validity import run as run_compiled

pytestmark = pytest.mark.skipif(
    not (dynamo.aot_compile_supported() and dynamo.backend_init_supported()),
    reason="a warm backend needs torch's ahead-of-time capture and _dynamo_backend_init (torch 2.15)",
)

PACKAGE = str(Path(isocache.__file__).resolve().parent.parent)
# The installed entry point may still name isocache.backend: importing backend_warm attaches the hook.
COMPILE = '__import__("isocache.backend_warm") and torch.compile(model, backend="isocache")'


def run(cache: Path, setup: str, src: Path) -> dict[str, object]:
    env = {"PYTHONPATH": f"{src}{os.pathsep}{PACKAGE}", "ISOCACHE_BACKEND_WARM": "1"}
    return run_compiled(cache, setup, src, compile=COMPILE, env=env)


@pytest.fixture(autouse=True)
def opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_BACKEND_WARM", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_store(tmp_path_factory.mktemp("saved"), run)


@pytest.mark.parametrize(
    ("setup", "helper_factor", "because"),
    [
        (TINY, 3, "helpers.helper"),  # a helper edited in another file
        (TINY + "valmodel.SCALE = 2.0\n", None, "SCALE"),  # a module global set at run time
        (TINY + "model.train()\n", None, "training"),  # train() after an entry saved in eval mode
    ],
    ids=["helper-edited", "global-set", "train-mode"],
)
def test_a_changed_model_is_caught(
    saved: Path, tmp_path: Path, setup: str, helper_factor: int | None, because: str
) -> None:
    cache, src = warm_copy(saved, tmp_path)
    if helper_factor is not None:
        (src / "helpers.py").write_text(VALIDITY_HELPERS.format(factor=helper_factor))
    traced_again(run(cache, setup, src), because)


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_eager_calls_and_other_backends_run_the_class_forward(tmp_path: Path) -> None:
    model, x = _Two().eval(), torch.randn(2, 8)
    with torch.no_grad():
        expected = _Two.forward(model, x)
        compiled = torch.compile(model, backend="isocache")
        assert "forward" in model.__dict__, "the warm forward is attached"
        assert torch.equal(model(x), expected), "an eager call runs the class forward"
        assert torch.allclose(compiled(x), expected, atol=1e-5)
        assert backend_warm.attached(model) is not None
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        other = torch.compile(model, backend="aot_eager")
        assert torch.allclose(other(x), expected, atol=1e-5)
        assert counters["stats"]["unique_graphs"] > before, "another backend's module is traced as before"


def test_nothing_is_attached_where_the_hook_or_the_arguments_do_not_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Two()
    torch.compile(model, backend="isocache", mode="max-autotune-no-cudagraphs")
    assert "forward" not in model.__dict__, "a mode the entry cannot honour"
    with pytest.raises(ValueError, match="asks for CUDA graphs"):  # refused at torch.compile
        torch.compile(model, backend="isocache", mode="reduce-overhead")
    assert "forward" not in model.__dict__
    torch.compile(model, backend="isocache", fullgraph=True)
    assert "forward" not in model.__dict__
    monkeypatch.setenv("ISOCACHE_BACKEND_WARM", "0")  # the default: off
    torch.compile(model, backend="isocache")
    assert "forward" not in model.__dict__
    monkeypatch.setenv("ISOCACHE_BACKEND_WARM", "1")
    monkeypatch.setattr(dynamo, "backend_init_supported", lambda: False)  # torch 2.11: no hook
    torch.compile(model, backend="isocache")
    assert "forward" not in model.__dict__
