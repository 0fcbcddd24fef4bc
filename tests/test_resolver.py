"""The resolver: each path a piece can take, on real pieces, a real index and a real store.

The compile path runs Inductor once on a small piece; the other paths load
what it made, or fake only what is not under test (a compile that fails, an
artifact that cannot be serialized).
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx

import isocache
from conftest import capture
from isocache import _core
from isocache._torch import inductor
from isocache.report import CompileEvent, GraphReport
from isocache.report import Path as PiecePath
from isocache.resolver import Resolver
from isocache.split import Piece, normalize_splitting_ops, split_graph
from isocache.tiers.chain import Chain
from isocache.tiers.local import LocalTier
from isocache.tiers.memory import MemoryTier

PACKAGE = Path(isocache.__file__).resolve().parent


class Block(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return torch.relu(self.b(h))


@pytest.fixture(autouse=True)
def inference() -> Iterator[None]:
    """Pieces compile as inference graphs, which every supported torch can save (2.11-2.12 cannot
    save training graphs: test_a_torch_that_cannot_save_a_kind_of_piece_says_so_once)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def piece() -> Piece:
    ((gm, _),) = capture(Block().eval(), torch.randn(1, 2, 4, 8))
    first = split_graph(gm, normalize_splitting_ops(None)).compiled_pieces[0]
    return first


def real_inputs(piece: Piece) -> list[Any]:
    fake = inductor.fake_inputs(piece.module)
    assert fake is not None
    torch.manual_seed(1)
    return [torch.randn(tuple(v.shape)) if isinstance(v, torch.Tensor) else v for v in fake]


def resolver_for(store: _core.Store | None, index: _core.Index | None = None) -> Resolver:
    stores = [] if store is None else [LocalTier(store)]
    return Resolver(Chain(MemoryTier(_core.Index() if index is None else index), stores, wait_timeout=30.0))


def event(digest: str) -> CompileEvent:
    return CompileEvent(0, 1, "static", digest=digest)


DIGEST = "5e" * 32


def test_compile_then_reuse_then_load(piece: Piece, tmp_path: Path) -> None:
    store = _core.Store(tmp_path, "ns")
    index = _core.Index()
    resolver = resolver_for(store, index)
    args = real_inputs(piece)
    with torch.no_grad():
        expected = piece.module(*args)

    compiled = event(DIGEST)
    fn = resolver.resolve(piece, compiled)
    assert compiled.path is PiecePath.COMPILE and compiled.reason is None
    assert DIGEST in store and index.get(DIGEST) is not None
    with torch.no_grad():
        torch.testing.assert_close(fn(*args), expected)

    reused = event(DIGEST)
    assert resolver.resolve(piece, reused) is fn
    assert reused.path is PiecePath.REUSE

    # Another process: an empty index, the same store.
    loaded = event(DIGEST)
    fresh = resolver_for(store)
    loaded_fn = fresh.resolve(piece, loaded)
    assert loaded.path is PiecePath.LOAD and loaded.saved_seconds > 0
    with torch.no_grad():
        torch.testing.assert_close(loaded_fn(*args), expected)

    # Loading without compiling (what isocache.compile does): from the store, then from memory.
    other = resolver_for(store)
    by_digest = event(DIGEST)
    assert other.load(DIGEST, inductor.returns_tuple(piece.module), by_digest) is not None
    assert by_digest.path is PiecePath.LOAD
    again = event(DIGEST)
    assert other.load(DIGEST, inductor.returns_tuple(piece.module), again) is not None
    assert again.path is PiecePath.REUSE


def test_load_of_a_digest_no_tier_has_is_failed(tmp_path: Path) -> None:
    missing = event("00" * 32)
    assert resolver_for(_core.Store(tmp_path, "ns")).load(missing.digest, True, missing) is None
    assert missing.path is PiecePath.FAILED and missing.reason == "no tier has it"


def test_piece_without_example_values_runs_eagerly(tmp_path: Path) -> None:
    bare = torch.fx.symbolic_trace(torch.nn.ReLU())  # no example values in its meta
    e = event("01" * 32)
    fn = resolver_for(_core.Store(tmp_path, "ns")).resolve(Piece(0, "submod_0", bare, False), e)
    assert fn is bare and e.path is PiecePath.FAILED and "no example values" in (e.reason or "")


