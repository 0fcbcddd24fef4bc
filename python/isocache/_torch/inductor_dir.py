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
open for the life of the process. Inductor is given the checked path, and
before every compile or load (in this process and in each compile worker)
the path must still name the held directory (device and inode): after a
swap the replacement is never used, isocache moves on to the next choice
with one warning. Since every parent was checked, only this user or root
can swap the directory at all; the moment between the re-check and
Inductor's use is the only window, and it is open to them alone.

Pointing Inductor at the descriptor itself (``/proc/<pid>/fd/<n>``) was
tried and dropped: every process that inherits the environment must then
reach this process's descriptors, and one that cannot (a child in another
user namespace, one that outlives this process) fails to import torch.
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

__all__ = ["ensure_private", "held", "in_use", "open_file", "private_dir_problem", "use_held"]

logger = logging.getLogger("isocache")

_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class _Held:
    fd: int
    #: The checked directory: what ``TORCHINDUCTOR_CACHE_DIR`` says.
    path: str
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


def held() -> tuple[str, int, int] | None:
    """The checked directory as (path, st_dev, st_ino), for a compile worker (`use_held`)."""
    h = _held
    return None if h is None else (h.path, *h.ident)


def open_file(name: str) -> int | None:
    """A file of this user's processes in the held directory (created 0600, never through a link):
    a descriptor for machine-wide locks, or None before `ensure_private` or when it cannot be opened."""
    h = _held
    if h is None:
        return None
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, 0o600, dir_fd=h.fd)
    except OSError:
        return None


def use_held(where: tuple[str, int, int]) -> None:
    """In a compile worker: points Inductor at the directory the parent checked, after making
    sure its path still names it. Raises `InsecureStoreError` when it does not (the parent
    then compiles the piece itself, in its own checked directory)."""
    path, dev, ino = where
    try:
        same = _ident(os.stat(path)) == (dev, ino)
    except OSError:
        same = False
    if not same:
        raise _core.InsecureStoreError(f"Inductor's directory {path} was replaced since it was checked")
    os.environ[_VARIABLE] = path


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
    try:
        return _ident(os.stat(held.path)) == held.ident
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
        if _held is not None and os.environ.get(_VARIABLE) == _held.path:
            if _still_held(_held):
                return
            logger.warning(
                "isocache: Inductor's cache directory %s no longer names the directory checked before "
                "(it was moved or replaced); not using what is there now",
                _held.path,
            )
            # The descriptor stays open: code loaded from it may still be in use.
            _held = _choose(store_root, avoid=_held.path)
        else:
            _held = _choose(store_root)
        os.environ[_VARIABLE] = _held.path


def _choose(store_root: str | None, avoid: str | None = None) -> _Held:
    """The first private directory of the three; `avoid`: a path that was swapped since its check."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    wanted = os.path.abspath(os.environ.get(_VARIABLE) or default_cache_dir())
    if wanted == avoid:
        why = f"not using Inductor's cache directory {wanted} ({_VARIABLE}): it was replaced after its check"
    else:
        try:
            return _hold(_core.open_private_dir(wanted, variable=_VARIABLE), wanted)
        except _core.CacheError as e:
            why = f"not using Inductor's cache directory {wanted} ({_VARIABLE}): {e}"
    inside = None if store_root is None else os.path.join(store_root, "inductor")
    if store_root is not None and inside is not None and inside != avoid:
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
    """The checked directory, held by its descriptor, named by its path."""
    if fd is None:  # pragma: no cover - only without create
        raise _core.StoreError(f"{path} does not exist")
    held = _Held(fd, path, _ident(os.fstat(fd)))
    if not _still_held(held):
        os.close(fd)
        raise _core.InsecureStoreError(f"{path} was replaced while it was being checked: run again")
    return held
