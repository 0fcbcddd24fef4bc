"""The command line: ``python -m isocache demo | stats | ls | verify | gc | clear | explain | keygen | pack | unpack``.

Only ``demo`` imports torch. ``stats``, ``ls``, ``explain`` and ``verify``
(without ``--fix``) open stores read-only and change nothing on disk; ``gc``,
``clear`` and ``verify --fix`` never follow a symbolic link. Errors (an
insecure store, an unreadable directory) are one line on stderr and exit
status 1; an argument naming nothing usable (``stats --diff`` with an
unknown namespace) is one line and exit status 2.

This module parses the arguments and dispatches; the commands live in
`_cli_store` (stats, ls, verify, gc, clear), `_cli_explain`, `_cli_demo` and `_cli_pack` (pack, unpack).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._cli_common import UsageError
from ._cli_demo import demo_command
from ._cli_explain import explain_command
from ._cli_pack import add_commands as add_pack_commands
from ._cli_store import clear_command, gc_command, ls_command, stats_command, verify_command

__all__ = ["main"]


def _keygen(args: argparse.Namespace) -> int:
    import secrets

    key = secrets.token_hex(32)
    print(key)
    print(
        f"set it in every process that shares the store or the Redis server: export ISOCACHE_KEY={key}",
        file=sys.stderr,
    )
    return 0


def _byte_count(text: str) -> int:
    """A size cap for `gc --max-bytes`: bytes (0 or more) or a size such as 10G."""
    from .config import parse_size

    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    try:
        return parse_size(stripped)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (0 or more bytes)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isocache", description="isocache: a compile cache for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a Llama built from a config and check it against eager")
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--seq", type=int, default=32)
    demo.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--cache-dir", default=None, help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)")
    demo.set_defaults(func=demo_command)

    keygen = sub.add_parser("keygen", help="print a new random signing key for ISOCACHE_KEY")
    keygen.set_defaults(func=_keygen)

    from ._maintenance import default_root

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", default=default_root(), help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    for name, func, text in (
        ("stats", stats_command, "artifact counts, bytes, hit rate and compile time saved"),
        ("ls", ls_command, "list artifacts (pieces and models) with size, last use and compile time"),
        ("verify", verify_command, "check every artifact's checksum (and signature with ISOCACHE_KEY)"),
        ("explain", explain_command, "for each model saved by isocache.compile: its pieces grouped by digest"),
        ("gc", gc_command, "evict least-recently-used artifacts, across namespaces, down to the size cap"),
        ("clear", clear_command, "remove every artifact"),
    ):
        cmd = sub.add_parser(name, help=text, parents=[common])
        cmd.set_defaults(func=func)
        if name == "stats":
            cmd.add_argument(
                "--diff",
                nargs=2,
                metavar=("NS1", "NS2"),
                help="name the fields in which two namespaces differ (a unique prefix of each will do)",
            )
        if name == "verify":
            cmd.add_argument("--fix", action="store_true", help="move bad artifacts to quarantine")
        if name == "gc":
            cmd.add_argument(
                "--max-bytes",
                type=_byte_count,
                default=None,
                help="cap, e.g. 5G (default: $ISOCACHE_MAX_BYTES or 10 GiB)",
            )
    add_pack_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._core import CacheError

    args = build_parser().parse_args(argv)
    if getattr(args, "dir", "") is None:
        print("isocache: no store directory: set ISOCACHE_DIR or pass --dir", file=sys.stderr)
        return 1
    try:
        code: int = args.func(args)
    except (CacheError, OSError) as e:
        print("isocache: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"isocache: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