def test_inductor_failure_falls_back_and_is_shared_in_memory(
    piece: Piece, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(inductor, "compile_piece", fails)
    monkeypatch.setattr(inductor, "plain_inductor", fails)
    store = _core.Store(tmp_path, "ns")
    resolver = resolver_for(store)
    e = event("02" * 32)
    fn = resolver.resolve(piece, e)
    assert fn is piece.module and e.path is PiecePath.FAILED
    assert "simulated failure" in (e.reason or "") and "eagerly" in (e.reason or "")
    assert store.list() == [], "nothing is published"
    twin = event(e.digest)
    assert resolver.resolve(piece, twin) is fn and twin.path is PiecePath.REUSE


def test_unserializable_piece_stays_in_memory(piece: Piece, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor, "compile_piece", lambda gm, inputs, options=None: gm)
    monkeypatch.setattr(inductor, "serialize", lambda artifact: (_ for _ in ()).throw(RuntimeError("cannot pickle")))
    store = _core.Store(tmp_path, "ns")
    resolver = resolver_for(store)
    e = event("03" * 32)
    resolver.resolve(piece, e)
    assert e.path is PiecePath.FAILED and "cannot be serialized" in (e.reason or "")
    assert store.list() == []
    twin = event(e.digest)
    resolver.resolve(piece, twin)
    assert twin.path is PiecePath.REUSE


def test_a_torch_that_cannot_save_a_kind_of_piece_says_so_once(
    piece: Piece, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As torch 2.11 does for training graphs: compiled and used here, never published.
    monkeypatch.setattr(inductor, "compile_piece", lambda gm, inputs, options=None: gm)

    def unsupported(artifact: Any) -> bytes:
        raise inductor.Unsupported("sharing compiled training graphs across processes", "2.13")

    monkeypatch.setattr(inductor, "serialize", unsupported)
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path, "ns")
    resolver = resolver_for(store)
    first, second = event("05" * 32), event("06" * 32)
    resolver.resolve(piece, first)
    resolver.resolve(piece, second)
    assert first.path is PiecePath.COMPILE and second.path is PiecePath.COMPILE
    assert store.list() == [], "nothing is published"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "needs torch >= 2.13" in warnings[0] and "compiled in each process" in warnings[0]


def test_memory_only_compiles_without_serializing(piece: Piece, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inductor, "compile_piece", lambda gm, inputs, options=None: gm)
    monkeypatch.setattr(inductor, "serialize", lambda artifact: pytest.fail("nothing to publish to"))
    e = event("04" * 32)
    resolver_for(None).resolve(piece, e)
    assert e.path is PiecePath.COMPILE


def test_the_report_exit_marks_a_raising_piece_failed(piece: Piece, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(inductor, "compile_piece", interrupted)
    report = GraphReport(1, "static")
    with pytest.raises(KeyboardInterrupt), report.piece(0) as e:
        e.digest = "05" * 32
        resolver_for(None).resolve(piece, e)
    (recorded,) = report.events
    assert recorded.path is PiecePath.FAILED


def _path_assignments(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, enclosing function) of every assignment to an attribute `path`, `setattr(..., "path", ...)`
    and `path=Path.X` keyword in `tree`."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            targets: list[ast.expr] = []
            if isinstance(child, ast.Assign):
                targets = child.targets
            elif isinstance(child, (ast.AugAssign, ast.AnnAssign)):
                targets = [child.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "path" for t in targets):
                found.append((child.lineno, func))
            if isinstance(child, ast.Call):
                args = child.args
                if (
                    isinstance(child.func, ast.Name)
                    and child.func.id == "setattr"
                    and len(args) > 1
                    and isinstance(args[1], ast.Constant)
                    and args[1].value == "path"
                ):
                    found.append((child.lineno, func))
                for kw in child.keywords:
                    value = kw.value
                    if (
                        kw.arg == "path"
                        and isinstance(value, ast.Attribute)
                        and isinstance(value.value, ast.Name)
                        and value.value.id == "Path"
                    ):
                        found.append((child.lineno, func))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_only_the_resolver_sets_a_piece_path() -> None:
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")):
        relative = source.relative_to(PACKAGE).as_posix()
        for line, func in _path_assignments(ast.parse(source.read_text(), str(source))):
            if relative == "resolver.py":
                continue
            if relative == "report.py" and func == "piece":
                continue  # the single exit: a piece whose block raised is FAILED
            offenders.append(f"{relative}:{line} (in {func})")
    assert offenders == [], "only resolver.py decides a piece's path"
    resolver_lines = _path_assignments(ast.parse((PACKAGE / "resolver.py").read_text()))
    assert resolver_lines, "the check sees the resolver's own assignments"
