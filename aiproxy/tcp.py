# -*- test-case-name: tests.test_upstream -*-
"""
TCP socket options of both legs: the client's connections and the
upstream's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["set_no_delay"]


def set_no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on a TCP transport (small writes go out at
    once); other transports are left alone.
    """
    set_tcp_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_tcp_no_delay is not None:
        try:
            set_tcp_no_delay(True)
        except OSError:
            pass
