# -*- test-case-name: tests.test_mock_upstream -*-
"""
The command line of the mock upstream: its options and L{main}.
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from aiproxy.testing.upstream.resource import MockUpstream, _describe, _site

__all__ = ["DEFAULT_LISTEN", "Options", "main"]

DEFAULT_LISTEN = "tcp:port=7751:interface=127.0.0.1"
"""The endpoint the command line listens on when given neither option."""


class Options(usage.Options):
    """
    The command line of C{python -m aiproxy.testing.upstream}.
    """

    synopsis = "python -m aiproxy.testing.upstream [--listen ENDPOINT | --port N]"
    longdesc = (
        "Serve a deterministic mock LLM upstream (OpenAI chat completions, "
        "Anthropic Messages, OpenAI Responses, embeddings); controls and "
        "resources are described in aiproxy.testing.upstream."
    )
    optParameters = [
        ["listen", "l", None, f"Server endpoint string to listen on [default: {DEFAULT_LISTEN}]."],
        ["port", "p", None, "Shorthand for --listen tcp:port=N:interface=127.0.0.1.", int],
    ]

    def postOptions(self) -> None:
        """
        Resolve C{--port} and the default into C{self["listen"]}.

        @raise usage.UsageError: Both options are given, or the port is out
            of range.
        """
        port = self["port"]
        if port is None:
            self["listen"] = self["listen"] or DEFAULT_LISTEN
            return
        if self["listen"] is not None:
            raise usage.UsageError("give --listen or --port, not both")
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"port out of range: {port}")
        self["listen"] = f"tcp:port={port}:interface=127.0.0.1"


async def _serve(reactor: IReactorTime, endpoint: str) -> None:
    """
    Listen, announce readiness on stdout, then serve until the reactor stops.

    @param reactor: The reactor.
    @param endpoint: A server endpoint string.
    """
    upstream = MockUpstream(reactor)
    port = await serverFromString(reactor, endpoint).listen(_site(upstream))
    print(f"mock upstream listening on {_describe(port.getHost())}", flush=True)
    await Deferred()


def main(argv: list[str] | None = None) -> None:
    """
    Run the mock upstream from the command line; logs go to stderr at info
    level and above.

    @param argv: The arguments, C{sys.argv[1:]} when C{None}.
    """
    from twisted.internet.task import react

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        raise SystemExit(f"{error}\n{options}") from None
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    react(_serve, [options["listen"]])
