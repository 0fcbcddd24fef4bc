"""What differs between the torch versions isocache supports (2.11 through the newest)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.fx

import isocache
from conftest import MODELS, token_ids
from isocache._torch import dynamo
from isocache.digest import digest_with_reason


def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # What torch inserts into graphs for its own bookkeeping (torch 2.11 puts this call
    # at the top of Dynamo graphs of nn.Modules): it must not make a piece unshareable.
    torch._C._log_api_usage_once("python.nn_module")
    return torch.relu(x @ w) + 1


def traced(name: str) -> tuple[torch.fx.GraphModule, list[Any]]:
    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    gm = torch.fx.symbolic_trace(layer)
    gm.graph.call_function(torch._C._log_api_usage_once, (f"python.{name}",))  # a bookkeeping node of its own
    gm.recompile()
    return gm, [torch.randn(4, 8), torch.randn(8, 8)]


def test_bookkeeping_calls_keep_pieces_shareable() -> None:
    gm_a, inputs = traced("a")
    gm_b, _ = traced("a")
    (da, reason_a), (db, reason_b) = digest_with_reason(gm_a, inputs, "ns"), digest_with_reason(gm_b, inputs, "ns")
    assert reason_a is None and reason_b is None, "a bookkeeping call is encoded canonically"
    assert da == db, "equal across layers"
    other, _ = traced("b")
    assert digest_with_reason(other, inputs, "ns")[0] != da, "its argument is part of the graph"


@pytest.mark.skipif(dynamo.aot_compile_supported(), reason="this torch saves compiled models")
def test_isocache_compile_on_an_older_torch_says_so_once_and_works(
    cache_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    model, ids = MODELS["llama"](2), token_ids()
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        compiled = isocache.compile(model)
        for _ in range(2):
            torch.testing.assert_close(compiled(ids).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "needs torch >=" in r.getMessage()]
    assert len(warnings) == 1 and torch.__version__ in warnings[0], warnings
    assert isocache.stats()["compiled"] == 3


def test_the_tested_range_is_the_one_pyproject_allows() -> None:
    """pyproject.toml's torch floor and upper bound are `_torch.TESTED` (scripts/check runs the suite on
    both ends); the torch running this suite is inside it."""
    import re
    from pathlib import Path

    from isocache._torch import TESTED, release, untested

    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    found = re.search(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', text)
    assert found, "pyproject.toml bounds torch on both sides"
    floor, bound = (int(found[1]), int(found[2])), (int(found[3]), int(found[4]))
    assert floor == TESTED[0] and bound == (TESTED[1][0], TESTED[1][1] + 1), (floor, bound, TESTED)
    assert TESTED[0] <= release() <= TESTED[1] and untested() is None


def test_an_untested_torch_is_said_once_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import isocache._torch as adapter

    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setattr(adapter, "release", lambda: (adapter.TESTED[1][0], adapter.TESTED[1][1] + 1))
    isocache.Backend(cache_dir=False)
    isocache.Backend(cache_dir=False)
    (line,) = [r.getMessage() for r in caplog.records if "tested with" in r.getMessage()]
    assert "newer than the newest torch isocache is tested with" in line
    assert "ISOCACHE_DISABLE=1" in line and "install a torch in that range" in line
