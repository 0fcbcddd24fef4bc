"""Every ``ISOCACHE_*`` environment variable, parsed in one place.

Nothing else in isocache reads the environment. `current()` parses the
variables once per distinct environment (tests and long-lived processes may
change it) and returns a frozen `Config`. A bad value never fails a compile:
it costs one warning naming the variable, the value and the default used
instead. Numbers are bounded: one out of range (``10**30``, a 400-digit
number) is clamped to the nearest bound, with one warning naming the
variable, the value and the bound used; the same bounds apply to the numeric
arguments of `isocache.Backend` (`clamp`).

| variable                   | bounds                                                     |
| -------------------------- | ---------------------------------------------------------- |
| `ISOCACHE_MAX_BYTES`       | 64 KiB .. 2**62 bytes (`MIN_MAX_BYTES`, `MAX_MAX_BYTES`)    |
| `ISOCACHE_REDIS_MAX_VALUE` | 64 KiB .. 2**62 bytes, as the size cap                      |
| `ISOCACHE_REDIS_TTL`       | 1 s .. 2**31 - 1 s, about 68 years (`MAX_REDIS_TTL`; Redis takes up to ~2**53 ms) |
| `ISOCACHE_WAIT_TIMEOUT`    | 0 .. 7 days (`MAX_WAIT_TIMEOUT`; the Rust core caps waits at the same) |
| `ISOCACHE_COMPILE_WORKERS` | 0 .. the CPU count (at least 4), at most 64 (`max_compile_workers()`) |
| `ISOCACHE_WORKER_IDLE`     | 0 .. 1 day (`MAX_WORKER_IDLE`)                              |

| variable                  | meaning                                                    | default             |
| ------------------------- | ---------------------------------------------------------- | ------------------- |
| `ISOCACHE_DIR`            | root of the local artifact store                           | the user cache dir  |
| `ISOCACHE_BASE`           | read-only base stores, `os.pathsep`-separated (at most 16) | none                |
| `ISOCACHE_DISABLE`        | `1`: plain Inductor, no store, no reuse                    | off                 |
| `ISOCACHE_MAX_BYTES`      | size cap of the store (`10G`, `500M`, bytes)               | 10 GiB              |
| `ISOCACHE_KEY`            | signing key (hex from `python -m isocache keygen`, >= 16 bytes) | none           |
| `ISOCACHE_REDIS_URL`      | a Redis server shared by a fleet (needs `ISOCACHE_KEY`)    | none                |
| `ISOCACHE_REDIS_TTL`      | expiry of published values (`3600`, `90m`, `12h`, `7d`)    | none (no expiry)    |
| `ISOCACHE_REDIS_MAX_VALUE` | largest value read from or published to Redis (`512M`) | 512 MiB          |
| `ISOCACHE_REDIS_INSECURE` | `1`: use Redis without a key (anyone who can write to it runs code here) | off   |
| `ISOCACHE_WAIT_TIMEOUT`   | longest wait for another process or machine compiling the same piece | 600 s |
| `ISOCACHE_COMPILE_WORKERS` | processes that compile pieces (`0`: compile in this process) | cores - 1, at most 4 |
| `ISOCACHE_WORKER_IDLE`    | seconds an idle compile worker lives before it exits      | 5 s                 |
| `ISOCACHE_BACKEND_WARM`   | `1`: `backend="isocache"` starts warm (experimental, torch 2.15) | off         |
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from pathlib import Path
from typing import Callable, TypeVar

from ._once import warn_once
from ._redact import redact_url

T = TypeVar("T")
N = TypeVar("N", int, float)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_REDIS_MAX_VALUE",
    "DEFAULT_WAIT_TIMEOUT",
    "MAX_MAX_BYTES",
    "MAX_REDIS_TTL",
    "MAX_WAIT_TIMEOUT",
    "MIN_KEY_BYTES",
    "MIN_MAX_BYTES",
    "VARIABLES",
    "Config",
    "bounded_seconds",
    "clamp",
    "current",
    "max_compile_workers",
    "parse_base",
    "parse_count",
    "parse_key",
    "parse_seconds",
    "parse_size",
]

DEFAULT_MAX_BYTES = 10 * 1024**3
DEFAULT_WAIT_TIMEOUT = 600.0
DEFAULT_WORKER_IDLE = 5.0
#: The longest an idle compile worker lives: a day.
MAX_WORKER_IDLE = 86400.0
DEFAULT_REDIS_MAX_VALUE = 512 * 1024**2
MIN_KEY_BYTES = 16
#: Bounds of the size cap: below 64 KiB nothing useful fits; 2**62 is far above any disk.
MIN_MAX_BYTES = 64 * 1024
MAX_MAX_BYTES = 2**62
#: The longest wait for another compiler: a week.
MAX_WAIT_TIMEOUT = 7 * 86400.0
#: The longest Redis expiry: 2**31 - 1 seconds (about 68 years), well within what Redis accepts.
MAX_REDIS_TTL = 2**31 - 1
#: Most base stores (`ISOCACHE_BASE`) searched; more are ignored with a warning.
MAX_BASE_DIRS = 16
#: Compile workers never exceed this, whatever the CPU count.
MAX_COMPILE_WORKERS = 64
#: What the parsers return for a number too large to hold (clamped by the caller).
_HUGE = 2**64

#: Every variable isocache reads, with a one-line description (the README's table is checked against it).
VARIABLES: dict[str, str] = {
    "ISOCACHE_DIR": "root of the local artifact store",
    "ISOCACHE_BASE": "read-only base stores searched after the local store (os.pathsep-separated)",
    "ISOCACHE_DISABLE": "1: plain Inductor, no store, no reuse",
    "ISOCACHE_MAX_BYTES": "size cap of the local store",
    "ISOCACHE_KEY": "signing key for artifacts (required for Redis)",
    "ISOCACHE_REDIS_URL": "Redis server shared by a fleet",
    "ISOCACHE_REDIS_TTL": "expiry of values published to Redis",
    "ISOCACHE_REDIS_MAX_VALUE": "largest value read from or published to Redis",
    "ISOCACHE_REDIS_INSECURE": "1: use Redis without a key",
    "ISOCACHE_WAIT_TIMEOUT": "longest wait for another compiler of the same piece",
    "ISOCACHE_COMPILE_WORKERS": "processes that compile pieces (0: compile in this process)",
    "ISOCACHE_WORKER_IDLE": "seconds an idle compile worker lives before it exits",
    "ISOCACHE_BACKEND_WARM": "1: torch.compile(model, backend='isocache') starts warm (experimental)",
}

_KEYGEN_HINT = "make one with `python -m isocache keygen`"


@dataclasses.dataclass(frozen=True)
class Config:
    """isocache's configuration, as read from the environment."""

    #: Root of the local store; None when no directory can be determined.
    dir: Path | None
    #: Read-only base stores (``ISOCACHE_BASE``), searched in order after the local store.
    base: tuple[Path, ...] = ()
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
    #: Seconds a compile worker with nothing queued lives before it exits (memory returned).
    worker_idle: float = DEFAULT_WORKER_IDLE
    #: ``torch.compile(model, backend="isocache")`` loads a saved entry of the model's forward
    #: (`backend_warm.py`; experimental, opt-in).
    backend_warm: bool = False

    def __repr__(self) -> str:
        """Every field, but the key only as its length and the Redis URL redacted: no secret in a log line."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "key" and value is not None:
                text = f"<{len(value)} bytes, hidden>"
            elif field.name == "redis_url" and value is not None:
                text = repr(redact_url(value))
            else:
                text = repr(value)
            shown.append(f"{field.name}={text}")
        return f"Config({', '.join(shown)})"


# -- parsers (pure; raise ValueError with a message for the warning) -----------

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SECONDS_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """Bytes from ``10G``, ``500MiB``, ``1.5g`` or plain digits; positive and finite."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise ValueError("expected a size such as 10G, 500M or a number of bytes")
    number = float(m.group(1)) * _SIZE_UNITS[m.group(2)]  # a 400-digit number is inf, not an error
    if number <= 0:
        raise ValueError("the size must be positive")
    return int(number) if number < _HUGE else _HUGE


