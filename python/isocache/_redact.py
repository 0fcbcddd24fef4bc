"""Secrets never reach a log line: URLs with their user info and password parameters redacted."""

from __future__ import annotations

import urllib.parse

__all__ = ["redact_url", "scrub"]

_SECRET_PARAMS = {"password", "username", "user", "pass", "passwd"}


def redact_url(url: str) -> str:
    """The URL without user info (user and password) or secret query parameters.

    ``redis://user:pw@host:6379/0?password=x`` -> ``redis://***@host:6379/0?password=***``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    _, at, hostport = netloc.rpartition("@")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number (a password in the wrong place)
    except ValueError:
        hostport = "***"
    netloc = f"***@{hostport}" if at else hostport
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    fragment = "***" if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _redact_param(param: str) -> str:
    name, _, _ = param.partition("=")
    if urllib.parse.unquote_plus(name).strip().lower() in _SECRET_PARAMS:
        return f"{name}=***"
    return param


def _secrets_of(url: str) -> list[str]:
    """Every secret string in `url`, raw and percent-decoded, longest first."""
    found: set[str] = set()
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        found.add(userinfo)
        found.update(userinfo.split(":", 1))
    try:
        parts.port  # noqa: B018
    except ValueError:  # what stands where the port should be may be a password
        found.add(hostport)
        found.add(hostport.rpartition(":")[2])
    for param in parts.query.split("&"):
        name, eq, value = param.partition("=")
        if eq and urllib.parse.unquote_plus(name).strip().lower() in _SECRET_PARAMS:
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
