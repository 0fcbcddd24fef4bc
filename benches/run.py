"""Every benchmark, each configuration in a fresh process with fresh caches.

    python benches/run.py            # full: 4, 8, 16, 32 layers, 3 runs each
    python benches/run.py --quick    # under 10 minutes on 2 cores

Writes JSON and matplotlib plots to benches/results/ (or --out), prints a
summary table and writes it as summary.md, with the targets met or missed.
Figures are medians of --repeats runs, with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine, relative_paths, write_json

ALL_METHODS = (
    "eager",
    "dynamo",
    "inductor",
    "regional",
    "aot_compile",
    "isocache",
    "isocache_marked",
    "isocache_backend_warm",
    "isocache_compile",
)


def fresh_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ISOCACHE_DIR": str(tmp / "isocache"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
            "TRITON_CACHE_DIR": str(tmp / "triton"),
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.pop("ISOCACHE_REDIS_URL", None)
    return env


def run_json(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def startup(method: str, layers: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "_startup.py"),
        "--method",
        method,
        "--layers",
        str(layers),
        "--hidden",
        str(args.hidden),
        "--seq",
        str(args.seq),
        "--steady",
        str(args.steady),
    ]
    if getattr(args, "no_kv_cache", False):
        cmd.append("--no-kv-cache")
    cmd += ["--family", getattr(args, "family", "llama")]
    return run_json(cmd, env)


def stats_of(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_startup(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for layers in args.layers:
        for method in args.methods:
            cold, warm, warm_process, steady, errors, compiled, traced = [], [], [], [], [], [], []
            steady_cold: list[float] = []
            steady_warm: list[float] = []
            parts: dict[str, list[float]] = {}
            for r in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="isocache-bench-") as tmp:
                    env = fresh_env(Path(tmp))
                    c = startup(method, layers, args, env)
                    w = startup(method, layers, args, env)
                cold.append(c["compile_to_first_output_s"])
                warm.append(w["compile_to_first_output_s"])
                warm_process.append(w["first_output_s"])
                for key, value in w.get("isocache", {}).items():
                    if key.startswith("warm_") and value:
                        parts.setdefault(key.removeprefix("warm_").removesuffix("_seconds"), []).append(value)
                steady += [c["steady_ms"], w["steady_ms"]]
                steady_cold.append(c["steady_ms"])
                steady_warm.append(w["steady_ms"])
                errors += [c["max_abs_err"], w["max_abs_err"]]
                if "isocache" in c:
                    compiled.append((c["isocache"]["compiled"], w["isocache"]["compiled"], w["isocache"]["loaded"]))
                    traced.append(c["isocache"]["trace_seconds"])
                print(
                    f"  {method:<10} {layers:>3} layers run {r + 1}/{args.repeats}: "
                    f"cold {cold[-1]:7.2f} s  warm {warm[-1]:6.2f} s  steady {c['steady_ms']:7.2f} ms",
                    flush=True,
                )
            rows[f"{method}/{layers}"] = {
                "method": method,
                "layers": layers,
                "cold_s": stats_of(cold),
                "warm_s": stats_of(warm),
                # From process start (imports and model construction included) to the first output.
                "warm_process_s": stats_of(warm_process),
                # isocache.compile's warm start by part (read, verify, pieces, guards, first_call).
                "warm_parts_s": {part: stats_of(values) for part, values in parts.items()},
                "steady_ms": stats_of(steady),
                # Right after the first call of a cold start, and of a warm start.
                "steady_after_cold_ms": stats_of(steady_cold),
                "steady_after_warm_ms": stats_of(steady_warm),
                "max_abs_err": max(errors),
                "isocache_compiled_cold_warm_loaded": compiled,
            }
            if traced:
                rows[f"{method}/{layers}"]["cold_trace_s"] = stats_of(traced)
    return rows


class MemorySampler:
    """Samples, every `interval` seconds, the memory of every process under this one (the processes
    measured and the compile workers they start): the peak of the summed PSS (shared pages counted once,
    split between their users) and of the summed RSS, and the most Python processes alive at once."""

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pss = rss = count = 0
            for pid in _descendants(os.getpid()):
                fields = _smaps_rollup(pid)
                if fields:
                    pss += fields.get("Pss", 0)
                    rss += fields.get("Rss", 0)
                    count += 1
            self.peak_pss = max(self.peak_pss, pss * 1024)
            self.peak_rss = max(self.peak_rss, rss * 1024)
            self.peak_processes = max(self.peak_processes, count)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _smaps_rollup(pid: int) -> dict[str, int]:
    """kB by field, for a Python process (others, such as a C compiler Inductor runs, are left out)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"python" not in f.read().split(b"\0", 1)[0]:
                return {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0])
    return out