def parse_seconds(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h``, ``7d``; positive (a huge number is ``inf``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*", text.lower())
    if m is None:
        raise ValueError("expected a duration such as 3600, 90s, 15m, 12h or 7d")
    value = float(m.group(1)) * _SECONDS_UNITS[m.group(2) or ""]
    if value <= 0:
        raise ValueError("the duration must be positive")
    return value


def _parse_seconds_or_zero(text: str) -> float:
    """`parse_seconds`, or 0 (``0``: at once)."""
    return 0.0 if re.fullmatch(r"\s*0+(?:\.0+)?\s*(s|m|min|h|d)?\s*", text.lower()) else parse_seconds(text)


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
    if not (value.isascii() and value.isdigit()):
        raise ValueError("expected a number of processes (0 turns them off) or auto")
    return int(value) if len(value) < 20 else _HUGE


def _parse_redis_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    if not re.match(r"^(redis|rediss|unix)://", url):
        raise ValueError("expected a URL starting with redis://, rediss:// or unix://")
    return url


def parse_base(text: str) -> tuple[Path, ...]:
    """Store roots from an ``os.pathsep``-separated list, made absolute as ``ISOCACHE_DIR`` is (empty
    items skipped, duplicates once)."""
    paths: list[Path] = []
    for item in text.split(os.pathsep):
        item = item.strip()
        if not item:
            continue
        path = Path(os.path.abspath(os.path.expanduser(item)))
        if path not in paths:
            paths.append(path)
    return tuple(paths)


def max_compile_workers() -> int:
    """The most compile workers: the CPU count (at least 4), at most `MAX_COMPILE_WORKERS`."""
    return min(MAX_COMPILE_WORKERS, max(4, os.cpu_count() or 1))


def clamp(name: str, value: N, low: N, high: N, default: N, *, text: str | None = None) -> N:
    """`value` within ``low..high``: out of range is clamped, NaN gives `default`, each with one warning.

    `name` says where the value came from (a variable, or ``Backend(wait_timeout=...)``),
    `text` is what was written there (default: `value`). Comparisons only, so
    a 400-digit int costs nothing.
    """
    if isinstance(value, float) and math.isnan(value):
        used, problem = default, "not a number"
    elif value < low:
        used, problem = low, f"below the minimum of {_number(low)}"
    elif value > high:
        used, problem = high, f"above the maximum of {_number(high)}"
    else:
        return value
    shown = _shown(str(value) if text is None else text.strip())
    warn_once(
        ("bounds", name, shown), "isocache: %s=%s is out of range (%s); using %s", name, shown, problem, _number(used)
    )
    return used


def bounded_seconds(name: str, value: float, high: float = MAX_WAIT_TIMEOUT) -> float:
    """A wait of `value` seconds within ``0..high`` (one warning when clamped; NaN waits not at all)."""
    return float(clamp(name, value, 0.0, high, 0.0))


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _shown(text: str) -> str:
    """`text` for a warning: long ones (a 400-digit number) are cut."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"


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


def _base_dirs(raw: str) -> tuple[Path, ...]:
    """``ISOCACHE_BASE``'s stores, at most `MAX_BASE_DIRS` (more: one warning)."""
    base = parse_base(raw)
    if len(base) > MAX_BASE_DIRS:
        _warn("ISOCACHE_BASE", raw, f"more than {MAX_BASE_DIRS} stores", f"the first {MAX_BASE_DIRS}")
    return base[:MAX_BASE_DIRS]


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
    if ttl is not None:
        ttl = clamp("ISOCACHE_REDIS_TTL", ttl, 1.0, float(MAX_REDIS_TTL), 1.0, text=env["ISOCACHE_REDIS_TTL"])
    workers = parsed("ISOCACHE_COMPILE_WORKERS", parse_count, None, "auto")
    if workers is not None:
        workers = clamp(
            "ISOCACHE_COMPILE_WORKERS", workers, 0, max_compile_workers(), 0, text=env["ISOCACHE_COMPILE_WORKERS"]
        )
    idle = parsed("ISOCACHE_WORKER_IDLE", _parse_seconds_or_zero, DEFAULT_WORKER_IDLE, f"{DEFAULT_WORKER_IDLE:.0f} s")
    wait = parsed("ISOCACHE_WAIT_TIMEOUT", parse_seconds, DEFAULT_WAIT_TIMEOUT, f"{DEFAULT_WAIT_TIMEOUT:.0f} s")
    max_bytes = parsed("ISOCACHE_MAX_BYTES", parse_size, DEFAULT_MAX_BYTES, "10G")
    redis_max_value = parsed("ISOCACHE_REDIS_MAX_VALUE", parse_size, DEFAULT_REDIS_MAX_VALUE, "512M")
    return Config(
        dir=directory,
        base=_base_dirs(env.get("ISOCACHE_BASE", "")),
        disable=parsed("ISOCACHE_DISABLE", parse_bool, False, "off"),
        backend_warm=parsed("ISOCACHE_BACKEND_WARM", parse_bool, False, "off"),
        max_bytes=clamp(
            "ISOCACHE_MAX_BYTES",
            max_bytes,
            MIN_MAX_BYTES,
            MAX_MAX_BYTES,
            DEFAULT_MAX_BYTES,
            text=env.get("ISOCACHE_MAX_BYTES"),
        ),
        key=key,
        key_problem=key_problem,
        redis_url=parsed("ISOCACHE_REDIS_URL", _parse_redis_url, None, "no Redis"),
        redis_ttl=None if ttl is None else max(1, round(ttl)),
        redis_insecure=parsed("ISOCACHE_REDIS_INSECURE", parse_bool, False, "off"),
        redis_max_value=clamp(
            "ISOCACHE_REDIS_MAX_VALUE",
            redis_max_value,
            MIN_MAX_BYTES,
            MAX_MAX_BYTES,
            DEFAULT_REDIS_MAX_VALUE,
            text=env.get("ISOCACHE_REDIS_MAX_VALUE"),
        ),
        wait_timeout=clamp(
            "ISOCACHE_WAIT_TIMEOUT",
            wait,
            0.0,
            MAX_WAIT_TIMEOUT,
            DEFAULT_WAIT_TIMEOUT,
            text=env.get("ISOCACHE_WAIT_TIMEOUT"),
        ),
        compile_workers=workers,
        worker_idle=clamp(
            "ISOCACHE_WORKER_IDLE",
            idle,
            0.0,
            MAX_WORKER_IDLE,
            DEFAULT_WORKER_IDLE,
            text=env.get("ISOCACHE_WORKER_IDLE"),
        ),
    )
