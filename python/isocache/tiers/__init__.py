"""Tiers: where compiled pieces of a namespace come from, fastest first.

    memory (tiers/memory.py)  ->  local store (tiers/local.py)  ->  base stores (tiers/base_store.py)
        ->  Redis (tiers/redis.py)  ->  compile

Base stores (``ISOCACHE_BASE``) are read-only stores built elsewhere and shipped
as an archive (``python -m isocache pack`` / ``unpack``); nothing is written to them.

While `isocache.compile` loads a saved model, the pieces bundled in its entry
(tiers/bundle.py, read-only) come between memory and the local store.

Every tier implements one protocol (`base.Tier`: ``get``/``contains``/``put``/
``lease``/``discard`` and its own `base.TierStats`). The chain
(`tiers/chain.py`) looks them up in order, back-fills faster tiers and
publishes compiles; the resolver (`resolver.py`) decides what that means for
a piece. Adding a tier (an object store, a shared filesystem) is one class
implementing `base.Tier`, placed in the chain by `Backend.chain`.

Only `base` is imported here: the submodules import what they need.
"""

from __future__ import annotations

from .base import NO_LEASE, Hit, Lease, NoLease, Tier, TierStats, Unloadable

__all__ = ["NO_LEASE", "Hit", "Lease", "NoLease", "Tier", "TierStats", "Unloadable"]
