"""The command line: ``python -m isocache [--dir D] [--json] COMMAND [options]``.

One grammar for every command: the global options ``--dir`` (the store root,
default ``$ISOCACHE_DIR`` or ``~/.cache/isocache``) and ``--json`` (one JSON
document on stdout instead of text) go before or after the command's name.
A command is one `Command` in `COMMANDS`; it gets ``--dir`` and ``--json``
from there.

Only ``demo`` imports torch. ``stats``, ``ls``, ``explain`` and ``verify``
(without ``--fix``) open stores read-only and change nothing on disk; ``gc``,
``clear`` and ``verify --fix`` never follow a symbolic link.

Exit status: 0 when the command did what it was asked (also when whoever
reads its output stops early: ``stats | head``); 1 on a failure (an insecure
or unreadable store, ``verify`` finding bad artifacts, a demo whose output
does not match eager), printed as one line on stderr; 2 on a usage error (an
unknown command or option, an argument naming nothing usable such as
``stats --diff`` with an unknown namespace).

This module parses the arguments and dispatches; the commands live in
`_cli_store` (stats, ls, verify, gc, clear), `_cli_explain`, `_cli_demo` and `_cli_pack` (pack, unpack).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Callable

from ._cli_common import UsageError, emit
from ._cli_demo import demo_arguments, demo_command
from ._cli_explain import explain_command
from ._cli_pack import pack_arguments, pack_command, unpack_arguments, unpack_command
from ._cli_store import (
    clear_command,
    gc_arguments,
    gc_command,
    ls_command,
    stats_arguments,
    stats_command,
    verify_arguments,
    verify_command,
)

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

#: Exit statuses (documented in the README and in ``--help``).
OK, FAILURE, USAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its name, its one-line help, what runs it (given the parsed arguments, it returns
    the exit status) and, if it has options of its own, what adds them to its parser."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: Whether it reads or writes the store under ``--dir`` (``keygen`` does not).
    uses_store: bool = True


def _keygen(args: argparse.Namespace) -> int:
    import secrets

    key = secrets.token_hex(32)
    export = f"export ISOCACHE_KEY={key}"
    emit(args, {"key": key, "export": export}, key)
    if not args.json:
        print(f"set it in every process that shares the store or the Redis server: {export}", file=sys.stderr)
    return OK


#: Every subcommand, in the order ``--help`` lists them. A new command is one entry here.
COMMANDS: list[Command] = [
    Command("demo", "compile a Llama built from a config and check it against eager", demo_command, demo_arguments),
    Command("stats", "artifact counts, bytes, hit rate and compile time saved", stats_command, stats_arguments),
    Command("ls", "list artifacts (pieces and models) with size, last use and compile time", ls_command),
    Command(
        "verify",
        "check every artifact's checksum (and signature with ISOCACHE_KEY)",
        verify_command,
        verify_arguments,
    ),
    Command("explain", "for each model saved by isocache.compile: its pieces grouped by digest", explain_command),
    Command(
        "gc",
        "evict least-recently-used artifacts, across namespaces, down to the size cap",
        gc_command,
        gc_arguments,
    ),
    Command("clear", "remove every artifact", clear_command),
    Command("keygen", "print a new random signing key for ISOCACHE_KEY", _keygen, uses_store=False),
    Command("pack", "write what a store holds into one archive file", pack_command, pack_arguments),
    Command(
        "unpack",
        "verify a packed archive whole, then add what it holds to a store",
        unpack_command,
        unpack_arguments,
    ),
]

_EPILOG = (
    "--dir and --json may come before or after the command. "
    "Exit status: 0 ok, 1 failure (one line on stderr), 2 usage error."
)


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """``--dir`` and ``--json``: with their defaults on the top-level parser; on a command's parser
    without (``argparse.SUPPRESS``), so a value given before the command is kept."""
    from ._maintenance import default_root

    parser.add_argument(
        "--dir",
        default=default_root() if defaults else argparse.SUPPRESS,
        help="store root (default: $ISOCACHE_DIR or ~/.cache/isocache)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="one JSON document on stdout instead of text",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m isocache", description="isocache: a compile cache for PyTorch", epilog=_EPILOG
    )
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        cmd = sub.add_parser(command.name, help=command.help, description=command.help, epilog=_EPILOG)
        _global_options(cmd, defaults=False)
        if command.arguments is not None:
            command.arguments(cmd)
        cmd.set_defaults(func=command.run, uses_store=command.uses_store)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    from ._core import CacheError

    args = build_parser().parse_args(argv)
    if args.dir is None and args.uses_store:
        print("isocache: no store directory: set ISOCACHE_DIR or pass --dir", file=sys.stderr)
        return FAILURE
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except BrokenPipeError:
        raise
    except (CacheError, OSError) as e:
        print("isocache: " + " ".join(str(e).split()), file=sys.stderr)
        return FAILURE
    except UsageError as e:
        print(f"isocache: {e}", file=sys.stderr)
        return USAGE
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # Whoever reads the output stopped (`stats | head`): not a failure. Python would flush stdout
        # again at exit and print a second error: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return OK


if __name__ == "__main__":
    sys.exit(main())
