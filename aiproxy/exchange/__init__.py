# -*- test-case-name: tests.test_proxy -*-
"""
The request path: one L{Exchange} per proxied request, made of its
L{aiproxy.exchange.failover.Failover} (attempts and fallback),
L{aiproxy.exchange.deadlines.Deadlines} (timers), relays
(L{aiproxy.exchange.relay}, L{aiproxy.exchange.held},
L{aiproxy.exchange.buffered}) and one
L{aiproxy.exchange.downstream.Downstream} (the client's response).
"""

from aiproxy.exchange.exchange import Exchange, Phase

__all__ = ["Exchange", "Phase"]
