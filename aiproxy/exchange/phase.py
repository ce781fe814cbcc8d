# -*- test-case-name: tests.test_proxy -*-
"""
The phase of an exchange: one value, held by the exchange alone.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["OVER", "Phase"]


class Phase(Enum):
    """
    Where an exchange is.
    """

    #: Checking the client's request, running the request filters.
    PREPARING = "preparing"
    #: An attempt was sent; its status and headers are awaited.
    WAITING = "waiting"
    #: A stream is held back until its first content (C{stream_commit_ms}).
    HOLDING = "holding"
    #: A stream is relayed to the client.
    RELAYING = "relaying"
    #: A whole body is being collected.
    COLLECTING = "collecting"
    #: Nothing more goes to the client; the upstream is stopped.
    ENDED = "ended"
    #: The access record was written.
    RECORDED = "recorded"


#: The phases after which nothing more goes to the client.
OVER = frozenset({Phase.ENDED, Phase.RECORDED})
