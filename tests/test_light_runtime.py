"""The light runtime of saved pieces (`isocache._torch.runtime`), checked against the installed torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import torch

from isocache._torch import inductor, runtime
from support import capture


class _MatMul(torch.nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w) + 1


def test_stand_ins_are_what_inductor_registers() -> None:
    import torch._inductor.lowering  # noqa: F401  (registers Inductor's extern kernels)
    from torch._inductor import select_algorithm, utils
    from torch._inductor.codegen import memory_planning

    registered = vars(select_algorithm.extern_kernels)
    checked = [name for name in runtime.EXTERN_TORCH_FUNCTIONS if name in registered]
    assert {"mm", "addmm", "bmm"} <= set(checked)
    for name in checked:
        assert getattr(runtime.extern_kernels, name) is registered[name], name
    other = next(name for name in registered if name not in runtime.EXTERN_TORCH_FUNCTIONS)
    assert getattr(runtime.extern_kernels, other) is registered[other], "other names come from Inductor"
    assert memory_planning._align is utils._align


def test_saved_wrappers_import_the_light_runtime() -> None:
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    ((gm, example_inputs),) = capture(_MatMul(), x, w)
    with torch.no_grad():
        artifact = inductor.compile_piece(gm, example_inputs)
        payload = inductor.serialize(artifact)
    entry = pickle.loads(payload[len(b"ISOCAOT1") :])[0]
    source = entry.compiled_fw.result.source_code
    lines = source.split("\n")
    for heavy, light in runtime.LIGHT_IMPORTS.items():
        assert heavy not in lines and light in lines, "Inductor still writes this import; the rewrite applies"
    assert "extern_kernels.mm(" in source
    from torch._inductor.decomposition import select_decomp_table

    decomp_fn = entry.compiled_fw.result.fx_kwargs.get("get_decomp_fn")  # torch 2.11 keeps none
    assert decomp_fn in (None, runtime.select_decomp_table)
    assert runtime.select_decomp_table() == select_decomp_table(), "the same table, imported when asked for"
    loaded = inductor.piece_callable(inductor.deserialize(payload), returns_tuple=False)
    with torch.no_grad():
        assert torch.allclose(loaded(x, w), torch.relu(x @ w) + 1)


def test_inductor_graph_is_deferred_only_for_the_loading_thread() -> None:
    # A fresh process: here torch._inductor.graph is imported already.
    script = textwrap.dedent(
        """
        import sys, threading, torch
        import torch._inductor.codecache
        from isocache._torch import runtime
        seen = {}
        with runtime.graph_lowering_deferred():
            from torch._inductor.graph import GraphLowering
            seen["here"] = GraphLowering.save_output_code
            def other():
                from torch._inductor.graph import GraphLowering as real
                seen["other"] = real.__module__
            t = threading.Thread(target=other)
            t.start(); t.join()
        import torch._inductor.graph as after
        seen["after"] = after.GraphLowering.__module__
        seen["package"] = torch._inductor.graph is after
        print(seen)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    seen = eval(out.stdout.strip().splitlines()[-1])
    assert seen == {"here": None, "other": "torch._inductor.graph", "after": "torch._inductor.graph", "package": True}


def test_a_loaded_piece_runs_without_inductor_debug(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    ((gm, example_inputs),) = capture(_MatMul(), x, w)
    with torch.no_grad():
        payload = inductor.serialize(inductor.compile_piece(gm, example_inputs))
    (tmp_path / "piece").write_bytes(payload)
    # A fresh process (here both are loaded already) with the same Inductor directory: the kernels exist.
    script = textwrap.dedent(
        f"""
        import sys, torch
        from isocache._torch import inductor
        payload = open({str(tmp_path / "piece")!r}, "rb").read()
        loaded = inductor.piece_callable(inductor.deserialize(payload), returns_tuple=False)
        x, w = torch.randn(8, 16), torch.randn(16, 16)
        with torch.no_grad():
            ok = torch.allclose(loaded(x, w), torch.relu(x @ w) + 1)
        seen = {{"ok": ok, "decompositions": "torch._inductor.decomposition" in sys.modules, "stand_in": type(sys.modules["torch._inductor.debug"]).__name__,
                 "partitioner": "torch._functorch.partitioners" in sys.modules}}
        import torch._inductor.debug as debug  # the import finds the stand-in; a read brings the real module
        seen["real"] = debug.DebugContext.__module__
        debug.RECORD_GRAPH_EXECUTION = True  # a write goes to the real module, and so does a later read
        seen["switch"] = (debug.RECORD_GRAPH_EXECUTION, torch._inductor.debug.RECORD_GRAPH_EXECUTION)
        debug.RECORD_GRAPH_EXECUTION = False
        seen["after"] = type(sys.modules["torch._inductor.debug"]).__name__
        seen["package"] = torch._inductor.debug is sys.modules["torch._inductor.debug"]
        with torch.no_grad():
            seen["ok_after"] = torch.allclose(loaded(x, w), torch.relu(x @ w) + 1)
        print(seen)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = eval(out.stdout.strip().splitlines()[-1])
    assert seen == {
        "ok": True,
        "decompositions": False,
        "stand_in": "_DeferredDebugModule",
        "partitioner": False,
        "real": "torch._inductor.debug",
        "switch": (True, True),
        "after": "module",
        "package": True,
        "ok_after": True,
    }
