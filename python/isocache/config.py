"""Every ``ISOCACHE_*`` environment variable, parsed in one place.

Nothing else in isocache reads the environment. `current()` parses the
variables once per distinct environment (tests and long-lived processes may
change it) and returns a frozen `Config`. A bad value never fails a compile:
it costs one warning naming the variable, the value and the default used
instead.

| variable                  | meaning                                                    | default             |
| ------------------------- | ---------------------------------------------------------- | ------------------- |
| `ISOCACHE_DIR`            | root of the local artifact store                           | the user cache dir  |
| `ISOCACHE_DISABLE`        | `1`: plain Inductor, no store, no reuse                    | off                 |
| `ISOCACHE_MAX_BYTES`      | size cap of the store (`10G`, `500M`, bytes)               | 10 GiB              |
| `ISOCACHE_KEY`            | signing key (hex from `python -m isocache keygen`, >= 16 bytes) | none           |
| `ISOCACHE_REDIS_URL`      | a Redis server shared by a fleet (needs `ISOCACHE_KEY`)    | none                |
| `ISOCACHE_REDIS_TTL`      | expiry of published values (`3600`, `90m`, `12h`, `7d`)    | none (no expiry)    |
| `ISOCACHE_REDIS_MAX_VALUE` | largest value read from or published to Redis (`512M`) | 512 MiB          |
| `ISOCACHE_REDIS_INSECURE` | `1`: use Redis without a key (anyone who can write to it runs code here) | off   |
| `ISOCACHE_WAIT_TIMEOUT`   | longest wait for another process or machine compiling the same piece | 600 s |
| `ISOCACHE_COMPILE_WORKERS` | processes that compile pieces (`0`: compile in this process) | cores - 1, at most 4 |
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Callable, TypeVar

from ._once import warn_once
from ._redact import redact_url

T = TypeVar("T")

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_REDIS_MAX_VALUE",
    "DEFAULT_WAIT_TIMEOUT",
    "MIN_KEY_BYTES",
    "VARIABLES",
    "Config",
    "current",
    "parse_count",
    "parse_key",
    "parse_seconds",
    "parse_size",
]

DEFAULT_MAX_BYTES = 10 * 1024**3
DEFAULT_WAIT_TIMEOUT = 600.0
DEFAULT_REDIS_MAX_VALUE = 512 * 1024**2
MIN_KEY_BYTES = 16

#: Every variable isocache reads, with a one-line description (the README's table is checked against it).
VARIABLES: dict[str, str] = {
    "ISOCACHE_DIR": "root of the local artifact store",
    "ISOCACHE_DISABLE": "1: plain Inductor, no store, no reuse",
    "ISOCACHE_MAX_BYTES": "size cap of the local store",
    "ISOCACHE_KEY": "signing key for artifacts (required for Redis)",
    "ISOCACHE_REDIS_URL": "Redis server shared by a fleet",
    "ISOCACHE_REDIS_TTL": "expiry of values published to Redis",
    "ISOCACHE_REDIS_MAX_VALUE": "largest value read from or published to Redis",
    "ISOCACHE_REDIS_INSECURE": "1: use Redis without a key",
    "ISOCACHE_WAIT_TIMEOUT": "longest wait for another compiler of the same piece",
    "ISOCACHE_COMPILE_WORKERS": "processes that compile pieces (0: compile in this process)",
}

_KEYGEN_HINT = "make one with `python -m isocache keygen`"


@dataclasses.dataclass(frozen=True)
class Config:
    """isocache's configuration, as read from the environment."""

    #: Root of the local store; None when no directory can be determined.
    dir: Path | None
    disable: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    #: The decoded signing key; None when unset or invalid (see `key_problem`).
    key: bytes | None = None
    #: Why a set ``ISOCACHE_KEY`` is not used, or None.
    key_problem: str | None = None
    redis_url: str | None = None
    redis_ttl: int | None = None
    redis_insecure: bool = False
    redis_max_value: int = DEFAULT_REDIS_MAX_VALUE
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    #: Compile worker processes; None: one per core but this process's, at most 4.
    compile_workers: int | None = None


