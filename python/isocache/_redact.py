"""Secrets never reach a log line: URLs with their passwords and secret query parameters redacted.

Only the secrets go; the rest stays readable, so a message still says which
server, port, database and options were meant:
``rediss://alice:pw@host:6380/1?password=x&ssl_cert_reqs=none`` ->
``rediss://alice:***@host:6380/1?password=***&ssl_cert_reqs=none``.

Redacted: the password of the user info (all of the user info when it has no
``:``, since people put a bare password there), the value of a query
parameter named like a secret (``password``, ``pass``, ``passwd``, ``pwd``,
``auth``, ``token``, ``secret``, ``ssl_password``, ...), a port that is not a
number (a password put in the wrong place) and the fragment (never sent to
Redis; a password after a stray ``#``).
"""

from __future__ import annotations

import urllib.parse

__all__ = ["redact_url", "scrub"]

_SECRET_PARAMS = {"pass", "pwd", "auth", "key"}
_SECRET_PARTS = ("password", "passwd", "secret", "token", "credential")


def _is_secret_param(name: str) -> bool:
    name = urllib.parse.unquote_plus(name).strip().lower()
    return name in _SECRET_PARAMS or any(part in name for part in _SECRET_PARTS)


def _split_port(hostport: str) -> tuple[str, str | None]:
    """(host, port or None); IPv6 literals in brackets keep their colons."""
    head, bracket, tail = hostport.rpartition("]")
    host, colon, port = tail.rpartition(":")
    if not colon:
        return hostport, None
    return head + bracket + host, port


def redact_url(url: str) -> str:
    """The URL with its password, secret query parameters, a non-numeric port and the fragment as ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = ""
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@" if colon else "***@"
    host, port = _split_port(hostport)
    netloc += host if port is None else f"{host}:{port if port.isdigit() or not port else '***'}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    fragment = "***" if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}=***" if eq and _is_secret_param(name) else param


def _secrets_of(url: str) -> list[str]:
    """Every secret string in `url`, raw and percent-decoded, longest first."""
    found: set[str] = set()
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        _, colon, password = userinfo.partition(":")
        found.add(password if colon else userinfo)
    _, port = _split_port(hostport)
    if port and not port.isdigit():  # what stands where the port should be may be a password
        found.add(port)
    for param in parts.query.split("&"):
        name, eq, value = param.partition("=")
        if eq and _is_secret_param(name):
            found.add(value)
    if parts.fragment:
        found.add(parts.fragment)
    found |= {urllib.parse.unquote_plus(s) for s in found} | {urllib.parse.unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (an error message) with `url` redacted and every secret of it replaced by ``***``."""
    text = text.replace(url, redact_url(url))
    for secret in _secrets_of(url):
        text = text.replace(secret, "***")
    return text
