"""The ``isocache`` logger's one prefix: each message starts with ``isocache: `` (what Python's
last-resort handler prints when the application configured no logging, and what ``TORCH_LOGS=isocache``
shows after the file name); a handler whose format already names the logger (``logging.basicConfig()``'s
``INFO:isocache:...``) gets the message without it, so no line reads ``isocache:isocache: ...``."""

from __future__ import annotations

import logging

__all__ = ["PREFIX", "install"]

PREFIX = "isocache: "

logger = logging.getLogger("isocache")


def _names_logger(handler: logging.Handler) -> bool:
    """Whether `handler` is a plain stream or file handler (what ``logging.basicConfig`` and
    ``dictConfig`` make; not a test's capturing handler) whose format shows the logger's name
    (``%(name)s``, ``{name}`` or ``${name}``)."""
    if type(handler) not in (logging.StreamHandler, logging.FileHandler):
        return False
    fmt = getattr(handler.formatter, "_fmt", None)
    return isinstance(fmt, str) and ("%(name)" in fmt or "{name" in fmt or "$name" in fmt)


def _handlers(record_logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of `record_logger` reaches (empty: Python's last-resort handler prints it)."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = record_logger
    while current is not None:
        found.extend(current.handlers)
        current = current.parent if current.propagate else None
    return found


class _OnePrefix(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        prefixed = isinstance(record.msg, str) and record.msg.startswith(PREFIX)
        if prefixed and any(_names_logger(h) for h in _handlers(logger)):
            record.msg = record.msg[len(PREFIX) :]
        return True


_FILTER = _OnePrefix()


def install() -> None:
    """Puts the filter on the ``isocache`` logger (once, however often called)."""
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
