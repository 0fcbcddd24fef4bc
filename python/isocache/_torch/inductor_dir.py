"""Inductor's cache directory: private to this user, checked once, then held by descriptor.

Loading a piece writes its shared objects and Python modules to Inductor's
cache directory (``TORCHINDUCTOR_CACHE_DIR``, which torch reads on every use,
``cache_dir_utils.cache_dir``) and runs them, so that directory decides what
code runs here. `ensure_private` picks it, in this order:

1. the user's ``TORCHINDUCTOR_CACHE_DIR`` (else torch's default,
   ``/tmp/torchinductor_<user>``) when it is private;
2. else ``inductor/`` in isocache's store root, opened through the checked
   root (a root refused as unsafe is never used);
3. else a fresh private temporary directory, removed at exit.

Each is opened by the store's checked walk (``_core.open_private_dir``: owned
by this user, not writable by others, not a symbolic link, every parent
directory only this user or root can change) and the descriptor is kept
open for the life of the process. Inductor is pointed at the descriptor,
not at the path: on Linux ``TORCHINDUCTOR_CACHE_DIR=/proc/<pid>/fd/<n>``
(this process's id, so that Inductor's compile subprocesses and isocache's
compile workers, which inherit the environment, reach the same directory).
Renaming or replacing the path after the check then redirects nothing.
Where ``/proc`` does not name it, Inductor gets the checked path, and every
call re-checks that the path still names the held directory (device and
inode) before the caller compiles or loads.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
import threading

from .. import _core

__all__ = ["ensure_private", "in_use", "private_dir_problem"]

logger = logging.getLogger("isocache")

_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class _Held:
    fd: int
    #: The directory as it was checked (for messages).
    path: str
    #: What ``TORCHINDUCTOR_CACHE_DIR`` says: ``/proc/<pid>/fd/<fd>``, else `path`.
    given: str
    #: (st_dev, st_ino) of the held directory.
    ident: tuple[int, int]


_lock = threading.Lock()
_held: _Held | None = None


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def in_use() -> str | None:
    """The directory Inductor writes to, as it was checked (None before `ensure_private`)."""
    held = _held
    return None if held is None else held.path


def private_dir_problem(path: str) -> str | None:
    """Why `path` is not a private directory (someone else could change what it holds), or None.

    Checked like OpenSSH's StrictModes, without following a symbolic link at
    `path` itself (a link is a problem): owned by this user and writable by
    nobody else; each parent owned by this user or root and not writable by
    others unless it is sticky (like /tmp).
    """
    try:
        fd = _core.open_private_dir(path, create=False, variable=_VARIABLE)
    except _core.CacheError as e:
        return str(e)
    if fd is None:
        return "it does not exist"
    os.close(fd)
    return None


def _still_held(held: _Held) -> bool:
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != held.given:
        return False  # set to another directory since: check that one
    try:
        return _ident(os.stat(held.given)) == held.ident
    except OSError:
        return False


def ensure_private(store_root: str | None) -> None:
    """Before each compile or load: points Inductor at a private directory held by this process.

    The first call chooses and checks (one warning when it is not the user's
    directory, saying which and why); later calls cost one ``stat``, and
    choose again when ``TORCHINDUCTOR_CACHE_DIR`` was changed or its path no
    longer names the held directory. Raises `isocache.InsecureStoreError`
    only when not even a fresh temporary directory is private.
    """
    global _held
    with _lock:
        if _held is not None and _still_held(_held):
            return
        if _held is not None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == _held.given:
            logger.warning(
                "isocache: Inductor's cache directory %s no longer names the directory checked before; choosing again",
                _held.path,
            )
        _held = _choose(store_root)  # the one held before stays open: code loaded from it may still be in use
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _held.given


def _choose(store_root: str | None) -> _Held:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    wanted = os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    try:
        return _hold(_core.open_private_dir(wanted, variable=_VARIABLE), wanted)
    except _core.CacheError as e:
        why = f"not using Inductor's cache directory {wanted} ({_VARIABLE}): {e}"
    if store_root is not None:
        inside = os.path.join(store_root, "inductor")
        try:
            held = _hold(_core.open_private_dir(store_root, child="inductor"), inside)
            logger.warning("isocache: %s; Inductor writes to %s (in isocache's store) instead", why, held.path)
            return held
        except _core.CacheError as e:
            why += f"; nor {inside} in isocache's store: {e}"
    tmp = tempfile.mkdtemp(prefix="isocache-inductor-")  # mode 0700
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    held = _hold(_core.open_private_dir(tmp, create=False), tmp)
    logger.warning(
        "isocache: %s; Inductor writes to a fresh private temporary directory %s instead, removed at exit "
        "(compiled code is not kept for the next process: set %s to a directory only you can write)",
        why,
        held.path,
        _VARIABLE,
    )
    return held


def _hold(fd: int | None, path: str) -> _Held:
    """Names the checked directory by its descriptor where ``/proc`` can, else by its path."""
    if fd is None:  # pragma: no cover - only without create
        raise _core.StoreError(f"{path} does not exist")
    ident = _ident(os.fstat(fd))
    for given in (f"/proc/{os.getpid()}/fd/{fd}", path):
        try:
            if _ident(os.stat(given)) == ident:
                return _Held(fd, path, given, ident)
        except OSError:
            pass
    os.close(fd)
    raise _core.InsecureStoreError(f"{path} was replaced while it was being checked: run again")
