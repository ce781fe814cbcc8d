# -*- test-case-name: tests.test_listener -*-
"""
The C{Host} header of a request, as RFC 9112 §3.2 wants it: exactly one on
HTTP/1.1, with a valid C{uri-host [":" port]}.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

__all__ = ["host_problem"]

# RFC 3986 reg-name (unreserved, pct-encoded, sub-delims) without ",": a
# comma list is several hosts, not one.
_REG_NAME = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+;=]|%[0-9A-Fa-f]{2})+")
_PORT = re.compile(rb"[0-9]{1,5}")


#: Host header values found valid (most clients send the same few).
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_KEPT = 1024


def _valid_host(value: bytes) -> bool:
    """
    Whether C{value} is C{uri-host [":" port]}: a reg-name, an IPv4
    address or a bracketed IPv6 address, with a port from 0 to 65535.
    """
    if value in _VALID_HOSTS:
        return True
    valid = _checked_host(value)
    if valid:
        if len(_VALID_HOSTS) >= _VALID_HOSTS_KEPT:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(value)
    return valid


def _checked_host(value: bytes) -> bool:
    """
    L{_valid_host}, checked.
    """
    if value.startswith(b"["):
        literal, bracket, port = value[1:].partition(b"]")
        if not bracket or b"%" in literal:
            return False
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
    else:
        host, _, _ = value.partition(b":")
        port = value[len(host) :]
        if _REG_NAME.fullmatch(host) is None:
            return False
    if not port:
        return True
    digits = port[1:]
    return port[:1] == b":" and _PORT.fullmatch(digits) is not None and int(digits) <= 65535


def host_problem(values: Sequence[bytes] | None, version: bytes) -> str | None:
    """
    What is wrong with a request's C{Host} header lines (RFC 9112 §3.2),
    or L{None}: an HTTP/1.1 request must have exactly one, with a valid
    value; an HTTP/1.0 request may have none.

    @param values: the values of its C{Host} lines, in order.
    @param version: its HTTP version, C{b"HTTP/1.1"} or C{b"HTTP/1.0"}.
    """
    if not values:
        return None if version == b"HTTP/1.0" else "missing Host header"
    if len(values) > 1 or b"," in values[0]:
        return "more than one Host header"
    if not _valid_host(values[0]):
        return "invalid Host header"
    return None
