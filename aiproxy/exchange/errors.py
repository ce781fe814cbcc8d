# -*- test-case-name: tests.test_relay -*-
"""
The bodies of the gateway's own error answers.
"""

from __future__ import annotations

import json

__all__ = ["error_body", "held_error_body", "upstream_error_message"]


def error_body(message: str) -> bytes:
    """
    The JSON body C{{"message": message}}.
    """
    return json.dumps({"message": message}).encode("utf-8")


def held_error_body(error: bytes | None) -> bytes:
    """
    The body of the 502 a held stream gets when every instance failed: its
    in-band error event's data when that is JSON, else a JSON message.
    """
    if error is not None:
        try:
            json.loads(error)
        except ValueError:
            message = f"upstream stream failed: {error.decode('utf-8', 'replace')}"
        else:
            return error
    else:
        message = "upstream ended the stream before any content"
    return error_body(message)


def upstream_error_message(status: int, body: bytes) -> str:
    """
    What an upstream error body says, for an in-band error event.
    """
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f"upstream returned status {status}: {error['message']}"
        if isinstance(document.get("message"), str):
            return f"upstream returned status {status}: {document['message']}"
    if status < 300:
        return "upstream returned a non-streamed response to a streamed request"
    return f"upstream returned status {status}"
