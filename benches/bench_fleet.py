"""Fleet starts: pack, a warm start from a read-only base store against one from a local store, and
many readers started together on one base store.

    python benches/bench_fleet.py                          # 32 layers, 16 readers, 3 repeats
    python benches/bench_fleet.py --layers 2 --readers 4   # quick

1. **build**: one process compiles a Llama (``--layers``, hidden ``--hidden``, random weights) with
   ``isocache.compile`` and with ``torch.compile(backend=isocache.Backend())`` into a store.
2. **pack**: ``python -m isocache pack`` of that store, timed in this process (no interpreter start),
   best of five; the archive's blobs are counted against the distinct pieces it holds. Then
   ``unpack`` into a base store, made read-only.
3. **base vs local**: fresh processes, alternating, each with a new ``HOME`` and Inductor cache:
   ``local`` has a copy of the built store as ``ISOCACHE_DIR``; ``base`` has an empty
   ``ISOCACHE_DIR`` and the base store as ``ISOCACHE_BASE``. Each runs ``isocache.compile(model)``
   (its warm start: the parts isocache reports, read .. first call) and then, as a new process would
   (memory cleared), ``torch.compile(model, backend=isocache.Backend())``, whose pieces load from the
   store (``load_seconds``: what copying base artifacts into the local store could speed up).
4. **readers**: ``--readers`` processes started together, each with an empty local store, a new
   ``HOME`` and the base store: how many pieces each compiled (0 expected), its largest difference
   from eager, and its warm start.

Figures go to ``--out`` (``fleet.json``, ``summary.md``). On a shared 2-core machine timings are rough.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import support

PRELUDE = """
import json, os, sys, time, torch
sys.path.insert(0, {benches!r})
from _common import llama, tokens
import isocache
from support import reset_process_state
model, ids = llama({layers}, {hidden}), tokens({seq})
"""

BUILD = (
    PRELUDE
    + """
with torch.no_grad():
    isocache.compile(model)(ids)
    torch.compile(llama({layers}, {hidden}), backend=isocache.Backend())(ids)
print(json.dumps(isocache.stats()))
"""
)

READ = (
    PRELUDE
    + """
out = {{}}
with torch.no_grad():
    expected = model(ids).last_hidden_state
    start = time.perf_counter()
    actual = isocache.compile(model)(ids).last_hidden_state
    out["compile_wall"] = time.perf_counter() - start
    stats = isocache.stats()
    out["compile"] = stats
    out["warm"] = sum(v for k, v in stats.items() if k.startswith("warm_") and k.endswith("_seconds"))
    out["err"] = (actual - expected).abs().max().item()
    if {backend}:
        reset_process_state()
        start = time.perf_counter()
        actual = torch.compile(llama({layers}, {hidden}), backend=isocache.Backend())(ids).last_hidden_state
        out["backend_wall"] = time.perf_counter() - start
        out["backend"] = isocache.stats()
        out["err"] = max(out["err"], (actual - expected).abs().max().item())
