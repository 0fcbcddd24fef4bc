"""`isocache.compile`: a new process loads a compiled model without tracing."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from isocache import _core
from isocache._torch import dynamo
from isocache.entry import ENTRY_MAGIC
from support import run_python

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import MODELS, token_ids
    import isocache
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))
    logging.getLogger("isocache").addHandler(Keep())
    logging.getLogger("isocache").setLevel(logging.INFO)
    {setup}
    with torch.no_grad():
        outs = []
        compiled = isocache.compile(model)
        for ids in inputs:
            expected = getattr(model(ids), "last_hidden_state", None)
            expected = model(ids) if expected is None else expected
            actual = compiled(ids)
            actual = getattr(actual, "last_hidden_state", actual)
            outs.append((actual - expected).abs().max().item())
    from torch._dynamo.utils import counters
    from isocache._torch import runtime
    heavy = runtime.imported_heavy_modules()
    backend = compiled._backend
    with torch.no_grad():  # the namespace the model was compiled in
        local = backend.local(backend.namespace_for(inputs[0].device)).stats.snapshot()
    print(json.dumps(dict(isocache.stats(), err=max(outs), frames=counters["stats"]["unique_graphs"], log=records,
                          heavy=heavy, local=local)))
    """
)


# isocache.compile's warm start rests on torch's ahead-of-time capture (see isocache._torch.dynamo).
pytestmark = pytest.mark.skipif(
    not dynamo.aot_compile_supported(),
    reason="isocache.compile's warm start needs torch >= {}.{} (tests/test_torch_versions.py covers the fallback)".format(
        *dynamo.AOT_COMPILE_SINCE
    ),
)


def run(cache: Path, setup: str, extra_path: Path | None = None) -> dict[str, Any]:
    env = {}
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    code = SCRIPT.format(tests=str(TESTS), setup=textwrap.indent(textwrap.dedent(setup), ""))
    return run_python(code, cache, env=env)


def messages(r: dict[str, Any], level: str | None = None) -> list[str]:
    return [m for lvl, m in r["log"] if level is None or lvl == level]


@pytest.mark.parametrize(
    "name,device",
    [("llama", "cpu"), ("gpt2", "cpu"), ("bert", "cpu"), ("llama", "cuda")],
)
def test_new_process_loads_without_tracing(name: str, device: str, tmp_path: Path) -> None:
    setup = f'model, inputs = MODELS["{name}"](2).to("{device}"), [token_ids(device="{device}")]'
    first = run(tmp_path / "cache", setup)
    assert first["err"] < 1e-4
    assert first["frames"] == 1 and first["models_loaded"] == 0 and first["trace_seconds"] > 0
    assert first["compiled"] == 3
    second = run(tmp_path / "cache", setup)
    assert second["err"] < 1e-4
    assert second["frames"] == 0, "Dynamo traced no frame"
    assert second["models_loaded"] == 1
    assert second["compiled"] == 0 and second["loaded"] == 3 and second["reused"] == 0
    assert second["local"]["hits"] == 1 and second["local"]["misses"] == 0, "one read: the entry, pieces bundled"
    if device == "cpu":  # (a CUDA wrapper imports Triton's runtime, not checked here)
        assert second["heavy"] == [], "loading imported none of Inductor's compiler"
    lines = [m for m in messages(second, "INFO") if m.startswith("isocache: loaded compiled model")]
    assert len(lines) == 1 and "3 pieces (3 loaded, 0 reused), tracing skipped in" in lines[0]
    parts = ("read", "verify", "pieces", "guards", "first call")
    assert all(f"{part} " in lines[0] for part in parts), lines[0]
    assert all(second[f"warm_{part.replace(' ', '_')}_seconds"] > 0 for part in parts)


def test_changed_config_is_detected_and_rebuilt(tmp_path: Path) -> None:
    base = 'model, inputs = MODELS["llama"](2), [token_ids()]'
    run(tmp_path / "cache", base)
    changed = run(
        tmp_path / "cache",
        """
        model = MODELS["llama"](2)
        model.config.rms_norm_eps = 1e-3
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.variance_epsilon = 1e-3
        inputs = [token_ids()]
        """,
    )
    assert changed["err"] < 1e-4 and changed["models_loaded"] == 0 and changed["frames"] >= 1
    assert any("configuration changed" in m for m in messages(changed, "INFO"))


MODULE = """
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.nn.functional.scaled_dot_product_attention(h, h, h)
        return torch.relu(self.b(h)){extra}
"""


