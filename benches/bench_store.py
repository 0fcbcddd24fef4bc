"""What the size cap costs a publish, in a store holding 0 and 10,000 artifacts.

    python benches/bench_store.py                      # this build: before and after
    python benches/bench_store.py --core OLD/_core.so  # the "scan" method on another build

Publishing a piece is `put` plus the size cap. Methods:

- ``put alone``: no cap at all (the floor: a write, two fsyncs, a rename).
- ``put + scan (before)``: what the backend did before the store kept a running
  size: ``put``, then the bytes of every namespace by listing every artifact
  and reading its header (``_maintenance.total_bytes`` as it was), then
  ``gc_root`` when over the cap. Against an older build (``--core``) it calls
  that build's own ``Store.total_bytes``.
- ``put + total_bytes()``: ``put``, then ``_maintenance.total_bytes(root)``
  as it is now (the root's running size, O(1)); what the backend does unchanged.
- ``put(max_bytes=) (after)``: ``Store.put(..., max_bytes=cap)``: the cap is
  checked and enforced inside the put, under the size lock.

The store is filled by writing artifact images straight into its layout (no
fsync per file), so filling 10,000 takes seconds. Payloads are 2 KB; the cap
is far above the store's size, so no publish evicts (``--at-cap`` adds rows
for a store kept at its cap, where every publish must evict). Figures are
medians (and means) of ``--publishes`` publishes, each of a new digest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
NAMESPACES = ("cpu-bench0", "cpu-bench1")


def load_core(path: str | None) -> ModuleType:
    if path is None:
        from isocache import _core

        return _core
    spec = importlib.util.spec_from_file_location("_core", path)
    assert spec is not None and spec.loader is not None
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    return core


def digest(i: int, salt: str) -> str:
    return hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=32).hexdigest()


def fill(core: ModuleType, root: Path, count: int, payload: bytes) -> None:
    """`count` artifacts over two namespaces, written directly (mode 0600, dirs 0700)."""
    for ns in NAMESPACES:
        core.Store(root, ns)  # creates the layout, checked
    for i in range(count):
        d = digest(i, "fill")
        shard = root / "v1" / NAMESPACES[i % 2] / "objects" / d[:2]
        if not shard.is_dir():
            shard.mkdir(mode=0o700)
        path = shard / d
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(core.pack_artifact(d, payload, 1.0))
        # Older artifacts first, as a real store's history would be.
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))


def scan_bytes(core: ModuleType, root: Path) -> int:
    """The bytes of every namespace, by walking them (the old `total_bytes`)."""
    total = 0
    for ns in core.list_namespaces(root):
        store = core.Store(root, ns, None, create=False)
        if hasattr(core, "root_size"):
            # This build's Store.total_bytes reads no header; the old one did.
            total += sum(o.size for o in store.objects()) + sum(q.size for q in store.quarantine())
        else:
            total += store.total_bytes()
    return total


def old_gc_root(core: ModuleType, root: Path, cap: int) -> None:
    if hasattr(core, "gc_root"):
        core.gc_root(root, cap)
        return
    # The older build's Python eviction, as `_maintenance.gc_root` had it.
    stores = [core.Store(root, ns) for ns in core.list_namespaces(root)]
    entries = []
    for s in stores:
        for name, size, at in s.quarantine():
            entries.append(((0, at), size, name, True, s))
        for d, size, used, _ in s.list():
            entries.append(((1, used), size, d, False, s))
    total = sum(e[1] for e in entries)
    for _, size, name, quarantined, s in sorted(entries, key=lambda e: e[0]):
        if total <= cap:
            break
        if s.remove_quarantined(name) if quarantined else s.remove(name):
            total -= size


def methods(core: ModuleType) -> dict[str, Callable[[Any, Path, str, bytes, int], None]]:
    def put_alone(store: Any, root: Path, d: str, data: bytes, cap: int) -> None:
        store.put(d, data, 1.0)

    def put_scan(store: Any, root: Path, d: str, data: bytes, cap: int) -> None:
        store.put(d, data, 1.0)
        if scan_bytes(core, root) > cap:
            old_gc_root(core, root, cap)

    def put_total_bytes(store: Any, root: Path, d: str, data: bytes, cap: int) -> None:
        store.put(d, data, 1.0)
        if core.root_size(root).bytes > cap:
            core.gc_root(root, cap)

    def put_capped(store: Any, root: Path, d: str, data: bytes, cap: int) -> None:
        store.put(d, data, 1.0, max_bytes=cap)

    out: dict[str, Callable[[Any, Path, str, bytes, int], None]] = {
        "put alone": put_alone,
        "put + scan (before)": put_scan,
    }
    if hasattr(core, "root_size"):
        out["put + total_bytes()"] = put_total_bytes
        out["put(max_bytes=) (after)"] = put_capped
    return out


def measure(
    core: ModuleType,
    method: Callable[[Any, Path, str, bytes, int], None],
    artifacts: int,
    publishes: int,
    payload: bytes,
    at_cap: bool,
    workdir: Path,
) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=workdir)) / "cache"
    try:
        fill(core, root, artifacts, payload)
        store = core.Store(root, NAMESPACES[0])
        # One publish outside the timing: builds the running size (a scan)
        # where the build keeps one, and warms the page cache.
        method(store, root, digest(0, "warm"), payload, 1 << 62)
        cap = scan_bytes(core, root) if at_cap else 1 << 62
        times = []
        for i in range(publishes):
            d = digest(i, "publish")
            start = time.perf_counter()
            method(store, root, d, payload, cap)
            times.append(time.perf_counter() - start)
        return {
            "median_ms": statistics.median(times) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3,
            "max_ms": max(times) * 1e3,
        }
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=int, nargs="+", default=[0, 10_000])
    parser.add_argument("--publishes", type=int, default=200)
    parser.add_argument("--payload-bytes", type=int, default=2048)
    parser.add_argument("--core", default=None, help="path of another build's _core shared library")
    parser.add_argument("--at-cap", action="store_true", help="also measure a store kept at its cap")
    parser.add_argument("--dir", default=None, help="where to make the stores (default: the temp directory)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    core = load_core(args.core)
    payload = os.urandom(args.payload_bytes)
    workdir = Path(args.dir or tempfile.gettempdir())
    rows = []
    for at_cap in (False, True) if args.at_cap else (False,):
        for n in args.artifacts:
            for name, method in methods(core).items():
                if at_cap and name == "put alone":
                    continue
                r = measure(core, method, n, args.publishes, payload, at_cap, workdir)
                rows.append({"artifacts": n, "at_cap": at_cap, "method": name, **r})
                print(f"  {n:>6} {'at cap ' if at_cap else ''}{name}: {r['median_ms']:.3f} ms", file=sys.stderr)

    if args.json:
        print(json.dumps({"core": args.core or "this build", "rows": rows}, indent=2))
        return 0
    floor = {(r["artifacts"], r["at_cap"]): r["median_ms"] for r in rows if r["method"] == "put alone"}
    print(
        f"publish = put + size cap; {args.payload_bytes} B payloads, {args.publishes} publishes each; "
        f"ms per publish ({args.core or 'this build'})"
    )
    header = f"{'artifacts':>12}  {'method':<28}{'median':>9}{'mean':>9}{'max':>9}{'cap cost':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = floor.get((r["artifacts"], False))
        extra = "" if base is None or r["method"] == "put alone" else f"{r['median_ms'] - base:+.3f}"
        label = f"{r['artifacts']}{' at cap' if r['at_cap'] else ''}"
        print(f"{label:>12}  {r['method']:<28}{r['median_ms']:>9.3f}{r['mean_ms']:>9.3f}{r['max_ms']:>9.3f}{extra:>10}")
    print("cap cost: median minus the median of `put alone` in a store of the same size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
