"""The local store as an attacker meets it (issue 11): each test is an attack that
worked against the store before it held its directories open and checked what it reads.

Payloads are harmless byte strings; every test asserts the planted bytes are
never returned. Ownership cases need root (CI runs as root): the other user is
uid 12345, made with os.chown or with a child process that calls setuid.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from isocache import _core
from isocache.tiers.local import read_payload
from support import cli, tree

D1 = "a" * 64
D2 = "0123456789abcdef" * 4
D3 = "b" * 64
OTHER = 12345
PLANTED = b"planted by someone else: never load this"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="acting as another user needs root")


def as_other_user(directory: Path, code: str) -> None:
    """Runs `code` as uid/gid 12345 with `d`, a descriptor of `directory` opened before dropping root.

    (pytest's temporary directories are private to root, so the other user
    works relative to that descriptor, as it would inside a directory it can reach.)
    """
    script = (
        "import os, sys\n"
        f"d = os.open({str(directory)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        f"os.setgroups([]); os.setgid({OTHER}); os.setuid({OTHER})\n"
        "assert os.geteuid() != 0\n" + textwrap.dedent(code)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def plant_tree(root: Path, images: dict[str, bytes], as_other: bool) -> None:
    """A store-shaped tree anyone can write, holding `images` (digest -> file image)."""
    root.mkdir()
    root.chmod(0o777)
    if as_other and IS_ROOT:
        files = {f"v1/ns/objects/{d[:2]}/{d}": image.hex() for d, image in images.items()}
        as_other_user(
            root,
            f"""
            for rel, image in {files!r}.items():
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    try:
                        os.mkdir("/".join(parts[:i]), 0o777, dir_fd=d)
                    except FileExistsError:
                        pass
                fd = os.open(rel, os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=d)
                os.write(fd, bytes.fromhex(image))
                os.close(fd)
            """,
        )
        return
    for d, image in images.items():
        shard = root / "v1" / "ns" / "objects" / d[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / d).write_bytes(image)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- the root is held open --------------------------------------------------------


@pytest.mark.parametrize("replacement", ["tree", "symlink"])
def test_root_replaced_after_open_never_serves_a_planted_payload(tmp_path: Path, replacement: str) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    store.put(D1, b"genuine", 1.0)
    os.rename(root, tmp_path / "moved-away")
    images = {d: _core.pack_artifact(d, PLANTED) for d in (D1, D2)}
    if replacement == "tree":
        plant_tree(root, images, as_other=True)
    else:
        plant_tree(tmp_path / "attacker", images, as_other=True)
        root.symlink_to(tmp_path / "attacker")
    found = store.get_checked(D1)
    assert (found.payload, found.compile_seconds) == (b"genuine", 1.0), "the open store keeps its own directory"
    assert read_payload(store, D2) is None
    assert D2 not in store
    store.put(D3, b"published after the swap")
    assert (tmp_path / "moved-away" / "v1" / "ns" / "objects" / "bb" / D3).exists()
    assert not any(p.name == D3 for p in root.rglob("*"))
    # Opening the replaced path is refused outright.
    with pytest.raises(_core.InsecureStoreError):
        _core.Store(root, "ns")


def test_trailing_slash_on_a_symlinked_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    for spelling in (str(link), str(link) + "/", str(link) + "/."):
        with pytest.raises(_core.InsecureStoreError, match="symbolic link"):
            _core.Store(spelling, "ns")
    with pytest.raises(_core.InsecureStoreError, match="symbolic link"):
        _core.list_namespaces(str(link) + "/")
    assert list(real.iterdir()) == [], "nothing was created through the link"


@needs_root
def test_a_root_whose_parent_another_user_owns_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    root = parent / "cache"
    root.mkdir(mode=0o700)
    os.chown(parent, OTHER, OTHER)
    # What the owner of the parent can do to a store opened there: swap it.
    as_other_user(parent, "os.rename('cache', 'gone', src_dir_fd=d, dst_dir_fd=d)")
    os.rename(parent / "gone", root)
    with pytest.raises(_core.InsecureStoreError, match=f"parent directory {parent} is owned by uid {OTHER}") as info:
        _core.Store(root, "ns")
    assert "ISOCACHE_DIR" in str(info.value)
    assert not (root / "v1").exists()


def test_a_root_under_a_world_writable_parent_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(_core.InsecureStoreError, match=r"writable by others .* not sticky") as info:
        _core.Store(shared / "cache", "ns")
    assert f"chmod go-w {shared}" in str(info.value)
    assert not (shared / "cache").exists(), "nothing is created under it"
    shared.chmod(0o1777)  # like /tmp: others cannot rename or remove what is ours
    store = _core.Store(shared / "cache", "ns")
    store.put(D1, b"ok")
    assert stat.S_IMODE((shared / "cache").stat().st_mode) == 0o700


@needs_root
def test_another_user_cannot_preplant_the_root_in_a_sticky_directory(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    as_other_user(
        sticky,
        """
        os.mkdir("cache", 0o700, dir_fd=d)
        os.symlink("cache", "link", dir_fd=d)
        """,
    )
    with pytest.raises(_core.InsecureStoreError, match=f"owned by uid {OTHER}"):
        _core.Store(sticky / "cache", "ns")
    with pytest.raises(_core.InsecureStoreError, match="symbolic link"):
        _core.Store(sticky / "link", "ns")


def test_missing_directories_are_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "cache"
    _core.Store(root, "ns")
    for p in (tmp_path / "a", tmp_path / "a" / "b", root):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


# -- what is read is checked -------------------------------------------------------


LOOKUP = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from isocache import _core
    from isocache.tiers.local import read_payload
    store = _core.Store(sys.argv[1], "ns")
    print(repr(read_payload(store, sys.argv[2])), flush=True)
    """
)


