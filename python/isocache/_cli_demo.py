"""``python -m isocache demo``: compile a Llama built from a config and check it against eager (the only
command that imports torch)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

__all__ = ["demo_command"]


def demo_command(args: argparse.Namespace) -> int:
    import torch

    import isocache

    try:
        import transformers
    except ImportError:
        print("the demo needs transformers: pip install 'isocache[demo]'", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
    backend = isocache.Backend(cache_dir=args.cache_dir)
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
    if s["compiled"]:
        what = f"Dynamo trace, compile {s['compiled']} distinct pieces"
    else:
        what = f"Dynamo trace, load {s['loaded']} distinct pieces from the store"
    print(f"first call ({what}, run): {first_call:.2f} s")
    print(f"output matches eager: {'yes' if ok else 'NO'} (max abs diff {err:.2e})")
    print(
        f"pieces: {s['pieces']} ({s['compiled']} compiled, {s['loaded']} loaded, "
        f"{s['reused']} reused, {s['failed']} failed); "
        f"compile {s['compile_seconds']:.2f} s, load {s['load_seconds']:.2f} s, "
        f"digests {s['digest_seconds'] * 1e3:.1f} ms"
    )
    if s["compiled"] and not s["loaded"]:
        print("run it again: the next process loads every distinct piece instead of compiling it")
    return 0 if ok else 1
