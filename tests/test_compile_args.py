"""What a newcomer passes out of habit: ``torch.compile``'s ``mode`` and ``options`` with the isocache
backend, wrong settings (failing at construction with the valid choices), and the messages they read."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import isocache
from isocache import _core
from isocache._torch import dynamo, inductor
from isocache.backend import Backend, compile_range, default_backend

#: A cheap option that changes what Inductor generates (and so the namespace).
OPTION = {"epilogue_fusion": False}
NO_CUDA_GRAPHS = "max-autotune-no-cudagraphs"


class TwoLayers(torch.nn.Module):
    """Two pieces (cut at attention), so "every piece" means more than one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.a(x).relu()
        y = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.b(y).sin()


class Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear(x).relu()
        return y if mask is None else y * mask


def pointwise(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() + 1).relu()  # no matmul: nothing for max-autotune to benchmark


@pytest.fixture
def compiled_options(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The Inductor options each piece is compiled with (the real compile runs)."""
    seen: list[dict[str, Any]] = []
    real = inductor.compile_piece

    def spy(gm: torch.fx.GraphModule, inputs: Any, options: dict[str, Any] | None = None) -> Any:
        seen.append(dict(options or {}))
        return real(gm, inputs, options)

    monkeypatch.setattr(inductor, "compile_piece", spy)
    return seen


def test_options_reach_every_piece_and_make_a_namespace_of_their_own(
    tmp_path: Path, compiled_options: list[dict[str, Any]]
) -> None:
    root = tmp_path / "cache"
    backend = Backend(cache_dir=root, compile_workers=0)
    model, x = TwoLayers().eval(), torch.randn(2, 4, 8, 16)
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend=backend, options=dict(OPTION))(x)
        torch._dynamo.reset()
        torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(actual, expected)
    with_options = [o for o in compiled_options if o]
    assert len(with_options) >= 2 and all(o == OPTION for o in with_options), compiled_options
    assert len(_core.list_namespaces(root)) == 2, "two configurations never share entries"
    configured = backend.configured(options={"epilogue-fusion": False})  # spelled as torch accepts it
    assert configured is backend.configured(options=dict(OPTION)), "one backend per configuration"
    assert configured.namespace_for(torch.device("cpu")) != backend.namespace_for(torch.device("cpu"))
    same = Backend(cache_dir=root, inductor_options=dict(OPTION))
    assert same.namespace_for(torch.device("cpu")) == configured.namespace_for(torch.device("cpu"))


def test_the_registered_backend_honours_a_mode(cache_dir: Path, compiled_options: list[dict[str, Any]]) -> None:
    x = torch.randn(64)
    with torch.no_grad():
        actual = torch.compile(pointwise, backend="isocache", mode=NO_CUDA_GRAPHS)(x)
    torch.testing.assert_close(actual, pointwise(x))
    expected = torch._inductor.list_mode_options(NO_CUDA_GRAPHS)
    assert compiled_options and all(o == expected for o in compiled_options), compiled_options
    assert default_backend().configured(mode="default") is default_backend(), "the default mode adds nothing"
    assert default_backend().configured(mode=NO_CUDA_GRAPHS).inductor_options == expected


@pytest.mark.parametrize(
    ("mode", "instead"), [("max-autotune", "mode='max-autotune-no-cudagraphs'"), ("reduce-overhead", "no mode")]
)
def test_a_mode_with_cuda_graphs_is_refused_with_what_to_use(cache_dir: Path, mode: str, instead: str) -> None:
    message = f"mode='{mode}'\\) asks for CUDA graphs, .*pass {instead}"
    if dynamo.backend_init_supported():  # torch 2.15: at torch.compile, before any call
        with pytest.raises(ValueError, match=message):
            torch.compile(pointwise, backend="isocache", mode=mode)
    with pytest.raises(Exception, match=message):  # older torch: the first call (Dynamo wraps it)
        torch.compile(pointwise, backend=Backend(cache_dir=False), mode=mode)(torch.randn(4))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_autotun": True}, "'max_autotun' is not an Inductor option; did you mean 'max_autotune'"),
        ({"max_autotune": "yes"}, "'max_autotune' takes a bool, got str 'yes'"),
        ({"triton.cudagraphs": True}, "'triton.cudagraphs': True asks for CUDA graphs"),
    ],
)
def test_a_bad_inductor_option_fails_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^inductor_options: {message}"):
        Backend(inductor_options=options)
    with pytest.raises(ValueError, match=message):
        Backend().configured(options=options)


def test_an_unknown_mode_names_the_modes() -> None:
    with pytest.raises(
        ValueError, match=re.escape("mode='fast' is not a torch.compile mode: expected one of 'default', ")
    ):
        Backend().configured(mode="fast")


@pytest.mark.parametrize(
    ("op", "near"),
    [
        ("aten::scaled_dot_product_attn", "did you mean 'aten::scaled_dot_product_attention'"),
        ("torch.nn.functional.scaled_dot_product_atention", "'torch.nn.functional.scaled_dot_product_attention'"),
        ("relu", "names no op or function: pass an op as 'namespace::name'"),
        ("aten::relu.no_such_overload", "names no op or function"),
    ],
)
def test_an_unknown_splitting_op_fails_at_construction(op: str, near: str) -> None:
    with pytest.raises(ValueError, match=near) as raised:
        Backend(splitting_ops=[op])
    assert str(raised.value).startswith(f"splitting op {op!r} names no op or function: ")
    assert "the op or function itself" in str(raised.value), "names the forms accepted"


def test_an_argument_a_newer_torch_passes_is_ignored_with_one_warning(
    caplog_isocache: pytest.LogCaptureFixture,
) -> None:
    backend = Backend(cache_dir=False)
    assert backend.configured(name="region") is backend  # torch 2.15's label: nothing to warn about
    assert backend.configured(frobnicate=1) is backend and backend.configured(frobnicate=2) is backend
    (warning,) = [r.getMessage() for r in caplog_isocache.records if r.levelno == logging.WARNING]
    assert (
        warning == "isocache: torch.compile passed frobnicate to the backend, which isocache does not know and ignores"
    )


def test_a_compile_range_with_many_symbolic_sizes_is_counted() -> None:
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sizes = [env.create_symintnode(env.create_symbol(i + 2, ConstantSource(f"x{i}")), hint=i + 2) for i in range(12)]
    line = compile_range(sizes)
    assert line.startswith("12 symbolic sizes (s") and line.endswith(", ...; TORCH_LOGS=+isocache lists them)")
    assert line.count(" in [") == 2
    assert compile_range(sizes[:3]).count(" in [") == 3, "a few are listed"


def test_a_refused_input_is_named(cache_dir: Path, caplog_isocache: pytest.LogCaptureFixture) -> None:
    if not dynamo.aot_compile_supported():
        pytest.skip("isocache.compile saves models on a newer torch (tests/test_torch_versions.py)")
    model = Masked().eval()
    compiled = isocache.compile(model)
    with torch.no_grad():
        compiled(torch.randn(2, 8))
        out = compiled(torch.randn(5, 8))
    assert out.shape == (5, 8)
    warned = caplog_isocache.records
    (warning,) = [r.getMessage() for r in warned if r.levelno == logging.WARNING and "differs from" in r.getMessage()]
    assert "GuardDebugInfo" not in warning and warning.count("(") == warning.count(")"), warning
    assert "argument 'x': size mismatch at index 0 (expected 2, actual 5)" in warning, warning
    assert "dynamic=True" in warning, "says what to do"


def test_no_line_reads_isocache_twice(caplog_isocache: pytest.LogCaptureFixture) -> None:
    """``logging.basicConfig(format="%(name)s: %(message)s")`` and the like: one prefix per line."""
    logger = logging.getLogger("isocache")
    named, bare = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(named), logging.StreamHandler(bare)]
    handlers[0].setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handlers[1].setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handlers[0])
    try:
        logger.info("isocache: one %s", "line")
        logger.removeHandler(handlers[0])
        logger.addHandler(handlers[1])
        logger.info("isocache: another %s", "line")
    finally:
        for h in handlers:
            logger.removeHandler(h)
    assert named.getvalue() == "isocache: one line\n"
    assert bare.getvalue() == "isocache: another line\n", "a format without the name keeps the prefix"


def test_a_refused_keyword_and_several_checks_read_as_one_clause() -> None:
    """The text torch 2.12-2.15 give a guard failure (as raised by a loaded compiled function)."""
    from isocache._torch.guards import refused_input

    parts = [
        "tensor 'L['kwargs']['mask']' dtype mismatch. expected Float, actual Double",
        "tensor 'L['args'][1]' requires_grad mismatch. expected requires_grad=0",
    ]
    text = f"GuardManager check failed, reason: GuardDebugInfo(\nresult=0,\nverbose_code_parts={parts!r},\n"
    text += "num_guards_executed=2,\nuser_stack=None)\n"
    said = refused_input(RuntimeError(text), ["x"])
    assert said == "argument 'mask': dtype mismatch (expected Float, actual Double) (and 1 more)"
    assert refused_input(RuntimeError("GuardManager check failed, reason: something else"), []) is None


def test_isocache_compile_takes_mode_and_options_too(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="asks for CUDA graphs"):
        isocache.compile(Masked(), mode="reduce-overhead", cache_dir=root)
    model, x = Masked().eval(), torch.randn(2, 8)
    with torch.no_grad():
        out = isocache.compile(model, options=dict(OPTION), cache_dir=root)(x)
    torch.testing.assert_close(out, model(x))
    (ns,) = _core.list_namespaces(root)
    assert "epilogue_fusion" in (_core.Store(root, ns).description() or ""), "the options made the namespace"
