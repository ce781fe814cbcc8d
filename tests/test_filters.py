# -*- test-case-name: tests.test_filters -*-
"""
Tests for L{aiproxy.filters}: the body-filter chain and filter results
(docs/plugins.md).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.filters import BodyFilterChain, Reject, Replace, Terminate, open_chain
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory


@implementer(IBodyFilter)
class RecordingFilter:
    """
    A filter answering each chunk with C{on_chunk(chunk)} and the end with
    C{on_finish()}, recording every call in a shared log.
    """

    def __init__(
        self,
        name: str,
        log: list[tuple[str, str, bytes | None]],
        on_chunk: Callable[[bytes], object] = lambda chunk: None,
        on_finish: Callable[[], object] = lambda: None,
    ) -> None:
        self.name = name
        self.log = log
        self.on_chunk = on_chunk
        self.on_finish = on_finish

    def filter_chunk(self, chunk: bytes, context: object) -> object:
        self.log.append((self.name, "chunk", chunk))
        return self.on_chunk(chunk)

    def finish(self, context: object) -> object:
        self.log.append((self.name, "finish", None))
        return self.on_finish()

    def __repr__(self) -> str:
        return f"<RecordingFilter {self.name}>"


@implementer(IBodyFilter)
class HoldBack:
    """
    Holds every chunk back and releases them all at the end.
    """

    def __init__(self) -> None:
        self.held = b""

    def filter_chunk(self, chunk: bytes, context: object) -> Replace:
        self.held += chunk
        return Replace(b"")

    def finish(self, context: object) -> Replace:
        return Replace(self.held)


@implementer(IBodyFilterFactory)
class Factory:
    """
    Makes C{made()} for every response.
    """

    def __init__(self, made: Callable[[], object]) -> None:
        self.made = made

    def body_filter(self, context: object) -> object:
        return self.made()


def upper(chunk: bytes) -> Replace:
    """
    Upper-case the chunk.
    """
    return Replace(chunk.upper())


class ResultTests(SynchronousTestCase):
    """
    The filter results' defaults.
    """

    def test_terminate_defaults(self) -> None:
        """
        A bare L{Terminate} ends with no more bytes, status 200 (when nothing
        was sent), a JSON content type and the reason C{terminated_by_filter}.
        """
        result = Terminate()
        self.assertEqual(
            (result.data, result.status, result.content_type, result.reason),
            (b"", 200, "application/json", "terminated_by_filter"),
        )

    def test_reject_defaults(self) -> None:
        """
        A L{Reject} has an empty JSON object body by default.
        """
        self.assertEqual(Reject(400).body, {})


class ChainTests(SynchronousTestCase):
    """
    L{BodyFilterChain} runs filters in order on every chunk.
    """

    def setUp(self) -> None:
        self.log: list[tuple[str, str, bytes | None]] = []
        self.context = ExchangeContext("route", "instance", 0.0)

    def make(self, name: str, **kwargs: object) -> RecordingFilter:
        """
        A recording filter logging into C{self.log}.
        """
        return RecordingFilter(name, self.log, **kwargs)  # type: ignore[arg-type]

    def test_interfaces(self) -> None:
        """
        The test filters and factory provide the interfaces they claim.
        """
        verifyObject(IBodyFilter, self.make("a"))
        verifyObject(IBodyFilter, HoldBack())
        verifyObject(IBodyFilterFactory, Factory(HoldBack))

    def test_order_and_pass(self) -> None:
        """
        Filters see each chunk in order; L{None} passes it on unchanged.
        """
        chain = BodyFilterChain([self.make("a"), self.make("b")])
        self.assertEqual(chain.filter_chunk(b"x", self.context), b"x")
        self.assertEqual(chain.filter_chunk(b"y", self.context), b"y")
        self.assertEqual(
            self.log,
            [
                ("a", "chunk", b"x"),
                ("b", "chunk", b"x"),
                ("a", "chunk", b"y"),
                ("b", "chunk", b"y"),
            ],
        )

    def test_replace_feeds_next(self) -> None:
        """
        A L{Replace} is what the next filter sees and what is sent.
        """
        chain = BodyFilterChain([self.make("a", on_chunk=upper), self.make("b")])
        self.assertEqual(chain.filter_chunk(b"abc", self.context), b"ABC")
        self.assertEqual(self.log, [("a", "chunk", b"abc"), ("b", "chunk", b"ABC")])

    def test_replace_empty_holds_back(self) -> None:
        """
        C{Replace(b"")} holds the chunk back: nothing is sent.
        """
        chain = BodyFilterChain([self.make("a", on_chunk=lambda chunk: Replace(b""))])
        self.assertEqual(chain.filter_chunk(b"abc", self.context), b"")

    def test_terminate(self) -> None:
        """
        A L{Terminate} is returned at once; the later filters do not see the
        chunk, and nothing runs again for the rest of the response.
        """
        stop = Terminate(b"data: bye\n\n", 403)
        chain = BodyFilterChain([self.make("a", on_chunk=lambda chunk: stop), self.make("b")])
        self.assertIs(chain.filter_chunk(b"x", self.context), stop)
        self.assertTrue(chain.terminated)
        self.assertEqual(chain.filter_chunk(b"y", self.context), b"")
        self.assertEqual(chain.finish(self.context), b"")
        self.assertEqual(self.log, [("a", "chunk", b"x")])

    def test_finish_calls_every_filter(self) -> None:
        """
        The final call reaches every filter in order; with nothing to add
        it returns no bytes.
        """
        chain = BodyFilterChain([self.make("a"), self.make("b", on_finish=lambda: Replace(b""))])
        self.assertEqual(chain.finish(self.context), b"")
        self.assertEqual(self.log, [("a", "finish", None), ("b", "finish", None)])

    def test_finish_bytes_through_later_filters(self) -> None:
        """
        Bytes returned by a filter's final call pass through the filters
        after it (not those before it), before those filters' own final call.
        """
        held = HoldBack()
        chain = BodyFilterChain(
            [self.make("first", on_chunk=upper), held, self.make("last", on_chunk=upper)]
        )
        self.assertEqual(chain.filter_chunk(b"ab", self.context), b"")
        self.assertEqual(chain.filter_chunk(b"cd", self.context), b"")
        self.assertEqual(held.held, b"ABCD")
        self.log.clear()
        self.assertEqual(chain.finish(self.context), b"ABCD")
        self.assertEqual(
            self.log,
            [("first", "finish", None), ("last", "chunk", b"ABCD"), ("last", "finish", None)],
        )

    def test_finish_tails_concatenated(self) -> None:
        """
        The final bytes of several filters are sent in filter order.
        """
        chain = BodyFilterChain(
            [
                self.make("a", on_finish=lambda: Replace(b"1")),
                self.make("b", on_finish=lambda: Replace(b"2")),
            ]
        )
        self.assertEqual(chain.finish(self.context), b"12")

    def test_finish_terminate(self) -> None:
        """
        A L{Terminate} from a final call ends the chain: the later filters'
        final calls are not made.
        """
        stop = Terminate(b"end")
        chain = BodyFilterChain([self.make("a", on_finish=lambda: stop), self.make("b")])
        self.assertEqual(chain.finish(self.context), stop)
        self.assertTrue(chain.terminated)
        self.assertEqual(self.log, [("a", "finish", None)])

    def test_finish_terminate_after_tail_streaming(self) -> None:
        """
        Once output has started, bytes an earlier filter released at the
        end and the terminating filter let pass are sent before the
        L{Terminate}'s data.
        """
        self.context.output_started = True
        chain = BodyFilterChain(
            [
                self.make("a", on_finish=lambda: Replace(b"held;")),
                self.make("b", on_finish=lambda: Terminate(b"end", 400)),
            ]
        )
        result = chain.finish(self.context)
        self.assertIsInstance(result, Terminate)
        assert isinstance(result, Terminate)
        self.assertEqual((result.data, result.status), (b"held;end", 400))

    def test_finish_terminate_after_tail_not_started(self) -> None:
        """
        Before any output, a L{Terminate} replaces the whole response: the
        released bytes are dropped with it.
        """
        self.context.output_started = False
        stop = Terminate(b'{"error":"no"}', 400)
        chain = BodyFilterChain(
            [
                self.make("a", on_finish=lambda: Replace(b"held")),
                self.make("b", on_finish=lambda: stop),
            ]
        )
        self.assertEqual(chain.finish(self.context), stop)

    def test_finish_tail_terminated_by_later_filter(self) -> None:
        """
        A later filter may terminate on the released bytes; bytes released
        before them still precede its data once output has started.
        """
        self.context.output_started = True
        chain = BodyFilterChain(
            [
                self.make("a", on_finish=lambda: Replace(b"ok;")),
                self.make("b", on_finish=lambda: Replace(b"secret")),
                self.make(
                    "c", on_chunk=lambda chunk: Terminate(b"[cut]") if b"secret" in chunk else None
                ),
            ]
        )
        result = chain.finish(self.context)
        assert isinstance(result, Terminate)
        self.assertEqual(result.data, b"ok;[cut]")
        self.assertTrue(chain.terminated)

    def test_bad_result(self) -> None:
        """
        A filter returning bare bytes (not a L{Replace}) is a L{TypeError}
        naming it, not a quiet end of the response.
        """
        chain = BodyFilterChain([self.make("bad", on_chunk=lambda chunk: b"oops")])
        error = self.assertRaises(TypeError, chain.filter_chunk, b"x", self.context)
        self.assertIn("RecordingFilter bad", str(error))
        self.assertFalse(chain.terminated)
        chain = BodyFilterChain([self.make("bad", on_finish=lambda: "oops")])
        self.assertRaises(TypeError, chain.finish, self.context)


class OpenChainTests(SynchronousTestCase):
    """
    L{open_chain} starts a response's filters.
    """

    def setUp(self) -> None:
        self.context = ExchangeContext("route", "instance", 0.0)

    def test_no_filters(self) -> None:
        """
        Without factories, or when every factory declines, there is no chain.
        """
        self.assertIsNone(open_chain([], self.context))
        self.assertIsNone(open_chain([Factory(lambda: None)], self.context))

    def test_chain(self) -> None:
        """
        The filters of the factories that take part form the chain, in
        factory order.
        """
        log: list[tuple[str, str, bytes | None]] = []
        factories = [
            Factory(lambda: RecordingFilter("a", log, on_chunk=upper)),
            Factory(lambda: None),
            Factory(lambda: RecordingFilter("b", log)),
        ]
        chain = open_chain(factories, self.context)
        assert chain is not None
        self.assertEqual(chain.filter_chunk(b"x", self.context), b"X")
        self.assertEqual(log, [("a", "chunk", b"x"), ("b", "chunk", b"X")])

    def test_not_a_filter(self) -> None:
        """
        A factory making something that is not an L{IBodyFilter} is a
        L{TypeError}.
        """
        self.assertRaises(TypeError, open_chain, [Factory(object)], self.context)