def bench_processes(args: argparse.Namespace) -> dict[str, Any]:
    """P processes start together on one empty store (the same model): wall time, compile work, the
    compile workers they started, and peak memory of all of them together."""
    out: dict[str, Any] = {}
    for count in args.processes:
        with tempfile.TemporaryDirectory(prefix="isocache-bench-") as tmp:
            env = fresh_env(Path(tmp))
            go = Path(tmp) / "go"
            env["BENCH_GO"] = str(go)
            cmd = [
                sys.executable,
                str(HERE / "_startup.py"),
                "--method",
                "isocache",
                "--family",
                args.process_family,
                "--layers",
                str(args.process_layers),
                "--hidden",
                str(args.hidden),
                "--seq",
                str(args.seq),
                "--steady",
                "0",
            ]
            with MemorySampler() as memory:
                procs = [
                    subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE.parent
                    )
                    for _ in range(count)
                ]
                while not all(Path(tmp, f"ready-{p.pid}").exists() or p.poll() is not None for p in procs):
                    time.sleep(0.05)  # every process imported torch and built its model
                start = time.perf_counter()
                go.touch()
                results = []
                for p in procs:
                    stdout, stderr = p.communicate(timeout=1800)
                    if p.returncode != 0:
                        raise RuntimeError(stderr[-3000:])
                    results.append(json.loads(stdout.strip().splitlines()[-1]))
                wall = time.perf_counter() - start
        compile_seconds = sum(r["isocache"]["compile_seconds"] for r in results)
        out[str(count)] = {
            "processes": count,
            "family": args.process_family,
            "layers": args.process_layers,
            "wall_s": wall,
            "compile_seconds": compile_seconds,
            "compiled": sum(r["isocache"]["compiled"] for r in results),
            "loaded": sum(r["isocache"]["loaded"] for r in results),
            "workers_started": sum(r["isocache"].get("workers_started", 0) for r in results),
            "peak_pss_bytes": memory.peak_pss,
            "peak_rss_bytes": memory.peak_rss,
            "peak_python_processes": memory.peak_processes,
        }
        print(
            f"  {count} processes: wall {wall:.1f} s, compile seconds {compile_seconds:.1f}, "
            f"workers {out[str(count)]['workers_started']}, peak {memory.peak_processes} Python processes, "
            f"PSS {memory.peak_pss / 2**30:.2f} GiB (RSS {memory.peak_rss / 2**30:.2f} GiB)",
            flush=True,
        )
    return out


def median_of(rows: dict[str, Any], method: str, layers: int, key: str) -> float | None:
    row = rows.get(f"{method}/{layers}")
    return None if row is None else float(row[key]["median"])


