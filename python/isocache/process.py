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
  backend would start them again for every ``isocache.compile``. Workers are
  even one set per machine (slots locked in Inductor's directory) and exit
  when idle (``ISOCACHE_WORKER_IDLE``): see `compile_workers`.
- **Inductor's output directory**: torch reads one per process
  (``TORCHINDUCTOR_CACHE_DIR``), and loading a piece runs the code written
  there. `ensure_private_inductor_dir` runs before every compile or load:
  the first time it opens a private directory by a checked walk and holds
  its descriptor for the life of the process (`_torch.inductor_dir`): the
  user's directory when it is private, else ``inductor/`` in the process's
  store root (``ISOCACHE_DIR``, else the user cache directory; never in one
  backend's ``cache_dir``, so the choice does not depend on which backend
  came first, and never in a root refused as unsafe), else a fresh private
  temporary directory. Later calls (and each compile worker, before each
  piece) check that the path still names the held directory; one that was
  replaced is never used.
- **The backend behind** ``torch.compile(model, backend="isocache")``
  (`backend.isocache_backend`): torch calls a plain function, so one backend,
  configured from the environment, serves every such call.
"""

from __future__ import annotations

from . import config
from ._torch import inductor_dir

__all__ = ["ensure_private_inductor_dir"]


def ensure_private_inductor_dir() -> None:
    """Before each compile or load: Inductor writes the code it loads where nobody else can (chosen and
    checked the first time, one ``stat`` after that)."""
    root = config.current().dir
    inductor_dir.ensure_private(None if root is None else str(root))
