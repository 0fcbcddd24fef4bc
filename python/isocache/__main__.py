"""The command line: ``python -m isocache demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
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
        f"{args.seq} tokens; store: {backend._root()}"
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
    print(f"first call (trace + compile + run): {first_call:.2f} s")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isocache", description="isocache: a compile cache for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a Llama built from a config and check it against eager")
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--seq", type=int, default=32)
    demo.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--cache-dir", default=None, help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