def evaluate(rows: dict[str, Any], procs: dict[str, Any], layers: list[int]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, each with the measured figure and whether it is met."""
    lo, hi = min(layers), max(layers)
    out: list[tuple[str, str, bool | None]] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    iso_lo, iso_hi = median_of(rows, "isocache", lo, "cold_s"), median_of(rows, "isocache", hi, "cold_s")
    r = ratio(iso_hi, iso_lo)
    out.append(
        (
            f"isocache cold T({hi}) <= 1.5 x T({lo})",
            "n/a" if r is None else f"{r:.2f}x",
            None if r is None else r <= 1.5,
        )
    )
    r = ratio(median_of(rows, "inductor", hi, "cold_s"), iso_hi)
    out.append(
        (
            f"isocache cold at {hi} layers >= 2x faster than whole-model Inductor",
            "n/a" if r is None else f"{r:.2f}x",
            None if r is None else r >= 2,
        )
    )
    r = ratio(median_of(rows, "regional", hi, "cold_s"), iso_hi)
    out.append(
        (
            f"isocache cold at {hi} layers faster than regional",
            "n/a" if r is None else f"{r:.2f}x",
            None if r is None else r > 1,
        )
    )
    iso_warm = median_of(rows, "isocache", hi, "warm_s")
    r = ratio(median_of(rows, "inductor", hi, "warm_s"), iso_warm)
    trace = median_of(rows, "dynamo", hi, "warm_s")
    share = ratio(trace, iso_warm)
    out.append(
        (
            f"isocache warm at {hi} layers >= 1.5x faster than whole-model Inductor warm",
            ("n/a" if r is None else f"{r:.2f}x")
            + ("" if share is None else f" (Dynamo tracing is {100 * share:.0f}% of it)"),
            None if r is None else r >= 1.5,
        )
    )
    r = ratio(median_of(rows, "isocache", hi, "steady_ms"), median_of(rows, "inductor", hi, "steady_ms"))
    out.append(
        (
            f"steady-state forward within 10% of whole-model Inductor ({hi} layers)",
            "n/a" if r is None else f"{(r - 1) * 100:+.1f}%",
            None if r is None else r <= 1.10,
        )
    )
    pre_warm = median_of(rows, "isocache_compile", hi, "warm_s")
    if pre_warm is not None:
        out.append((f"isocache.compile warm at {hi} layers <= 1.5 s", f"{pre_warm:.2f} s", pre_warm <= 1.5))
        for peer, factor, label in (
            ("inductor", 5.0, "whole-model Inductor warm"),
            ("regional", 3.0, "regional compilation warm"),
            ("aot_compile", 2.0, "torch's aot_compile warm"),
        ):
            r = ratio(median_of(rows, peer, hi, "warm_s"), pre_warm)
            out.append(
                (
                    f"isocache.compile warm >= {factor:g}x faster than {label}",
                    "n/a" if r is None else f"{r:.2f}x",
                    None if r is None else r >= factor,
                )
            )
        r = ratio(median_of(rows, "isocache_compile", hi, "cold_s"), iso_hi)
        out.append(
            (
                "isocache.compile cold no slower than the plain isocache backend",
                "n/a" if r is None else f"{r:.2f}x its time",
                None if r is None else r <= 1.05,
            )
        )
    out += cold_start_targets(rows, layers)
    out += warm_start_targets(rows, layers)
    out += third_round_targets(rows)
    one, most = procs.get("1"), procs.get(str(max((int(k) for k in procs), default=1)))
    if one and most and most is not one:
        r = ratio(most["compile_seconds"], one["compile_seconds"])
        out.append(
            (
                f"P={most['processes']} processes spend <= 1.2x the compile seconds of one",
                "n/a" if r is None else f"{r:.2f}x",
                None if r is None else r <= 1.2,
            )
        )
    return out


def third_round_targets(rows: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The third performance round's Musts: the backend starts warm, isocache.compile pulls away
    (cold >= 1.5x regional, warm >= 2x aot_compile), steady state within 5% of whole-model Inductor."""
    out: list[tuple[str, str, bool | None]] = []

    def value(method: str, n: int, key: str) -> float | None:
        return median_of(rows, method, n, key)

    def faster(label: str, slow: float | None, fast: float | None, factor: float) -> None:
        if slow is not None and fast:
            out.append((label, f"{slow / fast:.2f}x", slow >= factor * fast))

    for n in (32, 64):
        faster(
            f"backend='isocache' (ISOCACHE_BACKEND_WARM=1) warm >= 2.5x faster than Inductor warm ({n} layers)",
            value("inductor", n, "warm_s"),
            value("isocache_backend_warm", n, "warm_s"),
            2.5,
        )
        faster(
            f"isocache.compile cold >= 1.5x faster than regional ({n} layers)",
            value("regional", n, "cold_s"),
            value("isocache_compile", n, "cold_s"),
            1.5,
        )
        faster(
            f"isocache.compile warm >= 2x faster than aot_compile ({n} layers)",
            value("aot_compile", n, "warm_s"),
            value("isocache_compile", n, "warm_s"),
            2.0,
        )
        base = value("inductor", n, "steady_ms")
        for method in ("isocache", "isocache_backend_warm", "isocache_compile"):
            for key, when in (("steady_after_cold_ms", "after cold"), ("steady_after_warm_ms", "after warm")):
                mine = value(method, n, key) if f"{method}/{n}" in rows and key in rows[f"{method}/{n}"] else None
                if mine is not None and base:
                    out.append(
                        (
                            f"{method} steady forward {when} within 5% of Inductor ({n} layers)",
                            f"{(mine / base - 1) * 100:+.1f}%",
                            mine <= 1.05 * base,
                        )
                    )
    b32, b64 = value("isocache_backend_warm", 32, "warm_s"), value("isocache_backend_warm", 64, "warm_s")
    if b32 and b64:
        out.append(("backend warm flat in depth: T(64) <= 1.2 x T(32)", f"{b64 / b32:.2f}x", b64 <= 1.2 * b32))
    return out


def warm_start_targets(rows: dict[str, Any], layers: list[int]) -> list[tuple[str, str, bool | None]]:
    """The warm-start issue's Must (isocache.compile warm >= 1.3x faster than torch's aot_compile at 32
    and 64 layers) and targets."""
    out: list[tuple[str, str, bool | None]] = []

    def warm(method: str, n: int) -> float | None:
        return median_of(rows, method, n, "warm_s")

    def faster(label: str, slow: float | None, fast: float | None, factor: float) -> None:
        if slow is not None and fast is not None:
            out.append((label, f"{slow / fast:.2f}x", slow >= factor * fast))

    hi, lo = max(layers), min(layers)
    for n in (32, 64):
        faster(
            f"Must: isocache.compile warm >= 1.3x faster than aot_compile ({n} layers)",
            warm("aot_compile", n),
            warm("isocache_compile", n),
            1.3,
        )
    at32 = warm("isocache_compile", 32)
    if at32 is not None:
        out.append(("isocache.compile warm <= 1.0 s at 32 layers", f"{at32:.2f} s", at32 <= 1.0))
    faster(
        f"isocache.compile warm >= 3x faster than regional ({hi} layers)",
        warm("regional", hi),
        warm("isocache_compile", hi),
        3.0,
    )
    first, last = warm("isocache_compile", lo), warm("isocache_compile", hi)
    if first is not None and last is not None and hi != lo:
        out.append((f"isocache.compile warm T({hi}) <= 1.1 x T({lo})", f"{last / first:.2f}x", last <= 1.1 * first))
    faster(
        f"mark_blocks + backend='isocache' warm >= 1.5x faster than whole-model Inductor ({hi} layers)",
        warm("inductor", hi),
        warm("isocache_marked", hi),
        1.5,
    )
    return out


def cold_start_targets(rows: dict[str, Any], layers: list[int]) -> list[tuple[str, str, bool | None]]:
    """The cold-start issue's Must (isocache.compile faster than regional at 32 and 64 layers) and targets."""
    out: list[tuple[str, str, bool | None]] = []
    lo, hi = min(layers), max(layers)

    def cold(method: str, n: int) -> float | None:
        return median_of(rows, method, n, "cold_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    for n in [n for n in (32, 64) if n in layers]:
        r = ratio(cold("regional", n), cold("isocache_compile", n))
        out.append(
            (
                f"Must: isocache.compile cold at {n} layers faster than regional compilation",
                "n/a" if r is None else f"{r:.2f}x",
                None if r is None else r > 1,
            )
        )
    r = ratio(cold("regional", hi), cold("isocache_compile", hi))
    out.append(
        (
            f"isocache.compile cold >= 1.3x faster than regional ({hi} layers)",
            "n/a" if r is None else f"{r:.2f}x",
            None if r is None else r >= 1.3,
        )
    )
    r = ratio(cold("inductor", hi), cold("isocache_compile", hi))
    out.append(
        (
            f"isocache.compile cold >= 2.5x faster than whole-model Inductor ({hi} layers)",
            "n/a" if r is None else f"{r:.2f}x",
            None if r is None else r >= 2.5,
        )
    )
    r = ratio(cold("isocache_compile", hi), cold("isocache_compile", lo))
    out.append(
        (
            f"isocache.compile cold T({hi}) / T({lo}) <= 1.2",
            "n/a" if r is None else f"{r:.2f}",
            None if r is None else r <= 1.2,
        )
    )
    row = rows.get(f"isocache_compile/{hi}")
    share = ratio(row["cold_trace_s"]["median"], row["cold_s"]["median"]) if row and "cold_trace_s" in row else None
    out.append(
        (
            f"Dynamo's share of isocache.compile's cold start <= 25% ({hi} layers)",
            "n/a" if share is None else f"{100 * share:.0f}% ({row['cold_trace_s']['median']:.1f} s)" if row else "n/a",
            None if share is None else share <= 0.25,
        )
    )
    r = ratio(median_of(rows, "isocache_compile", hi, "steady_ms"), median_of(rows, "inductor", hi, "steady_ms"))
    out.append(
        (
            f"isocache.compile steady-state forward within 5% of whole-model Inductor ({hi} layers)",
            "n/a" if r is None else f"{(r - 1) * 100:+.1f}%",
            None if r is None else r <= 1.05,
        )
    )
    return out


def markdown(
    rows: dict[str, Any], procs: dict[str, Any], targets: list[tuple[str, str, bool | None]], extra: dict[str, Any]
) -> str:
    m = machine()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"Python {m['python']}; Llama hidden {extra['hidden']}, {extra['seq']} tokens"
        f"{', use_cache=False' if extra.get('no_kv_cache') else ''}, CPU Inductor; "
        f"median of {extra['repeats']} runs (min–max), each in a fresh process with fresh caches.",
        "",
        "| method | layers | cold start (s) | warm start (s) | warm, from process start (s) | steady forward (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows.values():

        def fmt(s: dict[str, float], digits: int) -> str:
            return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"

        lines.append(
            f"| {row['method']} | {row['layers']} | {fmt(row['cold_s'], 2)} | {fmt(row['warm_s'], 2)} | "
            f"{fmt(row['warm_process_s'], 2) if 'warm_process_s' in row else 'n/a'} | {fmt(row['steady_ms'], 2)} |"
        )
    if procs:
        shown = next(iter(procs.values()))
        lines += [
            "",
            f"Processes starting together on one empty store: {shown.get('family', 'llama')}, "
            f'{shown.get("layers", "?")} layers, `backend="isocache"`; memory summed over every Python process '
            "(compile workers included), sampled every 0.25 s.",
            "",
            "| processes together | wall (s) | compile seconds, all processes | compiled | loaded "
            "| compile workers started | peak Python processes | peak memory, PSS (RSS) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in procs.values():
            memory = (
                f"{p['peak_pss_bytes'] / 2**30:.1f} GiB ({p['peak_rss_bytes'] / 2**30:.1f} GiB)"
                if "peak_pss_bytes" in p
                else "n/a"
            )
            lines.append(
                f"| {p['processes']} | {p['wall_s']:.1f} | {p['compile_seconds']:.1f} | {p['compiled']} | {p['loaded']} "
                f"| {p.get('workers_started', 'n/a')} | {p.get('peak_python_processes', 'n/a')} | {memory} |"
            )
    for name in ("digest", "reuse"):
        if name in extra:
            lines += ["", extra[name]]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for name, figure, ok in targets:
        lines.append(f"| {name} | {figure} | {'n/a' if ok is None else ('yes' if ok else '**no**')} |")
    return "\n".join(lines) + "\n"


def plots(rows: dict[str, Any], procs: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = sorted({r["method"] for r in rows.values()}, key=ALL_METHODS.index)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title, unit in (
        (axes[0], "cold_s", "cold start (empty caches)", "s"),
        (axes[1], "warm_s", "warm start (new process after a cold run)", "s"),
        (axes[2], "steady_ms", "steady-state forward", "ms"),
    ):
        for method in methods:
            pts = sorted((r["layers"], r[key]) for r in rows.values() if r["method"] == method)
            xs = [p[0] for p in pts]
            med = [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=method)
        ax.set_title(title)
        ax.set_xlabel("decoder layers")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Llama from config, time to first output and forward time (CPU)")
    fig.tight_layout()
    path = out / "startup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if procs:
        fig, ax = plt.subplots(figsize=(6, 4))
        counts = [p["processes"] for p in procs.values()]
        ax.bar([str(c) for c in counts], [p["compile_seconds"] for p in procs.values()], label="compile seconds (sum)")
        ax.plot([str(c) for c in counts], [p["wall_s"] for p in procs.values()], "ko-", label="wall time")
        ax.set_xlabel("processes starting together on an empty store")
        ax.set_ylabel("s")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = out / "processes.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 and 8 layers, one run each, 1-2 processes")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steady", type=int, default=20)
    parser.add_argument("--processes", type=int, nargs="*", default=None)
    parser.add_argument("--process-layers", type=int, default=4)
    parser.add_argument("--family", choices=["llama", "qwen2"], default="llama", help="the startup rows' model")
    parser.add_argument("--process-family", choices=["llama", "qwen2"], default="qwen2")
    parser.add_argument("--skip", nargs="*", default=[], choices=["digest", "reuse", "startup", "processes"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="every method runs the model with use_cache=False (no KV cache object in the layers' calls)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild summary.md and plots from the JSON in --out"
    )
    args = parser.parse_args()
    if args.report_only:
        return report_only(args.out)
    args.layers = args.layers or ([4, 8] if args.quick else [4, 8, 16, 32, 64])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.processes = args.processes if args.processes is not None else ([1, 4] if args.quick else [1, 4, 8, 16])
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    extra: dict[str, Any] = {
        "hidden": args.hidden,
        "seq": args.seq,
        "repeats": args.repeats,
        "no_kv_cache": args.no_kv_cache,
    }

    if "digest" not in args.skip:
        print("digest throughput", flush=True)
        d = run_json_or_text(
            [
                sys.executable,
                str(HERE / "bench_digest.py"),
                "--layers",
                str(max(args.layers)),
                "--hidden",
                str(args.hidden),
                "--repeat",
                "5" if args.quick else "20",
                "--inductor-repeat",
                "1" if args.quick else "3",
                "--out",
                str(args.out),
            ]
        )
        print(d)
    if "reuse" not in args.skip:
        print("reuse latency", flush=True)
        print(
            run_json_or_text(
                [
                    sys.executable,
                    str(HERE / "bench_reuse.py"),
                    "--layers",
                    str(max(3, min(max(args.layers), 8))),
                    "--hidden",
                    str(args.hidden),
                    "--repeat",
                    "3" if args.quick else "7",
                    "--out",
                    str(args.out),
                ]
            )
        )
    rows: dict[str, Any] = {}
    if "startup" not in args.skip:
        print("cold and warm start, steady state", flush=True)
        rows = bench_startup(args)
    procs: dict[str, Any] = {}
    if "processes" not in args.skip and args.processes:
        print(f"processes starting together ({args.process_layers} layers)", flush=True)
        procs = bench_processes(args)
    _extra_from_json(args.out, extra)
    targets = evaluate(rows, procs, args.layers) if rows else []
    summary = markdown(rows, procs, targets, extra)
    write_json(
        "startup",
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "processes": procs, "targets": targets},
        out=args.out,
    )
    (args.out / "summary.md").write_text(summary)
    written = plots(rows, procs, args.out) if rows else []
    print()
    print(summary)
    print(
        f"wrote {args.out}/startup.json, summary.md, {', '.join(p.name for p in written)} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


def _extra_from_json(out: Path, extra: dict[str, Any]) -> None:
    """The digest and reuse sentences of the summary, from their JSON files."""
    digest, reuse = out / "digest.json", out / "reuse.json"
    if digest.exists():
        data = json.loads(digest.read_text())
        r = data["results"]
        extra["digest"] = (
            f"Digest of the {data['pieces']} pieces of a {data['layers']}-layer Llama: isocache "
            f"{r['isocache']['median'] * 1e6:.1f} µs/piece ({r['isocache']['nodes_per_second'] / 1e6:.2f} M nodes/s), "
            f"reference encoder {r['reference']['median'] * 1e6:.0f} µs ({data['ratios']['vs_reference']:.1f}x slower), "
            f"Inductor's FX graph key {r['inductor_key']['median'] * 1e3:.1f} ms ({data['ratios']['vs_inductor_key']:.0f}x slower)."
        )
    if reuse.exists():
        data = json.loads(reuse.read_text())
        r = data["results"]
        extra["reuse"] = (
            f"Serving an already compiled isometric piece ({data['nodes']} nodes): isocache REUSE "
            f"{r['isocache_reuse']['median'] * 1e6:.0f} µs, a warm Inductor FX-graph-cache hit "
            f"{r['inductor_fx_cache_hit']['median'] * 1e3:.1f} ms ({data['ratio']:.0f}x)."
        )


def report_only(out: Path) -> int:
    state = json.loads((out / "startup.json").read_text())
    rows, procs = state["rows"], state["processes"]
    args = state["args"]
    layers = sorted({int(r["layers"]) for r in rows.values()})
    extra: dict[str, Any] = {
        "hidden": args["hidden"],
        "seq": args["seq"],
        "repeats": args["repeats"],
        "no_kv_cache": args.get("no_kv_cache") == "True",
    }
    _extra_from_json(out, extra)
    targets = evaluate(rows, procs, layers)
    state["targets"] = targets
    (out / "startup.json").write_text(relative_paths(json.dumps(state, indent=2)) + "\n")
    summary = markdown(rows, procs, targets, extra)
    (out / "summary.md").write_text(summary)
    plots(rows, procs, out)
    print(summary)
    return 0


def run_json_or_text(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return "\n".join(line for line in proc.stdout.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
