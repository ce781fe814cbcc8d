# -*- test-case-name: tests.test_filters -*-
"""
Filter results and the body-filter chain.

A route's body filters run on every downstream chunk in priority order
(higher first); a C{Replace} feeds the next filter, a C{Terminate} stops the
chain for the rest of the response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from zope.interface import implementer

from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory, IStreamStage

__all__ = ["BodyFilterChain", "Reject", "Replace", "Terminate", "open_chain"]


@dataclass(frozen=True, slots=True)
class Replace:
    """
    Send C{data} instead of the chunk (C{b""} holds it back).
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class Terminate:
    """
    End the response: C{data} are its last bytes. When nothing was sent
    yet, the client gets C{status} with C{data} as the whole body, with
    C{content_type}.
    """

    data: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    reason: str = "terminated_by_filter"


@dataclass(frozen=True, slots=True)
class Reject:
    """
    A request filter's answer instead of calling upstream: C{status} with
    C{body} serialised as JSON.
    """

    status: int
    body: Mapping[str, Any] = field(default_factory=dict)


@implementer(IStreamStage)
class BodyFilterChain:
    """
    The body filters of one response, in order.

    @ivar terminated: a filter ended the response; nothing runs again.
    """

    __slots__ = ("_filters", "terminated")

    def __init__(self, filters: Sequence[IBodyFilter]) -> None:
        self._filters = tuple(filters)
        self.terminated = False

    def filter_chunk(self, chunk: bytes, context: Any) -> bytes | Terminate:
        """
        Run one chunk through every filter.

        @return: the bytes to send, or the L{Terminate} that ended the chain.
        @raise TypeError: if a filter returned something else than L{None},
            L{Replace} or L{Terminate}.
        """
        if self.terminated:
            return b""
        return self._through(chunk, 0, context)

    def finish(self, context: Any) -> bytes | Terminate:
        """
        The final call of every filter at the end of the response; bytes
        returned by a filter pass through the filters after it.

        @return: the bytes to send last, or a L{Terminate}. When output has
            already started, the L{Terminate}'s data is preceded by the
            bytes that earlier filters' final calls produced and the
            terminating filter let pass; otherwise the L{Terminate} replaces
            the whole response and those bytes are dropped with it.
        @raise TypeError: if a filter returned something else than L{None},
            L{Replace} or L{Terminate}.
        """
        if self.terminated:
            return b""
        tail = b""
        for position, body_filter in enumerate(self._filters):
            result: Replace | Terminate | bytes | None = _checked(
                body_filter, body_filter.finish(context)
            )
            if isinstance(result, Replace) and result.data:
                result = self._through(result.data, position + 1, context)
                if isinstance(result, bytes):
                    tail += result
                    continue
            if isinstance(result, Terminate):
                self.terminated = True
                if tail and getattr(context, "output_started", True):
                    return replace(result, data=tail + result.data)
                return result
        return tail

    def _through(self, chunk: bytes, start: int, context: Any) -> bytes | Terminate:
        """
        Run C{chunk} through the filters from position C{start} on.
        """
        for body_filter in self._filters[start:] if start else self._filters:
            result = body_filter.filter_chunk(chunk, context)
            if result is None:
                continue
            if isinstance(result, Replace):
                chunk = result.data
            elif isinstance(result, Terminate):
                self.terminated = True
                return result
            else:
                _checked(body_filter, result)
        return chunk


def _checked(body_filter: IBodyFilter, result: object) -> Replace | Terminate | None:
    """
    C{result} if it is a filter result, else L{TypeError} naming the filter
    (returning bare bytes instead of a L{Replace} is an easy mistake, and
    would otherwise end the response quietly).
    """
    if result is None or isinstance(result, (Replace, Terminate)):
        return result
    raise TypeError(f"{body_filter!r} returned {result!r}, not None, Replace or Terminate")


def open_chain(factories: Iterable[IBodyFilterFactory], context: Any) -> BodyFilterChain | None:
    """
    Start the body filters of one response.

    @param factories: the route's body-filter factories, in priority order.
    @return: the chain, or L{None} when no filter takes part (the hot path
        then skips filtering and text collection entirely).
    """
    filters = [f for f in (factory.body_filter(context) for factory in factories) if f is not None]
    for body_filter in filters:
        if not IBodyFilter.providedBy(body_filter):
            raise TypeError(f"{body_filter!r} does not provide IBodyFilter")
    return BodyFilterChain(filters) if filters else None