print(json.dumps(out))
"""
)


def environment(home: Path, local: Path, base: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISOCACHE_", "TORCHINDUCTOR_", "XDG_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"),
        ISOCACHE_DIR=str(local),
        ISOCACHE_COMPILE_WORKERS="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")]),
    )
    if base is not None:
        env["ISOCACHE_BASE"] = str(base)
    return env


def start(code: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"a process failed:\n{err[-4000:]}")
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def pack(built: Path, archive: Path) -> dict[str, Any]:
    import tarfile

    from isocache.__main__ import main

    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        assert main(["pack", "--dir", str(built), "-o", str(archive), "--json"]) == 0
        seconds.append(time.perf_counter() - start)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    manifest = json.loads(_manifest_text(archive))
    pieces = {a["blake3"] for a in manifest["artifacts"] if a["kind"] == "piece"}
    blobs = set(manifest["blobs"])
    models = [a for a in manifest["artifacts"] if a["kind"] == "model"]
    return {
        "seconds_best": min(seconds),
        "seconds_median": statistics.median(seconds),
        "archive_bytes": archive.stat().st_size,
        "artifacts": len(manifest["artifacts"]),
        "pieces": len(pieces),
        "models": len(models),
        "blobs": len(blobs),
        "members": len(members),
        "each_piece_once": pieces <= blobs and len(members) == len(blobs) + 1,
        "store_bytes": sum(p.stat().st_size for p in built.rglob("*") if p.is_file() and "objects" in p.parts),
    }


def _manifest_text(archive: Path) -> bytes:
    import tarfile

    from isocache import _core
    from isocache._cli_pack import MANIFEST, MANIFEST_DIGEST

    with tarfile.open(archive) as tar:
        member = tar.extractfile(MANIFEST)
        assert member is not None
        text, _ = _core.unpack_artifact(MANIFEST_DIGEST, member.read(), None)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fleet")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="isocache-fleet-"))
    fmt = dict(benches=str(HERE), layers=args.layers, hidden=args.hidden, seq=args.seq)
    try:
        built, base = work / "ci" / "cache", work / "image" / "base"
        start_build = time.perf_counter()
        built_stats = result(start(BUILD.format(**fmt), environment(work / "ci", built, None), work / "ci"))
        build_seconds = time.perf_counter() - start_build
        packed = pack(built, work / "cache.tar")
        from isocache.__main__ import main as cli

        t = time.perf_counter()
        assert cli(["unpack", str(work / "cache.tar"), "--dir", str(base)]) == 0
        unpack_seconds = time.perf_counter() - t
        support.read_only(base)

        rows: dict[str, list[dict[str, Any]]] = {"local": [], "base": []}
        for i in range(args.repeats):
            for kind in ("local", "base"):
                home, local = work / f"{kind}{i}", work / f"{kind}{i}" / "cache"
                if kind == "local":
                    shutil.copytree(built, local)
                env = environment(home, local, base if kind == "base" else None)
                rows[kind].append(result(start(READ.format(**fmt, backend=True), env, home / "work")))

        procs = []
        for i in range(args.readers):
            home = work / f"reader{i}"
            env = environment(home, home / "cache", base)
            procs.append(start(READ.format(**fmt, backend=False), env, home / "work"))
        t = time.perf_counter()
        readers = [result(p) for p in procs]
        readers_wall = time.perf_counter() - t
    finally:
        for folder, _, _ in os.walk(work):
            os.chmod(folder, 0o755)
        shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    def med_load(kind: str) -> float:
        return statistics.median(r["backend"]["load_seconds"] for r in rows[kind])

    figures = {
        "layers": args.layers,
        "hidden": args.hidden,
        "build_seconds": build_seconds,
        "built": {k: built_stats[k] for k in ("compiled", "loaded", "reused")},
        "pack": packed,
        "unpack_seconds": unpack_seconds,
        "warm_start": {
            kind: {
                "warm_parts_seconds_median": med(kind, "warm"),
                "warm_parts_median": {
                    part: statistics.median(r["compile"][f"warm_{part}_seconds"] for r in rows[kind])
                    for part in ("read", "verify", "pieces", "guards", "first_call")
                },
                "compile_first_call_wall_median": med(kind, "compile_wall"),
                "backend_piece_load_seconds_median": med_load(kind),
                "backend_wall_median": med(kind, "backend_wall"),
                "compiled": sum(r["compile"]["compiled"] + r["backend"]["compiled"] for r in rows[kind]),
                "max_err": max(r["err"] for r in rows[kind]),
                "runs": len(rows[kind]),
            }
            for kind in rows
        },
        "readers": {
            "count": len(readers),
            "compiled_total": sum(r["compile"]["compiled"] for r in readers),
            "models_loaded": sum(r["compile"]["models_loaded"] for r in readers),
            "max_err": max(r["err"] for r in readers),
            "warm_parts_seconds_median": statistics.median(r["warm"] for r in readers),
            "warm_parts_seconds_max": max(r["warm"] for r in readers),
            "all_done_wall_seconds": readers_wall,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "summary.md").write_text(summary(figures) + "\n")
    print(summary(figures))


def summary(f: dict[str, Any]) -> str:
    w, p, r = f["warm_start"], f["pack"], f["readers"]
    ratio = w["base"]["warm_parts_seconds_median"] / max(w["local"]["warm_parts_seconds_median"], 1e-9)
    return textwrap.dedent(
        f"""\
        # Fleet starts ({f["layers"]} layers, hidden {f["hidden"]}; CPU, shared 2-core machine: rough)

        | what | local store | base store |
        | --- | --- | --- |
        | isocache.compile warm start, parts (median s) | {w["local"]["warm_parts_seconds_median"]:.3f} | {w["base"]["warm_parts_seconds_median"]:.3f} |
        | isocache.compile first call, wall (median s) | {w["local"]["compile_first_call_wall_median"]:.3f} | {w["base"]["compile_first_call_wall_median"]:.3f} |
        | backend: pieces loaded (median s) | {w["local"]["backend_piece_load_seconds_median"]:.3f} | {w["base"]["backend_piece_load_seconds_median"]:.3f} |
        | backend: first call, wall (median s) | {w["local"]["backend_wall_median"]:.3f} | {w["base"]["backend_wall_median"]:.3f} |
        | pieces compiled (all runs) | {w["local"]["compiled"]} | {w["base"]["compiled"]} |

        Warm start from the base store / from a local store: {ratio:.2f} (target: within 1.10).
        Its parts (median s), local: {_parts(w["local"])}; base: {_parts(w["base"])}.

        | target | measured | met |
        | --- | --- | --- |
        | warm start from a base within 10% of a local one | {ratio:.2f}x | {"yes" if ratio <= 1.10 else "no"} |
        | pack of the cache well under a second | {p["seconds_best"]:.3f} s best, {p["seconds_median"]:.3f} s median | {"yes" if p["seconds_median"] < 0.5 else "no"} |
        | archive holds each distinct piece once | {p["blobs"]} blobs for {p["pieces"]} pieces + {p["models"]} models | {"yes" if p["each_piece_once"] else "no"} |
        | {r["count"]} readers on one base compile nothing, outputs equal eager | {r["compiled_total"]} compiled, max err {r["max_err"]:.1e} | {"yes" if r["compiled_total"] == 0 and r["max_err"] < 1e-4 else "no"} |

        Archive: {p["archive_bytes"]} bytes ({p["artifacts"]} artifacts; the store's files: {p["store_bytes"]} bytes).
        Unpack: {f["unpack_seconds"]:.3f} s. Build: {f["build_seconds"]:.1f} s.
        Readers: {r["count"]} started together, all done in {r["all_done_wall_seconds"]:.1f} s; warm start parts
        median {r["warm_parts_seconds_median"]:.2f} s, max {r["warm_parts_seconds_max"]:.2f} s (CPU shared by all).
        """
    )


def _parts(row: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in row["warm_parts_median"].items())


if __name__ == "__main__":
    main()
