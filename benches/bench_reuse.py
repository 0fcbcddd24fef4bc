"""Reuse latency: serving one isometric piece that is already compiled.

isocache REUSE (canonical digest + index lookup, what the backend does for
layer 17 once layer 3 is compiled) against a warm Inductor FX-graph-cache hit
on the same piece (`standalone_compile` of an identical graph, after the first
compile filled Inductor's cache). Writes benches/results/reuse.json.

    python benches/bench_reuse.py [--layers 8] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import capture, llama, summary, tokens, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="at least 3: two middle pieces are compared")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benches/results)")
    args = parser.parse_args()

    import isocache
    from isocache._namespace import namespace_of
    from isocache._torch import inductor
    from isocache.backend import process_index
    from isocache.digest import digest_with_reason
    from isocache.split import normalize_splitting_ops, split_graph

    torch.set_num_threads(2)
    (gm, _), *_ = capture(llama(args.layers, args.hidden), tokens(args.seq))
    pieces = split_graph(gm, normalize_splitting_ops(None)).compiled_pieces
    first, other = pieces[1].module, pieces[2].module  # two isometric middle pieces
    namespace = namespace_of(torch.device("cpu")).name
    inputs = inductor.fake_inputs(other)
    assert inputs is not None

    # isocache: compile `first` once, then serve `other` from the index.
    index = process_index()
    digest, _ = digest_with_reason(first, None, namespace)
    assert digest_with_reason(other, None, namespace)[0] == digest, "the pieces are isometric"
    compiled = inductor.compile_piece(first, inductor.fake_inputs(first) or [])
    index.publish(digest, inductor.piece_callable(compiled, inductor.returns_tuple(first)))

    def isocache_reuse() -> Any:
        d, _ = digest_with_reason(other, None, namespace)
        entry = index.get(d)
        assert entry is not None and entry.state == "ready"
        index.record_hit(d)
        return entry.value

    def inductor_hit() -> Any:
        return inductor.compile_piece(other, inputs)

    inductor_hit()  # fills Inductor's FX graph cache for this graph
    results = {}
    for name, fn, inner in (("isocache_reuse", isocache_reuse, 200), ("inductor_fx_cache_hit", inductor_hit, 1)):
        samples = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) / inner)
        results[name] = summary(samples)
    ratio = results["inductor_fx_cache_hit"]["median"] / results["isocache_reuse"]["median"]
    print(f"piece of {len(other.graph.nodes)} nodes ({args.layers}-layer Llama, hidden {args.hidden})")
    for name, s in results.items():
        print(f"{name:<24}{s['median'] * 1e6:>12.1f} µs (min {s['min'] * 1e6:.1f}, max {s['max'] * 1e6:.1f})")
    print(f"isocache REUSE is {ratio:.0f}x faster than a warm Inductor cache hit")
    path = write_json(
        "reuse",
        {
            "layers": args.layers,
            "hidden": args.hidden,
            "nodes": len(other.graph.nodes),
            "results": results,
            "ratio": ratio,
            "isocache_version": isocache.__version__,
        },
        out=args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
