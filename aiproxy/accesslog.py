# -*- test-case-name: tests.test_logs -*-
"""
The access log: one JSON object per request, through C{twisted.logger}.

Each record is a log event in the C{aiproxy.access} namespace carrying the
record as C{access_json}: the default text observer prints it after its
usual prefix, and L{aiproxy.logs.GatewayLogObserver} prints it as a bare
JSON line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

__all__ = ["ACCESS_NAMESPACE", "log_access"]

ACCESS_NAMESPACE = "aiproxy.access"

_log = Logger(namespace=ACCESS_NAMESPACE)
_encode = json.JSONEncoder(separators=(",", ":")).encode


def log_access(record: Mapping[str, Any]) -> None:
    """
    Emit one access record (figures and names only, never credentials).
    """
    _log.info("{access_json}", access_json=_encode(record), access_record=record)
