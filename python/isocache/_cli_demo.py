"""``python -m isocache demo``: compile a Llama built from a config and check it against eager (the only
command that imports torch)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from ._cli_common import emit

__all__ = ["demo_arguments", "demo_command"]


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # The name before the global --dir; kept so that older commands still run.
    parser.add_argument("--cache-dir", dest="dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def demo_command(args: argparse.Namespace) -> int:
    import torch

    import isocache

    try:
        import transformers
    except ImportError:
        print("isocache: the demo needs transformers: pip install 'isocache[demo]'", file=sys.stderr)
        return 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # isocache's lines carry their prefix
    logging.getLogger("isocache").setLevel(logging.INFO)
    hf: Any = transformers  # transformers' own annotations are incomplete
    config = hf.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=1024,
        max_position_embeddings=max(512, args.seq),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = hf.LlamaModel(config).eval().to(device)
    ids = torch.randint(0, 1024, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    backend = isocache.Backend(cache_dir=args.dir)
    if not args.json:
        print(
            f"isocache demo: {args.layers}-layer Llama (hidden {args.hidden}, random weights) on {device}, "
            f"{args.seq} tokens; store: {backend.root}"
        )
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        compiled: Any = torch.compile(model, backend=backend, dynamic=args.dynamic)
        start = time.perf_counter()
        actual = compiled(ids).last_hidden_state
        first_call = time.perf_counter() - start
    err = (actual - expected).abs().max().item()
    ok = torch.allclose(actual, expected, rtol=1e-3, atol=1e-3)
    s = isocache.stats()
    # Each figure once, as the INFO line above gives it (per graph; summed here).
    if s["compiled"]:
        what = f"{s['compiled']} distinct pieces compiled"
    else:
        what = f"{s['loaded']} distinct pieces loaded from the store"
    if s["reused"]:
        what += f", {s['reused']} reused"
    other = max(0.0, first_call - s["trace_seconds"] - s["graph_seconds"])
    took = (
        f"Dynamo tracing {s['trace_seconds']:.2f} s; {what} in {s['graph_seconds']:.2f} s; the other {other:.2f} s: "
        "torch's imports and setup, compile workers starting, running the model"
    )
    lines = [
        f"first call: {first_call:.2f} s ({took})",
        f"output matches eager: {'yes' if ok else 'NO'} (max abs diff {err:.2e})",
        f"pieces: {s['pieces']} ({s['compiled']} compiled, {s['loaded']} loaded, "
        f"{s['reused']} reused, {s['failed']} failed)",
    ]
    if s["compiled"] and not s["loaded"]:
        lines.append("run it again: the next process loads every distinct piece instead of compiling it")
    data = {
        "device": device,
        "store": backend.root,
        "matches_eager": bool(ok),
        "max_abs_diff": err,
        "first_call_seconds": first_call,
        **{k: s[k] for k in ("pieces", "compiled", "loaded", "reused", "failed")},
        **{k: s[k] for k in ("trace_seconds", "graph_seconds", "compile_seconds", "load_seconds")},
    }
    emit(args, data, "\n".join(lines))
    return 0 if ok else 1
