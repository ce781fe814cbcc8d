# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{aiproxy.logs} and L{aiproxy.accesslog}: one line per event,
access records as bare JSON lines (docs/operations.md).
"""

from __future__ import annotations

import json
import sys
from io import StringIO
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, eventFromJSON
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aiproxy import accesslog
from aiproxy.accesslog import ACCESS_NAMESPACE, log_access
from aiproxy.logs import GatewayLogObserver, json_observer, text_observer

RECORD = {
    "route_id": "chat",
    "instance": "ai-proxy-openai",
    "status": 200,
    "request_type": "ai_stream",
    "prompt_tokens": 3,
    "abort_reason": None,
}


class FlushCountingStream(StringIO):
    """
    A text stream counting its flushes.
    """

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def event(**fields: Any) -> dict[str, Any]:
    """
    A log event as L{Logger} makes them, with C{fields} on top.
    """
    base: dict[str, Any] = {
        "log_time": 1_700_000_000.0,
        "log_level": LogLevel.info,
        "log_namespace": "aiproxy.test",
        "log_format": "upstream {url} failed",
        "url": "http://h/x",
    }
    base.update(fields)
    return base


class GatewayLogObserverTests(SynchronousTestCase):
    """
    L{GatewayLogObserver}: access records as bare JSON, the rest as text.
    """

    def setUp(self) -> None:
        self.stream = FlushCountingStream()
        self.observer = GatewayLogObserver(self.stream)

    def test_interface(self) -> None:
        """
        It is an L{ILogObserver}.
        """
        verifyObject(ILogObserver, self.observer)

    def test_access_record(self) -> None:
        """
        An access event is written as its JSON alone on one line, and
        flushed.
        """
        self.observer(
            event(
                log_namespace=ACCESS_NAMESPACE,
                log_format="{access_json}",
                access_json='{"route_id":"chat","status":200}',
            )
        )
        self.assertEqual(self.stream.getvalue(), '{"route_id":"chat","status":200}\n')
        self.assertEqual(self.stream.flushes, 1)

    def test_text(self) -> None:
        """
        Another event is one classic text line: time, namespace and level,
        and the formatted message.
        """
        self.observer(event())
        text = self.stream.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.endswith("upstream http://h/x failed\n"), text)
        self.assertIn("[aiproxy.test#info]", text)

    def test_access_namespace_without_record(self) -> None:
        """
        An event of the access namespace without a record is text.
        """
        self.observer(event(log_namespace=ACCESS_NAMESPACE))
        self.assertIn("upstream http://h/x failed", self.stream.getvalue())

    def test_empty_event(self) -> None:
        """
        An event with nothing to say writes nothing.
        """
        self.observer({"log_time": 0.0, "log_level": LogLevel.info, "log_namespace": "x"})
        self.assertEqual(self.stream.getvalue(), "")
        self.assertEqual(self.stream.flushes, 0)

    def test_failure(self) -> None:
        """
        A failure is written with its traceback.
        """
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            failure = Failure()
        self.observer(event(log_format="relaying failed", log_failure=failure))
        text = self.stream.getvalue()
        self.assertIn("relaying failed", text)
        self.assertIn("ZeroDivisionError", text)

    def test_stdout_default(self) -> None:
        """
        L{text_observer} writes to standard output by default.
        """
        stdout = StringIO()
        self.patch(sys, "stdout", stdout)
        text_observer()(event())
        self.assertIn("upstream http://h/x failed", stdout.getvalue())


class JSONObserverTests(SynchronousTestCase):
    """
    L{json_observer}: every event as one JSON object per line.
    """

    def test_lines(self) -> None:
        """
        Each event is one line holding the event as JSON.
        """
        stream = StringIO()
        observer = json_observer(stream)
        observer(event())
        observer(
            event(log_namespace=ACCESS_NAMESPACE, log_format="{access_json}", access_json="{}")
        )
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = eventFromJSON(lines[0])
        self.assertEqual((first["log_namespace"], first["url"]), ("aiproxy.test", "http://h/x"))
        self.assertEqual(eventFromJSON(lines[1])["access_json"], "{}")


class AccessLogTests(SynchronousTestCase):
    """
    L{log_access} emits one access event per record.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(
            accesslog, "_log", Logger(namespace=ACCESS_NAMESPACE, observer=self.events.append)
        )

    def test_event(self) -> None:
        """
        The event is at info level in the access namespace, with the record
        as compact JSON and as a mapping.
        """
        log_access(RECORD)
        [emitted] = self.events
        self.assertEqual(emitted["log_namespace"], ACCESS_NAMESPACE)
        self.assertEqual(emitted["log_level"], LogLevel.info)
        self.assertEqual(json.loads(emitted["access_json"]), RECORD)
        self.assertNotIn(" ", emitted["access_json"])
        self.assertEqual(emitted["access_record"], RECORD)

    def test_through_gateway_observer(self) -> None:
        """
        Through the daemon's observer a record is exactly one JSON line.
        """
        stream = StringIO()
        observer = GatewayLogObserver(stream)
        self.patch(accesslog, "_log", Logger(namespace=ACCESS_NAMESPACE, observer=observer))
        log_access(RECORD)
        log_access(dict(RECORD, status=499, abort_reason="client_disconnect"))
        lines = stream.getvalue().splitlines()
        self.assertEqual([json.loads(line)["status"] for line in lines], [200, 499])
