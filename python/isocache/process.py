"""What one process shares, and why: the one place process-wide state is decided.

Everything else belongs to the object that made it: a `Backend` owns its
stores (the local store's tiers and Redis tiers, per namespace), its options
and its namespaces. Four things cannot, because torch or the hardware makes
them one per process:

- **The piece index** (`tiers/memory.PROCESS_INDEX`): compiled callables by
  digest. A digest names a piece's code and its namespace (Inductor options
  included), so any backend may run what another compiled: that is the reuse
  isocache exists for.
- **Compile workers** (`compile_workers.pool`): one pool per device type, as
  large as the largest count any backend asked for (``compile_workers=``, else
  ``ISOCACHE_COMPILE_WORKERS``). Each worker holds a warm Inductor; a pool per
  backend would start them again for every ``isocache.compile``.
- **Inductor's output directory**: torch reads one per process
  (``TORCHINDUCTOR_CACHE_DIR``), and loading a piece runs the code written
  there. `ensure_private_inductor_dir` checks it once, before the first
  compile or load; when others could write to it, Inductor writes to
  ``inductor/`` in the process's store root (``ISOCACHE_DIR``, else the user
  cache directory) instead: never in one backend's ``cache_dir``, so the
  choice does not depend on which backend came first.
- **The backend behind** ``torch.compile(model, backend="isocache")``
  (`backend.isocache_backend`): torch calls a plain function, so one backend,
  configured from the environment, serves every such call.
"""

from __future__ import annotations

import os
import threading

from . import config
from ._torch import inductor

__all__ = ["ensure_private_inductor_dir"]

_inductor_dir_lock = threading.Lock()
_inductor_dir_checked = False


def ensure_private_inductor_dir() -> None:
    """Once per process, before the first compile or load: Inductor writes the code it loads where
    nobody else can."""
    global _inductor_dir_checked
    with _inductor_dir_lock:
        if _inductor_dir_checked:
            return
        _inductor_dir_checked = True
        root = config.current().dir
        inductor.ensure_private_cache_dir(None if root is None else os.path.join(root, "inductor"))