def test_a_fifo_at_an_artifact_path_is_a_miss_not_a_hang(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    fifo = Path(store.object_path(D1))
    fifo.parent.mkdir(mode=0o700)
    os.mkfifo(fifo, 0o600)
    try:
        proc = subprocess.run([sys.executable, "-c", LOOKUP, str(root), D1], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("lookup blocked on a FIFO")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"
    assert proc.stderr.count("ignoring bad artifact") == 1 and "FIFO" in proc.stderr
    assert not fifo.exists(), "moved to quarantine"
    store.put(D1, b"works again")
    assert store.get_checked(D1).payload == b"works again"


def test_a_directory_at_an_artifact_path_is_a_miss_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path / "cache", "ns")
    target = Path(store.object_path(D1))
    (target / "inside").mkdir(parents=True)
    (target / "inside" / "file").write_bytes(PLANTED)
    assert read_payload(store, D1) is None  # no StoreError
    (warning,) = warnings_of(caplog)
    assert "directory" in warning and D1 in warning
    assert store.quarantined == 1
    store.put(D1, b"works again")
    assert store.get_checked(D1).payload == b"works again"


def test_an_artifact_writable_by_others_is_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path / "cache", "ns")
    store.put(D1, PLANTED)
    Path(store.object_path(D1)).chmod(0o666)
    assert read_payload(store, D1) is None
    (warning,) = warnings_of(caplog)
    assert "writable by others" in warning


@needs_root
def test_an_artifact_owned_by_another_user_is_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path / "cache", "ns")
    store.put(D1, PLANTED)
    os.chown(store.object_path(D1), OTHER, OTHER)
    assert read_payload(store, D1) is None
    (warning,) = warnings_of(caplog)
    assert f"owned by uid {OTHER}" in warning


@needs_root
def test_a_file_another_user_writes_into_a_loosened_shard_is_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    store = _core.Store(tmp_path / "cache", "ns")
    store.put(D1, b"genuine")
    shard = Path(store.object_path(D1)).parent
    shard.chmod(0o777)  # a mistake after the store was opened
    image = _core.pack_artifact(D1, PLANTED)
    as_other_user(
        shard,
        f"""
        os.unlink({D1!r}, dir_fd=d)
        fd = os.open({D1!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)
        os.write(fd, bytes.fromhex({image.hex()!r}))
        """,
    )
    assert read_payload(store, D1) is None
    assert len(warnings_of(caplog)) == 1


