"""The configuration module: every ISOCACHE_* variable parsed once, bad values warned, never fatal."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from isocache import _core, _once, config

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "isocache"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ISOCACHE_"):
            monkeypatch.delenv(name)
    _once.forget()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10G", 10 * 1024**3),
        ("500M", 500 * 1024**2),
        ("500MiB", 500 * 1024**2),
        ("1.5k", 1536),
        ("4096", 4096),
        ("2gb", 2 * 1024**3),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert config.parse_size(text) == expected


@pytest.mark.parametrize("text", ["infk", "-1", "0", "nan", "1e400", "10X", "", "ten"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("3600", 3600), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_durations(text: str, expected: float) -> None:
    assert config.parse_seconds(text) == expected


@pytest.mark.parametrize("text", ["soon", "-5", "0", "1w", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_seconds(text)


def test_keys() -> None:
    assert config.parse_key("ab" * 32) == bytes([0xAB]) * 32
    assert config.parse_key("a passphrase of some length") == b"a passphrase of some length"
    for short in ["", "   ", "secret", "ab" * 15]:
        with pytest.raises(ValueError, match=r"at least 16 bytes.*keygen"):
            config.parse_key(short)


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = config.current()
    assert cfg.dir == tmp_path / "xdg" / "isocache"
    assert (cfg.disable, cfg.max_bytes, cfg.key, cfg.redis_url, cfg.redis_ttl, cfg.redis_insecure) == (
        False,
        config.DEFAULT_MAX_BYTES,
        None,
        None,
        None,
        False,
    )
    assert cfg.wait_timeout == config.DEFAULT_WAIT_TIMEOUT


def test_values_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ISOCACHE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("ISOCACHE_DISABLE", "yes")
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "2G")
    monkeypatch.setenv("ISOCACHE_KEY", "00" * 32)
    monkeypatch.setenv("ISOCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("ISOCACHE_REDIS_TTL", "1h")
    monkeypatch.setenv("ISOCACHE_REDIS_INSECURE", "1")
    monkeypatch.setenv("ISOCACHE_WAIT_TIMEOUT", "2m")
    cfg = config.current()
    assert cfg.dir == tmp_path / "store"
    assert cfg.disable and cfg.redis_insecure
    assert cfg.max_bytes == 2 * 1024**3
    assert cfg.key == bytes(32) and cfg.key_problem is None
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"
    assert cfg.redis_ttl == 3600
    assert cfg.wait_timeout == 120.0


def test_parsed_once_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "1G")
    first = config.current()
    assert config.current() is first
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "2G")
    assert config.current().max_bytes == 2 * 1024**3


@pytest.mark.parametrize(
    ("name", "value", "field", "default"),
    [
        ("ISOCACHE_MAX_BYTES", "infk", "max_bytes", config.DEFAULT_MAX_BYTES),
        ("ISOCACHE_MAX_BYTES", "-1", "max_bytes", config.DEFAULT_MAX_BYTES),
        ("ISOCACHE_REDIS_TTL", "an hour", "redis_ttl", None),
        ("ISOCACHE_WAIT_TIMEOUT", "forever", "wait_timeout", config.DEFAULT_WAIT_TIMEOUT),
        ("ISOCACHE_DISABLE", "maybe", "disable", False),
        ("ISOCACHE_REDIS_URL", "http://127.0.0.1", "redis_url", None),
    ],
)
def test_bad_value_warns_once_and_uses_the_default(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: str,
    field: str,
    default: object,
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv(name, value)
    assert getattr(config.current(), field) == default
    monkeypatch.setenv("ISOCACHE_DIR", "/elsewhere")  # another environment, same bad value
    assert getattr(config.current(), field) == default
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert value in warnings[0] and "using" in warnings[0]


@pytest.mark.parametrize("value", ["", "   ", "short"])
def test_unusable_key_is_an_error_that_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv("ISOCACHE_KEY", value)
    cfg = config.current()
    assert cfg.key is None
    assert cfg.key_problem is not None and "at least 16 bytes" in cfg.key_problem
    (warning,) = [r.getMessage() for r in caplog.records if "ISOCACHE_KEY" in r.getMessage()]
    assert "keygen" in warning
    if value.strip():
        assert value not in warning, "the key's text never reaches a log line"


def test_nothing_else_reads_the_environment() -> None:
    readers = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.environ|os\.getenv|getenv\(", line) and "TORCHINDUCTOR_CACHE_DIR" not in line:
                readers.append(f"{path.name}:{n}: {line.strip()}")
    assert readers == []


def test_bad_configuration_never_fails_a_compile(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import torch, isocache
        def f(x):
            return torch.sin(x) * 2 + 1
        x = torch.randn(8)
        out = torch.compile(f, backend="isocache")(x)
        assert torch.allclose(out, f(x))
        print("compiled", isocache.stats()["compiled"])
        """
    )
    env = {
        **os.environ,
        "ISOCACHE_DIR": str(tmp_path / "cache"),
        "ISOCACHE_MAX_BYTES": "infk",
        "ISOCACHE_REDIS_TTL": "1 fortnight",
        "ISOCACHE_KEY": "   ",
        "ISOCACHE_WAIT_TIMEOUT": "-3",
        "ISOCACHE_DISABLE": "perhaps",
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compiled 1" in proc.stdout
    for name in (
        "ISOCACHE_MAX_BYTES",
        "ISOCACHE_REDIS_TTL",
        "ISOCACHE_KEY",
        "ISOCACHE_WAIT_TIMEOUT",
        "ISOCACHE_DISABLE",
    ):
        assert proc.stderr.count(f"ignoring {name}=") == 1, proc.stderr


def test_readme_lists_every_variable() -> None:
    readme = (PACKAGE.parent.parent / "README.md").read_text()
    listed = set(re.findall(r"^\| `(ISOCACHE_[A-Z_]+)", readme, flags=re.M))
    assert listed == set(config.VARIABLES)


def test_bad_redis_url_is_logged_without_its_secret(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv("ISOCACHE_REDIS_URL", "http://:hunter2-secret@cache.internal?password=other-secret")
    assert config.current().redis_url is None
    (warning,) = [r.getMessage() for r in caplog.records if "ISOCACHE_REDIS_URL" in r.getMessage()]
    assert "cache.internal" in warning
    assert "hunter2" not in warning and "other-secret" not in warning


HUGE_VALUES = [str(10**30), "1" * 400, "1e308", "-1", "nan", "inf"]
NUMERIC = {
    # variable: (field, the value used for a number above the range, the default)
    "ISOCACHE_MAX_BYTES": ("max_bytes", config.MAX_MAX_BYTES, config.DEFAULT_MAX_BYTES),
    "ISOCACHE_REDIS_TTL": ("redis_ttl", config.MAX_REDIS_TTL, None),
    "ISOCACHE_WAIT_TIMEOUT": ("wait_timeout", config.MAX_WAIT_TIMEOUT, config.DEFAULT_WAIT_TIMEOUT),
    "ISOCACHE_COMPILE_WORKERS": ("compile_workers", config.max_compile_workers(), None),
}


@pytest.mark.parametrize("value", HUGE_VALUES)
@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_numbers_are_bounded_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    """Out of range is clamped (a huge number) or the default (not a number at all), with one
    warning naming the variable, the value and what is used; a 400-digit number costs nothing."""
    caplog.set_level(logging.WARNING, logger="isocache")
    field, top, default = NUMERIC[name]
    monkeypatch.setenv("ISOCACHE_DIR", "/bounds")  # an environment no other test parsed
    monkeypatch.setenv(name, value)
    start = time.perf_counter()
    used = getattr(config.current(), field)
    assert time.perf_counter() - start < 0.5
    assert used == (top if value.isdigit() else default)
    monkeypatch.setenv("ISOCACHE_DIR", "/bounds/elsewhere")  # another environment, same value
    assert getattr(config.current(), field) == used
    (warning,) = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert value[:20] in warning and "using" in warning
    if value.isdigit():
        assert f"using {int(top)}" in warning and "maximum" in warning


def test_small_values_are_raised_to_the_minimum(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="isocache")
    monkeypatch.setenv("ISOCACHE_DIR", "/bounds")
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "100")
    assert config.current().max_bytes == config.MIN_MAX_BYTES
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "ISOCACHE_MAX_BYTES='100'" in warning and f"using {config.MIN_MAX_BYTES}" in warning
    monkeypatch.setenv("ISOCACHE_MAX_BYTES", "300K")  # in range: no warning
    assert config.current().max_bytes == 300 * 1024
    assert len(caplog.records) == 1


def test_arguments_are_bounded_too(caplog: pytest.LogCaptureFixture) -> None:
    from isocache.backend import Backend

    caplog.set_level(logging.WARNING, logger="isocache")
    assert Backend(cache_dir=False, wait_timeout=10**400).wait_timeout == config.MAX_WAIT_TIMEOUT
    assert Backend(cache_dir=False, wait_timeout=float("inf")).wait_timeout == config.MAX_WAIT_TIMEOUT
    assert Backend(cache_dir=False, wait_timeout=float("nan")).wait_timeout == 0.0
    assert Backend(cache_dir=False, wait_timeout=-5).wait_timeout == 0.0
    assert Backend(cache_dir=False, wait_timeout=30).wait_timeout == 30.0
    assert config.clamp("compile_workers", 10**30, 0, config.max_compile_workers(), 0) == config.max_compile_workers()
    assert 4 <= config.max_compile_workers() <= 64
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5, warnings
    assert all(w.startswith("isocache: wait_timeout=") or "compile_workers=" in w for w in warnings)
    assert "(401 characters)" in warnings[0], "a 400-digit number is cut in the warning"


def test_a_compile_with_out_of_range_numbers_succeeds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The review's reproduction: these raised OverflowError in the store (and a PanicException on
    a lease wait), which torch turned into BackendCompilerFailed."""
    import torch

    import isocache

    caplog.set_level(logging.WARNING, logger="isocache")
    for name in NUMERIC:
        monkeypatch.setenv(name, "1" * 400)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x) * 3 - 1

    x = torch.randn(8)
    backend = isocache.Backend(cache_dir=tmp_path / "cache", compile_workers=0, wait_timeout=float("inf"))
    out = torch.compile(f, backend=backend)(x)
    assert torch.allclose(out, f(x))
    store = _core.Store(tmp_path / "cache", namespace=_core.list_namespaces(tmp_path / "cache")[0], create=False)
    assert store.objects(), "the piece was stored under the clamped cap"
    for name in NUMERIC:
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
