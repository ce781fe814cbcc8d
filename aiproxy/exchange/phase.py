# -*- test-case-name: tests.test_proxy -*-
"""
The phase of an exchange: one value, held by the exchange alone.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["OVER", "Phase"]


class Phase(IntEnum):
    """
    Where an exchange is (an C{IntEnum}: it is looked at on every request
    many times, and an int compares and hashes at C speed).
    """

    #: Checking the client's request, running the request filters.
    PREPARING = 1
    #: An attempt was sent; its status and headers are awaited.
    WAITING = 2
    #: A stream is held back until its first content (C{stream_commit_ms}).
    HOLDING = 3
    #: A stream is relayed to the client.
    RELAYING = 4
    #: A whole body is being collected.
    COLLECTING = 5
    #: Nothing more goes to the client; the upstream is stopped.
    ENDED = 6
    #: The access record was written.
    RECORDED = 7


#: The phases after which nothing more goes to the client.
OVER = frozenset({Phase.ENDED, Phase.RECORDED})
