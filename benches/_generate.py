"""One measured generation process: report time to first token and decode speed as JSON.

Run by benches/generate.py, one fresh process per measurement:

    python benches/_generate.py --method isocache_compile --layers 32

Methods: eager; inductor (``model.forward = torch.compile(model.forward)``,
as transformers' documentation compiles a model, whole-model Inductor);
isocache (the same with ``backend="isocache"``); isocache_compile
(``isocache.compile(model).generate``). Greedy decoding, no end-of-sequence
token, so every run generates exactly ``--new`` tokens.
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

from _common import llama, tokens


def build(method: str, model: Any, cache_dir: str) -> Callable[..., Any]:
    if method == "eager":
        return model.generate  # type: ignore[no-any-return]
    if method == "inductor":
        model.forward = torch.compile(model.forward, backend="inductor")
        return model.generate  # type: ignore[no-any-return]
    if method == "isocache":
        model.forward = torch.compile(model.forward, backend="isocache")
        return model.generate  # type: ignore[no-any-return]
    if method == "isocache_compile":
        import isocache

        return isocache.compile(model, cache_dir=cache_dir or None).generate  # type: ignore[no-any-return]
    raise SystemExit(f"unknown method {method!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations after the first")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model: Any = llama(args.layers, args.hidden, lm=True)
    ids = tokens(args.prompt)
    options = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        setup = time.perf_counter()
        generate = build(args.method, model, os.environ.get("ISOCACHE_DIR", ""))
        generate(ids, max_new_tokens=1, **options)  # prefill: the first token
        first_token = time.perf_counter()
        out = generate(ids, max_new_tokens=args.new, **options)  # the first decode steps compile here
        first_generate = time.perf_counter()
        prefill, full = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            generate(ids, max_new_tokens=1, **options)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            generate(ids, max_new_tokens=args.new, **options)
            full.append(time.perf_counter() - t)
        model.__dict__.pop("forward", None)  # the eager reference
        expected = model.generate(ids, max_new_tokens=args.new, **options)
    decode_s = statistics.median(full) - statistics.median(prefill)
    result: dict[str, Any] = {
        "method": args.method,
        "layers": args.layers,
        # From the compile call to the first token (model construction excluded).
        "ttft_s": first_token - setup,
        # From process start (imports and model construction included) to the first token.
        "ttft_process_s": first_token - START,
        "first_generate_s": first_generate - first_token,
        "prefill_ms": 1e3 * statistics.median(prefill),
        "decode_tokens_per_s": (args.new - 1) / decode_s if decode_s > 0 else None,
        "tokens_equal": bool(torch.equal(out, expected)),
    }
    if args.method.startswith("isocache"):
        import isocache

        result["isocache"] = isocache.stats()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
