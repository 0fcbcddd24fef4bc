"""What invalidates a saved compiled model: isocache.compile against torch's own aot_compile.

    python benches/invalidation.py

For each change (a helper edited in another file, a module global set at run
time, a plain attribute set, ``train()`` after saving in ``eval()``, a method
replaced), a first process compiles and saves a small model of two blocks, a
second process makes the change, loads, runs and compares with eager. Each
method's outcome: ``traced again`` (the saved code was refused, outputs
correct), ``raised`` (the load or the call raised; the user must handle it),
``stale`` (the saved code ran and the output is wrong) or ``loaded`` (the
change did not matter). torch's aot_compile is run twice: with its default
guards and with only its portable guards (what a saved function keeps when it
must load in another process: ``keep_portable_guards_unsafe``). Writes a
Markdown table to stdout and ``benches/results/invalidation/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support import VALIDITY_HELPERS, validity_model

CHANGES = {
    "helper edited in another file": ("", True),
    "module global set at run time": ("valmodel.SCALE = 2.0", False),
    "attribute set at run time": ("model.blocks[1].alpha = 0.25", False),
    "train() after saving in eval()": ("model.train()", False),
    "method replaced": ("valmodel.Block.forward = lambda self, x: torch.tanh(self.lin(x))", False),
}

SCRIPT = textwrap.dedent(
    """
    import importlib, json, os, sys, torch
    import valmodel
    method, change, store = sys.argv[1], sys.argv[2], sys.argv[3]
    model, x = valmodel.Tiny().eval(), torch.randn(2, 16)
    exec(change)
    saved = os.path.join(store, "aot.bin")
    outcome = "compiled"
    with torch.no_grad():
        expected = model(x)
        try:
            if method == "isocache.compile":
                import isocache
                compiled = isocache.compile(model, cache_dir=store)
                actual = compiled(x)
                stats = isocache.stats()
                if os.path.exists(os.path.join(store, "second")):
                    outcome = "loaded" if stats["models_loaded"] else "traced again"
                open(os.path.join(store, "second"), "w").close()
            else:
                options = {"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe} if method.endswith("portable") else {}
                if os.path.exists(saved):
                    from isocache.compiled_model import CompiledModel
                    scope = dict(torch.nn.Module.__call__.__globals__)
                    for name, module in json.load(open(saved + ".json")).items():
                        scope[name] = importlib.import_module(module)
                    with open(saved, "rb") as f:
                        fn = torch.compiler.load_compiled_function(f, f_globals=scope)
                    outcome = "loaded"
                else:
                    opt = torch.compile(model, fullgraph=True, options=options)
                    fn = opt.forward.aot_compile(((x,), {}))
                    fn.save_compiled_function(saved)
                    from isocache.compiled_model import CompiledModel
                    json.dump(CompiledModel._module_globals(fn), open(saved + ".json", "w"))
                actual = fn(model, x)
        except Exception as e:
            print(json.dumps({"outcome": "raised", "error": f"{type(e).__name__}: {str(e)[:120]}"}))
            raise SystemExit(0)
    wrong = not torch.allclose(actual, expected, atol=1e-5)
    print(json.dumps({"outcome": "stale" if wrong else outcome}))
    """
)

METHODS = ("isocache.compile", "aot_compile", "aot_compile portable")


def run(method: str, change: str, store: Path, src: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, method, change, str(store)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    rows: dict[str, dict[str, str]] = {}
    for name, (change, edits_helper) in CHANGES.items():
        rows[name] = {}
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                src, store = validity_model(Path(tmp) / "src"), Path(tmp) / "store"
                store.mkdir()
                first = run(method, "", store, src)
                assert first["outcome"] == "compiled", first
                if edits_helper:
                    (src / "helpers.py").write_text(VALIDITY_HELPERS.format(factor=3))
                rows[name][method] = run(method, change, store, src)["outcome"]
            print(f"{name}: {method}: {rows[name][method]}", file=sys.stderr)
    lines = ["| change after saving | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
    lines += [f"| {name} | " + " | ".join(rows[name][m] for m in METHODS) + " |" for name in rows]
    table = "\n".join(lines)
    print(table)
    out = HERE / "results" / "invalidation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "invalidation.md").write_text(table + "\n")
    (out / "invalidation.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
