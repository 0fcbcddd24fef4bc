"""One measured process: start a model with one method, report timings as JSON.

Run by benches/run.py, one fresh process per measurement, so every figure
includes imports, tracing and compiling as a user's process pays them:

    python benches/_startup.py --method isocache --layers 8

Methods: eager, dynamo (tracing only, the floor of any backend that lets
Dynamo trace at every start), inductor (torch.compile of the whole model),
regional (each decoder layer compiled, as the PyTorch recipe does), isocache,
isocache_marked (isocache.mark_blocks, then backend="isocache"), isocache_backend_warm
(backend="isocache" with ISOCACHE_BACKEND_WARM=1), isocache_compile (isocache.compile: warm starts skip tracing), aot_compile
(torch's own ahead-of-time path, with Inductor), when available.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import FAMILIES, tokens


def build(method: str, model: torch.nn.Module, cache_dir: str) -> Callable[..., Any]:
    if method == "eager":
        return model
    if method == "dynamo":

        def trace_only(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            return gm.forward

        return torch.compile(model, backend=trace_only)
    if method == "inductor":
        return torch.compile(model, backend="inductor")
    if method == "regional":
        for layer in model.layers:  # type: ignore[union-attr]
            layer.compile(backend="inductor")
        return model
    if method == "isocache":
        return torch.compile(model, backend="isocache")
    if method == "isocache_backend_warm":  # the opt-in warm start of backend="isocache" (torch 2.15)
        os.environ["ISOCACHE_BACKEND_WARM"] = "1"
        return torch.compile(model, backend="isocache")
    if method == "isocache_marked":
        import isocache

        isocache.mark_blocks(model)
        return torch.compile(model, backend="isocache")
    if method == "isocache_compile":
        import isocache

        return isocache.compile(model, cache_dir=cache_dir or None)
    if method == "aot_compile":
        return torch_aot_compile(model, cache_dir)
    raise SystemExit(f"unknown method {method!r}")


def torch_aot_compile(model: torch.nn.Module, cache_dir: str) -> Callable[..., Any]:
    """torch's own ahead-of-time path with Inductor: compile and save once, load after.

    Loading needs the module objects Dynamo bound under per-process names; the
    same small fix isocache applies is applied here, so the peer is measured at
    its best.
    """
    from isocache import cold_start

    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "aot_compiled.bin")
    names = os.path.join(cache_dir, "aot_compiled.json")
    state: dict[str, Any] = {}

    def call(ids: torch.Tensor) -> Any:
        if "fn" not in state:
            if os.path.exists(path):
                scope = dict(type(model).forward.__globals__)
                import importlib

                for name, module in json.loads(Path(names).read_text()).items():
                    scope[name] = importlib.import_module(module)
                with open(path, "rb") as f:
                    state["fn"] = torch.compiler.load_compiled_function(f, f_globals=scope)
            else:
                opt: Any = torch.compile(
                    model,
                    fullgraph=True,
                    options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe},
                )
                compiled = opt.forward.aot_compile(((ids,), {}))
                compiled.save_compiled_function(path)
                Path(names).write_text(json.dumps(cold_start._module_globals(compiled, set())))
                state["fn"] = compiled
        return state["fn"](model, ids)

    return call


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steady", type=int, default=20, help="forwards timed after the first")
    parser.add_argument("--no-kv-cache", action="store_true", help="run the model with use_cache=False")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cache_dir = os.environ.get("ISOCACHE_DIR", "")
    model = FAMILIES[args.family](args.layers, args.hidden)
    if args.no_kv_cache:
        model.config.use_cache = False
    ids = tokens(args.seq)
    go = os.environ.get("BENCH_GO")
    if go:  # tell the harness this process is ready to start
        Path(go).with_name(f"ready-{os.getpid()}").touch()
    while go and not os.path.exists(go):  # processes measured together start together
        time.sleep(0.005)
    with torch.no_grad():
        setup = time.perf_counter()
        fn = build(args.method, model, cache_dir)
        out = fn(ids)
        first = time.perf_counter()
        steady = []
        for _ in range(args.steady):
            t = time.perf_counter()
            fn(ids)
            steady.append(time.perf_counter() - t)
        expected = model(ids).last_hidden_state if args.method != "eager" else out.last_hidden_state
        err = (out.last_hidden_state - expected).abs().max().item()
    result: dict[str, Any] = {
        "method": args.method,
        "layers": args.layers,
        # From process start (imports included) to the first output.
        "first_output_s": first - START,
        # From the compile call to the first output (model construction excluded).
        "compile_to_first_output_s": first - setup,
        "steady_ms": statistics.median(steady) * 1e3 if steady else None,
        "max_abs_err": err,
    }
    if args.method.startswith("isocache"):
        import isocache

        result["isocache"] = isocache.stats()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
