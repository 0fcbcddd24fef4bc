"""Replies from Redis are untrusted input: one deadline per call, and no bulk reply beyond a maximum.

redis-py's socket timeout bounds each read, so a server (or a proxy) that
sends a reply one byte at a time stalls a call for as long as it likes, and a
``$2000000000`` header makes the client read two gigabytes into memory. The
parser made here (`guarded_parser`) reads through `budget()`: while a call
runs under a budget, every read waits at most for what is left of the call's
deadline, and a bulk reply announcing more than the budget's ``max_bulk``
bytes is refused from its header, before its body is read. Either failure
raises, and redis-py then drops the connection (its reply is half read). So
does an aggregate reply (array, map, set) announcing more than `MAX_ELEMENTS`
elements in one call: isocache's replies have a handful.

Only redis-py's pure-Python parsers are guarded (RESP2, and RESP3 for a URL
that asks for it; hiredis parses in C where nothing can hook the length
header), so the client is made with one of them whether hiredis is installed
or not, and with RESP2 unless the URL says otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["MAX_ELEMENTS", "Budget", "budget", "guarded_parser", "reply_too_large"]

#: The most elements of aggregate replies (arrays, maps, sets) one call accepts.
MAX_ELEMENTS = 4096


class Budget(threading.local):
    """The running call's deadline (`time.monotonic`) and largest bulk reply, per thread."""

    deadline: float | None = None
    max_bulk: int | None = None
    elements: int = 0


_current = Budget()


@contextlib.contextmanager
def budget(seconds: float, max_bulk: int) -> Iterator[None]:
    """Runs the block as one call: reads end `seconds` from now, bulk replies hold at most `max_bulk` bytes."""
    saved = (_current.deadline, _current.max_bulk, _current.elements)
    _current.deadline = time.monotonic() + seconds
    _current.max_bulk = max_bulk
    _current.elements = 0
    try:
        yield
    finally:
        _current.deadline, _current.max_bulk, _current.elements = saved


@functools.cache
def reply_too_large() -> type[Exception]:
    """The error of a bulk reply announcing more bytes than the call allows (imports redis)."""
    from redis.exceptions import DataError

    class ReplyTooLarge(DataError):
        pass

    return ReplyTooLarge


@functools.cache
def guarded_parser(protocol: int = 2) -> type[Any]:
    """redis-py's RESP2 (or RESP3) parser reading through the running `budget` (imports redis)."""
    from redis._parsers import _RESP2Parser, _RESP3Parser
    from redis._parsers import socket as parsers_socket
    from redis._parsers.socket import SocketBuffer
    from redis.exceptions import TimeoutError

    sentinel = vars(parsers_socket)["SENTINEL"]  # "no timeout given" in redis-py's reads
    too_large = reply_too_large()

    class GuardedBuffer(SocketBuffer):
        def read(self, length: int, timeout: Any = sentinel) -> bytes:
            limit = _current.max_bulk
            if limit is not None and length > limit:
                raise too_large(f"a reply of {length} bytes is larger than the maximum of {limit}")
            data: bytes = super().read(length, timeout)
            return data

        def readline(self, timeout: Any = sentinel) -> bytes:
            line: bytes = super().readline(timeout)
            if _current.deadline is not None and line[:1] in (b"*", b"%", b"~", b">") and line[1:].isdigit():
                _current.elements += int(line[1:])
                if _current.elements > MAX_ELEMENTS:
                    raise too_large(f"a reply of more than {MAX_ELEMENTS} elements")
            return line

        def _read_from_socket(
            self, length: int | None = None, timeout: Any = sentinel, raise_on_timeout: bool | None = True
        ) -> bool:
            deadline = _current.deadline
            if deadline is None:
                done: bool = super()._read_from_socket(length, timeout, raise_on_timeout)
                return done
            missing = length or 0
            while True:  # one recv at a time, each waiting at most for what is left of the call
                left = deadline - time.monotonic()
                if left <= 0:
                    if not raise_on_timeout:
                        return False
                    raise TimeoutError("the Redis call ran past its deadline")
                wait = left if timeout is sentinel or timeout is None else min(left, timeout)
                before = self.unread_bytes()
                if not super()._read_from_socket(None, wait, raise_on_timeout):
                    return False
                missing -= self.unread_bytes() - before
                if missing <= 0:
                    return True

    class GuardedParser(_RESP3Parser if protocol == 3 else _RESP2Parser):  # type: ignore[misc]
        def on_connect(self, connection: Any) -> None:
            super().on_connect(connection)
            self._buffer = GuardedBuffer(connection._sock, self.socket_read_size, connection.socket_timeout)

    return GuardedParser