# -- parsers (pure; raise ValueError with a message for the warning) -----------

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SECONDS_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """Bytes from ``10G``, ``500MiB``, ``1.5g`` or plain digits; positive and finite."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise ValueError("expected a size such as 10G, 500M or a number of bytes")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise ValueError("the size must be positive")
    return value


def parse_seconds(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h``, ``7d``; positive and finite."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*", text.lower())
    if m is None:
        raise ValueError("expected a duration such as 3600, 90s, 15m, 12h or 7d")
    value = float(m.group(1)) * _SECONDS_UNITS[m.group(2) or ""]
    if value <= 0:
        raise ValueError("the duration must be positive")
    return value


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def parse_key(text: str) -> bytes:
    """The key's bytes: hex is decoded (as `keygen` prints it), anything else is taken as UTF-8.

    Raises ValueError when fewer than `MIN_KEY_BYTES` bytes remain: a short
    key can be guessed, and a blank one would silently turn signing off.
    """
    stripped = text.strip()
    is_hex = re.fullmatch(r"(?:[0-9a-fA-F]{2})+", stripped) is not None
    key = bytes.fromhex(stripped) if is_hex else stripped.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"a key must have at least {MIN_KEY_BYTES} bytes after decoding (this one has {len(key)}); {_KEYGEN_HINT}"
        )
    return key


def parse_count(text: str) -> int | None:
    """A count >= 0, or None for ``auto``."""
    value = text.strip().lower()
    if value == "auto":
        return None
    if not value.isdigit():
        raise ValueError("expected a number of processes (0 turns them off) or auto")
    return int(value)


def _parse_redis_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError("expected a URL starting with redis://, rediss:// or unix://")
    return url


# -- reading the environment ---------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple[tuple[str, str], ...], Config] = {}


def _warn(name: str, value: str, problem: str, default: str) -> None:
    if name == "ISOCACHE_KEY":
        shown = "<hidden>"
    elif name == "ISOCACHE_REDIS_URL":
        shown = repr(redact_url(value))
    else:
        shown = repr(value)
    warn_once(("config", name, value), "isocache: ignoring %s=%s: %s; using %s", name, shown, problem, default)


def _default_dir() -> Path | None:
    try:
        from platformdirs import user_cache_path

        path = user_cache_path("isocache", appauthor=False)
    except ImportError:  # platformdirs is a dependency; keep working without it
        path = Path(os.path.expanduser("~")) / ".cache" / "isocache"
    return path if path.is_absolute() else None


def _snapshot() -> tuple[tuple[str, str], ...]:
    relevant = ("HOME", "XDG_CACHE_HOME")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("ISOCACHE_") or k in relevant))


def current() -> Config:
    """The configuration for the current environment (parsed once per distinct environment)."""
    snapshot = _snapshot()
    with _lock:
        cached = _cache.get(snapshot)
    if cached is not None:
        return cached
    config = _parse(dict(snapshot))
    with _lock:
        if len(_cache) > 64:  # environments that keep changing must not grow memory
            _cache.clear()
        _cache[snapshot] = config
    return config


def _parse(env: dict[str, str]) -> Config:
    def parsed(name: str, parser: Callable[[str], T], default: T, shown_default: str) -> T:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            return parser(raw)
        except ValueError as e:
            _warn(name, raw, str(e), shown_default)
            return default

    raw_dir = env.get("ISOCACHE_DIR", "").strip()
    directory = Path(os.path.abspath(os.path.expanduser(raw_dir))) if raw_dir else _default_dir()

    key: bytes | None = None
    key_problem: str | None = None
    raw_key = env.get("ISOCACHE_KEY")
    if raw_key is not None:
        try:
            key = parse_key(raw_key)
        except ValueError as e:
            key_problem = f"ISOCACHE_KEY is not usable: {e}"
            _warn("ISOCACHE_KEY", raw_key, str(e), "no key (artifacts are not signed, Redis stays off)")

    ttl: float | None = parsed("ISOCACHE_REDIS_TTL", parse_seconds, None, "no expiry")
    return Config(
        dir=directory,
        disable=parsed("ISOCACHE_DISABLE", parse_bool, False, "off"),
        max_bytes=parsed("ISOCACHE_MAX_BYTES", parse_size, DEFAULT_MAX_BYTES, "10G"),
        key=key,
        key_problem=key_problem,
        redis_url=parsed("ISOCACHE_REDIS_URL", _parse_redis_url, None, "no Redis"),
        redis_ttl=None if ttl is None else max(1, round(ttl)),
        redis_insecure=parsed("ISOCACHE_REDIS_INSECURE", parse_bool, False, "off"),
        redis_max_value=parsed("ISOCACHE_REDIS_MAX_VALUE", parse_size, DEFAULT_REDIS_MAX_VALUE, "512M"),
        wait_timeout=parsed(
            "ISOCACHE_WAIT_TIMEOUT", parse_seconds, DEFAULT_WAIT_TIMEOUT, f"{DEFAULT_WAIT_TIMEOUT:.0f} s"
        ),
        compile_workers=parsed("ISOCACHE_COMPILE_WORKERS", parse_count, None, "auto"),
    )
