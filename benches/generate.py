"""Generation benchmark: time to first token (cold and warm) and decode speed, per method.

    python benches/generate.py                       # 32-layer Llama, prompt 64, 32 new tokens
    python benches/generate.py --layers 4 --repeats 1 --out /tmp/gen   # quick

Each measurement is a fresh process (`_generate.py`); a warm start is a second
process on the caches the cold one filled (isocache's store, Inductor's
caches). Writes ``generate.json`` and ``summary.md`` with the generation
issue's Must and targets, ratios taken within this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine, relative_paths, write_json
from run import fresh_env, run_json, stats_of

METHODS = ("eager", "inductor", "isocache", "isocache_compile")


def measure(method: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "_generate.py"), "--method", method, "--layers", str(args.layers)]
    cmd += ["--hidden", str(args.hidden), "--prompt", str(args.prompt), "--new", str(args.new)]
    cmd += ["--repeats", str(args.steady)]
    return run_json(cmd, env, timeout=3600)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for method in args.methods:
        runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="isocache-generate-") as tmp:
                env = fresh_env(Path(tmp))
                cold = measure(method, args, env)
                warm = measure(method, args, env)
            runs.append((cold, warm))
            print(
                f"  {method:<17} run {r + 1}/{args.repeats}: TTFT cold {cold['ttft_s']:7.2f} s  "
                f"warm {warm['ttft_s']:6.2f} s (from process start {warm['ttft_process_s']:6.2f} s)  "
                f"decode {warm['decode_tokens_per_s'] or float('nan'):6.1f} tok/s",
                flush=True,
            )

        def of(which: int, key: str, runs: list[tuple[dict[str, Any], dict[str, Any]]] = runs) -> dict[str, float]:
            return stats_of([float(run[which][key]) for run in runs])

        # Decode speed is the difference of two timings: at tiny sizes noise can leave none (None).
        decode = [float(v) for run in runs for w in (0, 1) if (v := run[w]["decode_tokens_per_s"]) is not None]

        rows[method] = {
            "method": method,
            "ttft_cold_s": of(0, "ttft_s"),
            "ttft_warm_s": of(1, "ttft_s"),
            "ttft_cold_process_s": of(0, "ttft_process_s"),
            "ttft_warm_process_s": of(1, "ttft_process_s"),
            "first_generate_cold_s": of(0, "first_generate_s"),
            "first_generate_warm_s": of(1, "first_generate_s"),
            "prefill_ms": stats_of([float(run[w]["prefill_ms"]) for run in runs for w in (0, 1)]),
            "decode_tokens_per_s": stats_of(decode) if decode else None,
            "tokens_equal": all(run[w]["tokens_equal"] for run in runs for w in (0, 1)),
            "isocache_warm": [run[1].get("isocache") for run in runs],
        }
    return rows


def targets(rows: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    def median(method: str, key: str) -> float | None:
        row = rows.get(method)
        return None if row is None or row[key] is None else float(row[key]["median"])

    iso, ind, eager = "isocache_compile", "inductor", "eager"
    # (label, measured value or None, how to show it, whether it meets the target)
    checks: list[tuple[str, float | None, str, Callable[[float], bool]]] = []
    a, b = median(ind, "ttft_warm_s"), median(iso, "ttft_warm_s")
    checks.append(
        (
            "Must: isocache.compile warm time to first token >= 3x faster than whole-model Inductor's",
            a / b if a and b else None,
            "{:.2f}x",
            lambda r: r >= 3,
        )
    )
    a, b = median(iso, "decode_tokens_per_s"), median(ind, "decode_tokens_per_s")
    checks.append(
        (
            "Must: isocache.compile decode throughput within 10% of whole-model Inductor's",
            100 * (a / b - 1) if a and b else None,
            "{:+.1f}%",
            lambda pct: pct >= -10,
        )
    )
    a, b = median(iso, "ttft_warm_s"), median(eager, "ttft_warm_s")
    checks.append(
        (
            "isocache.compile warm time to first token within 1 s of eager's",
            a - b if a is not None and b is not None else None,
            "{:+.2f} s",
            lambda gap: gap <= 1.0,
        )
    )
    a, b = median(iso, "decode_tokens_per_s"), median(eager, "decode_tokens_per_s")
    checks.append(
        ("isocache.compile decodes faster than eager", a / b if a and b else None, "{:.2f}x eager's", lambda r: r > 1)
    )
    return [
        (label, "n/a", None) if value is None else (label, shown.format(value), met(value))
        for label, value, shown, met in checks
    ]


def markdown(rows: dict[str, Any], args: argparse.Namespace) -> str:
    m = machine()
    lines = [
        f"Measured on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, Python {m['python']}; "
        f"Llama {args.layers} layers, hidden {args.hidden}, prompt {args.prompt} tokens, {args.new} new tokens "
        f"(greedy); median of {args.repeats} run(s) (min-max), cold = fresh caches, warm = a second process.",
        "",
        "| method | TTFT cold (s) | TTFT warm (s) | TTFT warm from process start (s) | first generate warm (s) "
        "| prefill (ms) | decode (tokens/s) | tokens equal eager |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def fmt(s: dict[str, float] | None, digits: int = 2) -> str:
        return "n/a" if s is None else f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    for method, row in rows.items():
        lines.append(
            f"| {method} | {fmt(row['ttft_cold_s'])} | {fmt(row['ttft_warm_s'])} | "
            f"{fmt(row['ttft_warm_process_s'])} | {fmt(row['first_generate_warm_s'])} | "
            f"{fmt(row['prefill_ms'], 1)} | {fmt(row['decode_tokens_per_s'], 1)} | {row['tokens_equal']} |"
        )
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for label, measured, met in targets(rows):
        lines.append(f"| {label} | {measured} | {'n/a' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm process pairs per method")
    parser.add_argument("--steady", type=int, default=3, help="timed generations in each process")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS / "generate")
    args = parser.parse_args()
    print("generate: time to first token, decode speed", flush=True)
    rows = bench(args)
    write_json("generate", {"rows": rows}, args.out)
    summary = markdown(rows, args)
    (args.out / "summary.md").write_text(relative_paths(summary))
    print(summary)
    return 0 if all(row["tokens_equal"] for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
