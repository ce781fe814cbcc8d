# -*- test-case-name: tests.test_logs -*-
"""
The daemon's log observer: one line per event on a text stream, access
records as bare JSON objects, everything else as classic Twisted log text.

The gateway installs it when twistd is given no C{--logfile}/C{--logger}
(so C{twistd -n aiproxy} prints to stdout);
C{--logger=aiproxy.logs.json_observer} selects instead an observer writing
every event as one JSON object (e.g. for journald).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    eventAsJSON,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

from aiproxy.accesslog import ACCESS_NAMESPACE

__all__ = ["GatewayLogObserver", "json_observer", "text_observer"]


@implementer(ILogObserver)
class GatewayLogObserver:
    """
    Writes access records as bare JSON lines and other events as text.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE and "access_json" in event:
            line = event["access_json"] + "\n"
        else:
            line = formatEventAsClassicLogText(event)
            if not line:
                return
        self._stream.write(line)
        self._stream.flush()


def text_observer(stream: IO[str] | None = None) -> GatewayLogObserver:
    """
    The default observer: text lines and bare-JSON access records on stdout.
    """
    return GatewayLogObserver(stream or sys.stdout)


def json_observer(stream: IO[str] | None = None) -> FileLogObserver:
    """
    Every event as one JSON object per line on stdout (C{--logger=aiproxy.logs.json_observer}).
    """
    return FileLogObserver(stream or sys.stdout, lambda event: eventAsJSON(event) + "\n")