def test_changed_source_is_detected_and_rebuilt(tmp_path: Path) -> None:
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "tinymodel.py").write_text(MODULE.format(extra=""))
    setup = """
    import tinymodel
    model, inputs = tinymodel.Tiny().eval(), [torch.randn(2, 4, 8, 16)]
    """
    first = run(tmp_path / "cache", setup, pkg)
    assert first["err"] < 1e-5 and first["trace_seconds"] > 0
    second = run(tmp_path / "cache", setup, pkg)
    assert second["models_loaded"] == 1 and second["frames"] == 0
    (pkg / "tinymodel.py").write_text(MODULE.format(extra="  # edited: a comment is not code"))
    third = run(tmp_path / "cache", setup, pkg)
    assert third["models_loaded"] == 1 and third["frames"] == 0
    (pkg / "tinymodel.py").write_text(MODULE.format(extra=" * 2"))
    fourth = run(tmp_path / "cache", setup, pkg)
    assert fourth["err"] < 1e-5 and fourth["models_loaded"] == 0 and fourth["frames"] >= 1
    assert any("the code of tinymodel.Tiny" in m for m in messages(fourth, "INFO"))


def test_input_outside_the_compiled_shape_falls_back(tmp_path: Path) -> None:
    setup = 'model, inputs = MODELS["llama"](2), [token_ids(seq=16), token_ids(seq=24)]'
    run(tmp_path / "cache", setup)
    second = run(tmp_path / "cache", setup)
    assert second["err"] < 1e-4, "the second shape gives correct outputs"
    assert second["models_loaded"] == 1
    warnings = [m for m in messages(second, "WARNING") if "differs from what its saved entry was compiled for" in m]
    assert len(warnings) == 1


def slot_files(cache: Path) -> list[Path]:
    files = []
    for ns in _core.list_namespaces(cache):
        store = _core.Store(cache, ns)
        for digest, *_ in store.list():
            data = store.get_checked(digest).payload
            if data is not None and data.startswith(ENTRY_MAGIC):
                files.append(Path(store.object_path(digest)))
    return files


def test_pieces_missing_from_the_store_load_from_the_entry(tmp_path: Path) -> None:
    setup = 'model, inputs = MODELS["llama"](2), [token_ids()]'
    cache = tmp_path / "cache"
    run(cache, setup)
    removed = 0
    for ns in _core.list_namespaces(cache):
        store = _core.Store(cache, ns)
        for digest, *_ in store.list():
            data = store.get_checked(digest).payload
            if data is not None and not data.startswith(ENTRY_MAGIC):
                Path(store.object_path(digest)).unlink()
                removed += 1
    assert removed == 3
    warm = run(cache, setup)
    assert warm["err"] < 1e-4 and warm["models_loaded"] == 1 and warm["frames"] == 0
    assert warm["loaded"] == 3 and warm["compiled"] == 0


def test_corrupt_or_foreign_entry_is_refused_and_rebuilt(tmp_path: Path) -> None:
    setup = 'model, inputs = MODELS["llama"](2), [token_ids()]'
    cache = tmp_path / "cache"
    run(cache, setup)
    (entry,) = slot_files(cache)
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    corrupt = run(cache, setup)
    assert corrupt["err"] < 1e-4 and corrupt["models_loaded"] == 0 and corrupt["quarantined"] == 1
    (entry,) = slot_files(cache)
    digest = entry.name
    ns = entry.parents[2].name
    magic = ENTRY_MAGIC
    _core.Store(cache, ns).put(digest, magic + (2).to_bytes(4, "little") + b"{}" + b"not torch's format")
    foreign = run(cache, setup)
    assert foreign["err"] < 1e-4 and foreign["models_loaded"] == 0 and foreign["frames"] >= 1
    assert any("tracing it again" in m or "rebuilding" in m for m in messages(foreign))
    # A manifest that lists a bundled piece the entry does not hold.
    head = b'{"bundle": [["00", 99, 1.0]]}'
    _core.Store(cache, ns).put(digest, magic + len(head).to_bytes(4, "little") + head + b"short")
    short = run(cache, setup)
    assert short["err"] < 1e-4 and short["models_loaded"] == 0
    assert any("does not match its manifest" in m for m in messages(short))
    again = run(cache, setup)
    assert again["models_loaded"] == 1 and again["frames"] == 0


def test_graph_break_falls_back_with_one_warning(tmp_path: Path) -> None:
    setup = """
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MODELS["llama"](2)
        def forward(self, ids):
            out = self.inner(ids)
            print("side effect", file=sys.stderr)  # a graph break
            return out
    model, inputs = Breaks().eval(), [token_ids()]
    """
    r = run(tmp_path / "cache", setup)
    assert r["err"] < 1e-4
    warnings = [m for m in messages(r, "WARNING") if "cannot be compiled ahead of time" in m]
    assert len(warnings) == 1
