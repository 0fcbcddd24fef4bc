"""Digest throughput on the pieces of a Llama captured by Dynamo.

Compares, per piece: isocache's Rust digest, the pure-Python reference encoder
(tests/reference_encoder.py) and Inductor's own FX graph cache key
(`torch._inductor.codecache.compiled_fx_graph_hash`). Prints µs per piece,
nodes per second and the ratios; writes benches/results/digest.json.

    python benches/bench_digest.py [--layers 32] [--repeat 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import capture, llama, summary, timed, tokens, write_json

TARGETS = {"nodes_per_second": 1e6, "vs_reference": 10.0, "vs_inductor_key": 300.0}


def fake_inputs(gm: torch.fx.GraphModule) -> list[Any]:
    return [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]


def inductor_key(gm: torch.fx.GraphModule, inputs: list[Any]) -> str:
    from torch._inductor.codecache import compiled_fx_graph_hash

    key, _ = compiled_fx_graph_hash(gm, inputs, {}, list(range(len(inputs))))
    return key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=20, help="passes over all pieces (isocache, reference)")
    parser.add_argument("--inductor-repeat", type=int, default=3, help="passes for Inductor's key (slow)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benches/results)")
    args = parser.parse_args()

    import isocache
    from isocache import _core
    from isocache._namespace import namespace_of
    from isocache.split import normalize_splitting_ops, split_graph
    from reference_encoder import reference_digest

    (gm, _), *_ = capture(llama(args.layers, args.hidden), tokens())
    pieces = [p.module for p in split_graph(gm, normalize_splitting_ops(None)).pieces]
    nodes = sum(len(p.graph.nodes) for p in pieces)
    namespace = namespace_of(torch.device("cpu")).name
    print(
        f"{len(pieces)} pieces, {nodes} nodes ({args.layers}-layer Llama, hidden {args.hidden}); torch {torch.__version__}"
    )

    # Sanity: the three are computing something for the same pieces.
    assert [_core.digest(p, None, namespace)[0] for p in pieces] == [
        reference_digest(p, None, namespace) for p in pieces
    ]
    inputs = [fake_inputs(p) for p in pieces]

    methods = {
        "isocache": lambda: [_core.digest(p, None, namespace) for p in pieces],
        "reference": lambda: [reference_digest(p, None, namespace) for p in pieces],
        "inductor_key": lambda: [inductor_key(p, i) for p, i in zip(pieces, inputs)],
    }
    results: dict[str, Any] = {}
    for name, fn in methods.items():
        fn()  # warm caches (target names, imports)
        repeat = args.inductor_repeat if name == "inductor_key" else args.repeat
        samples = [t / len(pieces) for t in timed(fn, repeat)]
        stats = summary(samples)
        stats["nodes_per_second"] = nodes / len(pieces) / stats["median"]
        results[name] = stats

    iso = results["isocache"]["median"]
    ratios = {
        "vs_reference": results["reference"]["median"] / iso,
        "vs_inductor_key": results["inductor_key"]["median"] / iso,
    }
    print(f"{'method':<14}{'µs/piece (median)':>20}{'min':>10}{'max':>10}{'Mnodes/s':>10}")
    for name, s in results.items():
        print(
            f"{name:<14}{s['median'] * 1e6:>20.1f}{s['min'] * 1e6:>10.1f}{s['max'] * 1e6:>10.1f}"
            f"{s['nodes_per_second'] / 1e6:>10.2f}"
        )
    met = {
        "nodes_per_second": results["isocache"]["nodes_per_second"] >= TARGETS["nodes_per_second"],
        "vs_reference": ratios["vs_reference"] >= TARGETS["vs_reference"],
        "vs_inductor_key": ratios["vs_inductor_key"] >= TARGETS["vs_inductor_key"],
    }
    print(
        f"isocache is {ratios['vs_reference']:.1f}x the reference encoder and "
        f"{ratios['vs_inductor_key']:.0f}x Inductor's key"
    )
    for k, ok in met.items():
        print(f"target {k:<18} {'met' if ok else 'MISSED'} (target {TARGETS[k]:g})")
    path = write_json(
        "digest",
        {
            "layers": args.layers,
            "hidden": args.hidden,
            "pieces": len(pieces),
            "nodes": nodes,
            "isocache_version": isocache.__version__,
            "results": results,
            "ratios": ratios,
            "targets": TARGETS,
            "met": met,
        },
        out=args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