def test_a_header_claiming_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "cache", "ns")
    store.put(D1, b"x" * 100)
    path = Path(store.object_path(D1))
    data = bytearray(path.read_bytes())
    data[16:24] = (1 << 62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    assert read_payload(store, D1) is None


# -- temp files and counters ---------------------------------------------------------


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, sys
    f = open(sys.argv[1], "wb")
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_temp_files_are_judged_by_their_writers_lock_not_a_pid(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "cache", "ns")
    tmp = Path(store.path) / "tmp"
    # A writer in another PID namespace: its pid means nothing here, but it holds the lock.
    live = tmp / f"{D1}.{2**31 - 8}.0.tmp"
    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "locked"
        # Named after a live process (this one), but nobody holds its lock: a dead writer's.
        dead = tmp / f"{D1}.{os.getpid()}.0.tmp"
        dead.write_bytes(b"partial")
        assert store.clean_tmp() == 1
        assert live.exists() and not dead.exists()
        _core.Store(tmp_path / "cache", "ns")  # opening cleans too, and spares the live writer
        assert live.exists()
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=60)
    assert store.clean_tmp() == 1 and not live.exists()


def test_a_stuck_writer_is_removed_after_the_maximum_age(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "cache", "ns")
    path = Path(store.path) / "tmp" / f"{D1}.1.0.tmp"
    with open(path, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert store.clean_tmp() == 0
        os.utime(path, (time.time() - 7200, time.time() - 7200))
        assert store.clean_tmp(max_age=3600) == 1
    assert not path.exists()


def test_usage_is_skipped_not_written_unlocked_when_its_lock_stays_busy(tmp_path: Path) -> None:
    store = _core.Store(tmp_path / "cache", "ns")
    assert store.record_usage(hits=1) is True
    with open(Path(store.path) / "stats.lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        assert store.record_usage(hits=5, timeout=0.2) is False
        assert time.monotonic() - start >= 0.2
        assert store.usage().hits == 1
    assert store.record_usage(hits=1, timeout=5) is True
    assert store.usage().hits == 2


def test_read_only_open_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(_core.StoreError, match="no isocache store"):
        _core.Store(root, "ns", create=False)
    assert not root.exists()
    _core.Store(root, "ns").put(D1, b"x")
    ro = _core.Store(root, "ns", create=False)
    assert not ro.writable and ro.get_checked(D1).payload == b"x"
    with pytest.raises(_core.StoreError, match="read-only"):
        ro.put(D2, b"y")
    with pytest.raises(_core.StoreError, match="read-only"):
        ro.clear()


# -- the command line ----------------------------------------------------------------


def test_ls_stats_and_verify_change_nothing_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    store.put(D1, b"good", 1.0)
    store.put(D2, b"will rot", 1.0)
    bad = Path(store.object_path(D2))
    bad.write_bytes(bad.read_bytes()[:-1] + b"!")
    stale = Path(store.path) / "tmp" / f"{D1}.1.0.tmp"
    stale.write_bytes(b"a dead writer's")
    os.utime(stale, (1, 1))
    os.rmdir(Path(store.path) / "leases")
    os.rmdir(Path(store.path) / "quarantine")
    del store
    before = tree(root)
    for args in (("ls",), ("ls", "--json"), ("stats",), ("stats", "--json"), ("verify",), ("verify", "--json")):
        proc = cli(*args, "--dir", str(root))
        assert "Traceback" not in proc.stderr, proc.stderr
        assert tree(root) == before, f"`{' '.join(args)}` changed the store"
    assert cli("verify", "--dir", str(root)).returncode == 1, "the bad file is reported"


def test_clear_gc_and_verify_fix_never_follow_a_symlinked_shard(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    store.put(D2, b"an artifact")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = {elsewhere / D1: b"not isocache's", elsewhere / ("a" * 63 + "b"): b"nor this"}
    for path, data in victims.items():
        path.write_bytes(data)
    shard = Path(store.path) / "objects" / "aa"
    for args in (("verify", "--fix"), ("gc", "--max-bytes", "0"), ("clear",)):
        if not shard.is_symlink():
            shard.symlink_to(elsewhere)
        proc = cli(*args, "--dir", str(root))
        assert proc.returncode == 0, proc.stderr
        for path, data in victims.items():
            assert path.read_bytes() == data, f"`{' '.join(args)}` reached through the link"
    assert not shard.is_symlink() and not shard.exists(), "the link itself may go"
    assert store.list() == []


@pytest.mark.parametrize("command", ["stats", "ls", "verify", "gc", "clear"])
def test_an_insecure_root_is_a_one_line_error(tmp_path: Path, command: str) -> None:
    root = tmp_path / "cache"
    _core.Store(root, "ns").put(D1, b"x")
    root.chmod(0o777)
    proc = cli(command, "--dir", str(root))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isocache: ") and "chmod go-w" in lines[0], proc.stderr
    assert (Path(root) / "v1" / "ns" / "objects" / "aa" / D1).exists()


def test_gc_with_a_negative_cap_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _core.Store(root, "ns").put(D1, b"x")
    for value in ("-1", "-5G", "lots"):
        proc = cli("gc", "--dir", str(root), "--max-bytes", value)
        assert proc.returncode == 2 and "--max-bytes" in proc.stderr, proc.stderr
    assert _core.Store(root, "ns").get_checked(D1).payload == b"x"
    assert cli("gc", "--dir", str(root), "--max-bytes", "1G").returncode == 0
    assert _core.Store(root, "ns").get_checked(D1).payload == b"x"


def test_the_quarantine_is_counted_capped_by_size_and_aged_out(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = _core.Store(root, "ns")
    for d in (D1, D2):
        store.put(d, b"z" * 1000)
        path = Path(store.object_path(d))
        path.write_bytes(path.read_bytes()[:-1] + b"!")
        assert read_payload(store, d) is None
    week_ago_ns = int((time.time() - 8 * 86400) * 1e9)
    (Path(store.path) / "quarantine" / f"{D3}.{week_ago_ns}").write_bytes(b"old")
    (ns,) = json.loads(cli("stats", "--dir", str(root), "--json").stdout)["namespaces"]
    assert ns["quarantined"] == 3 and ns["quarantined_bytes"] == 2 * 1128 + 3
    assert "quarantined" in cli("stats", "--dir", str(root)).stdout
    assert cli("gc", "--dir", str(root)).returncode == 0
    assert sorted(q.name.split(".")[0] for q in store.quarantine()) == sorted([D1, D2]), "the old entry aged out"
    store.put(D3, b"y" * 1000)
    # The size cap counts the quarantine and empties it before evicting artifacts.
    r = json.loads(cli("gc", "--dir", str(root), "--max-bytes", "1500", "--json").stdout)
    assert (r["removed"], r["remaining"]) == (0, 1) and r["remaining_bytes"] == 1128
    assert store.quarantine() == [] and store.get_checked(D3).payload == b"y" * 1000


def test_keygen_prints_a_usable_random_key(tmp_path: Path) -> None:
    first, second = cli("keygen"), cli("keygen")
    assert first.returncode == 0
    key = first.stdout.strip()
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert key != second.stdout.strip()
    assert f"export ISOCACHE_KEY={key}" in first.stderr and len(first.stderr.strip().splitlines()) == 1
    store = _core.Store(tmp_path / "cache", "ns", key=bytes.fromhex(key))
    store.put(D1, b"signed")
    assert _core.Store(tmp_path / "cache", "ns", key=bytes.fromhex(key)).get_checked(D1).payload == b"signed"


def test_the_store_commands_never_import_torch(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    _core.Store(root, "ns").put(D1, b"x")
    script = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from isocache.__main__ import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for args in (["stats"], ["ls"], ["verify"], ["gc"], ["clear"]):
                assert main([*args, "--dir", {str(root)!r}]) == 0, args
            assert main(["keygen"]) == 0
        assert "torch" not in sys.modules, "the command line imported torch"
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
