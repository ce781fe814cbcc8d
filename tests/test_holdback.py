# -*- test-case-name: tests.test_holdback -*-
"""
Tests for L{aiproxy.holdback}.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.holdback import HoldBackWindow, PatternError, compile_pattern

#: Patterns whose matches span at most L{SIZE} characters, over L{ALPHABET}.
PATTERNS = [
    r"secret",
    r"[ab]{2,3}@[ab]{1,2}\.com",
    r"(?<=@)[ab]{1,4}",
    r"\bcat\b",
    r"se{1,3}c",
]
SIZE = 12
ALPHABET = "abcest@.om \n"


def feed_all(window: HoldBackWindow, pieces: list[str], sizes: list[int] | None = None) -> str:
    """
    Feed C{pieces} then flush, returning everything released; record how
    much was held after each piece in C{sizes}.
    """
    out = []
    for piece in pieces:
        out.append(window.feed(piece))
        if sizes is not None:
            sizes.append(window.held)
    out.append(window.flush())
    return "".join(out)


def split(text: str, cuts: list[int]) -> list[str]:
    """
    Split C{text} at the given offsets (clamped and sorted).
    """
    points = sorted({min(max(c, 0), len(text)) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(text[last:point])
        last = point
    pieces.append(text[last:])
    return pieces


class CompilePatternTests(SynchronousTestCase):
    """
    Tests for L{compile_pattern}.
    """

    def test_invalid(self) -> None:
        """
        A pattern that does not compile raises L{PatternError} saying so.
        """
        with self.assertRaises(PatternError) as caught:
            compile_pattern("(unclosed")
        self.assertTrue(str(caught.exception).startswith("invalid regular expression: "))

    def test_empty_match(self) -> None:
        """
        A pattern matching the empty string is refused: it would match
        everywhere.
        """
        with self.assertRaises(PatternError) as caught:
            compile_pattern("x*")
        self.assertIn("matches the empty string", str(caught.exception))

    def test_pcre_syntax(self) -> None:
        """
        Possessive quantifiers and Unicode properties, common in PCRE
        patterns written for APISIX, compile.
        """
        pattern = compile_pattern(r"\p{Lu}\d++")
        self.assertEqual(pattern.search("ab C12").group(), "C12")


class RewriteTests(SynchronousTestCase):
    """
    Tests for L{HoldBackWindow} in rewrite mode.
    """

    def window(
        self, patterns: list[str], replacements: list[str], size: int = 64
    ) -> HoldBackWindow:
        return HoldBackWindow([compile_pattern(p) for p in patterns], size, replacements)

    def test_split_secret(self) -> None:
        """
        An address split across two pieces is held until it is whole, then
        replaced; the text before it is released at once.
        """
        window = self.window([r"[\w.]+@[\w-]+\.\w+"], ["[email]"])
        self.assertEqual(window.feed("mail user@exa"), "mail ")
        self.assertEqual(window.feed("mple.com now"), "[email] ")
        self.assertEqual(window.flush(), "now")

    def test_release_at_once(self) -> None:
        """
        Text that cannot begin a match is released in the same call.
        """
        window = self.window([r"sk-[A-Za-z0-9]{8}"], ["sk-***"])
        self.assertEqual(window.feed("hello world "), "hello world ")
        self.assertEqual(window.held, 0)
        self.assertEqual(window.feed("key s"), "key ")
        self.assertEqual(window.held, 1)
        self.assertEqual(window.feed("ome"), "some")

    def test_greedy_at_end_waits(self) -> None:
        """
        A complete match at the end of the held text may still grow: it is
        held until it cannot.
        """
        window = self.window([r"\d{3,6}"], ["#"])
        self.assertEqual(window.feed("n 123"), "n ")
        self.assertEqual(window.feed("45 x"), "# x")

    def test_flush_replaces(self) -> None:
        """
        At the end of the text a held complete match is replaced.
        """
        window = self.window([r"\d+"], ["#"])
        self.assertEqual(window.feed("a 12"), "a ")
        self.assertEqual(window.flush(), "#")

    def test_bound(self) -> None:
        """
        Text that could begin a match is released once C{size} characters
        are held, even if the match is still open.
        """
        window = self.window([r"a+b"], ["X"], size=4)
        self.assertEqual(window.feed("aaaaaa"), "aa")
        self.assertEqual(window.held, 4)

    def test_groups(self) -> None:
        """
        Replacements may refer to groups.
        """
        window = self.window([r"(\w+)@(\w+)\.com"], [r"\1 at \2"])
        self.assertEqual(feed_all(window, ["x bob@ex", "ample.com y"]), "x bob at example y")

    def test_leftmost_wins(self) -> None:
        """
        Of several patterns the leftmost match wins, ties going to the
        earlier pattern; replaced text is not scanned again.
        """
        window = self.window([r"bc", r"abc", r"X"], ["1", "2", "3"])
        self.assertEqual(feed_all(window, ["ab", "c bc"]), "2 1")

    def test_lookbehind_context(self) -> None:
        """
        A lookbehind at the start of the held text sees released text.
        """
        window = self.window([r"(?<=key=)\w{4}"], ["****"], size=4)
        out = window.feed("key=")
        out += window.feed("abcd rest")
        self.assertEqual(out + window.flush(), "key=**** rest")

    def test_size_zero(self) -> None:
        """
        With no window nothing is held and only matches within one piece
        are replaced.
        """
        window = self.window([r"secret"], ["***"], size=0)
        self.assertEqual(window.feed("a secret"), "a ***")
        self.assertEqual(window.feed("sec"), "sec")
        self.assertEqual(window.held, 0)

    @settings(max_examples=300, deadline=None)
    @given(
        text=st.text(alphabet=ALPHABET, max_size=80),
        cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
        chosen=st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3, unique=True),
    )
    def test_any_split(self, text: str, cuts: list[int], chosen: list[str]) -> None:
        """
        Any split of a text into pieces yields the same output as the whole
        text, the same as one C{sub} over it, and never more than C{size}
        characters are held.
        """
        patterns = [compile_pattern(p) for p in chosen]
        replacements = ["#"] * len(patterns)
        whole = feed_all(HoldBackWindow(patterns, SIZE, replacements), [text])
        combined = compile_pattern("|".join(f"(?:{p})" for p in chosen))
        self.assertEqual(whole, combined.sub("#", text))
        sizes: list[int] = []
        pieces = split(text, cuts)
        self.assertEqual(
            feed_all(HoldBackWindow(patterns, SIZE, replacements), pieces, sizes), whole
        )
        self.assertTrue(all(size <= SIZE for size in sizes), sizes)

    @settings(max_examples=200, deadline=None)
    @given(
        text=st.text(alphabet="secrtx ", max_size=60),
        cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    )
    def test_no_match_left(self, text: str, cuts: list[int]) -> None:
        """
        When the replacement cannot form a match, the output never contains
        one, whatever the split.
        """
        pattern = compile_pattern("secret")
        out = feed_all(HoldBackWindow([pattern], 8, ["[X]"]), split(text, cuts))
        self.assertIsNone(pattern.search(out))


class DetectTests(SynchronousTestCase):
    """
    Tests for L{HoldBackWindow} in detect mode.
    """

    def test_split_hit(self) -> None:
        """
        A match split across pieces is found; the text before it was
        released, its first half was not.
        """
        window = HoldBackWindow([compile_pattern("forbidden")], 64)
        self.assertEqual(window.feed("this is forb"), "this is ")
        self.assertIsNone(window.hit)
        self.assertEqual(window.feed("idden text"), "")
        self.assertEqual(window.hit, (0, "forbidden"))
        self.assertEqual(window.feed("more"), "")
        self.assertEqual(window.flush(), "")

    def test_release_unchanged(self) -> None:
        """
        Without a match, text is released unchanged and at once when it
        cannot begin one.
        """
        window = HoldBackWindow([compile_pattern("forbidden")], 64)
        self.assertEqual(window.feed("all "), "all ")
        self.assertEqual(window.feed("fine f"), "fine ")
        self.assertEqual(window.flush(), "f")
        self.assertIsNone(window.hit)

    def test_end_anchor(self) -> None:
        """
        A match that only the end of the text completes is found by
        L{HoldBackWindow.flush}.
        """
        window = HoldBackWindow([compile_pattern(r"bye\Z")], 64)
        self.assertEqual(window.feed("good bye"), "good ")
        self.assertEqual(window.flush(), "")
        self.assertEqual(window.hit, (0, "bye"))

    @settings(max_examples=300, deadline=None)
    @given(
        text=st.text(alphabet=ALPHABET, max_size=80),
        cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
        chosen=st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3, unique=True),
    )
    def test_any_split(self, text: str, cuts: list[int], chosen: list[str]) -> None:
        """
        Whatever the split, a match is found exactly when the whole text
        holds one; the text released before it holds none; at most C{size}
        characters are held.
        """
        patterns = [compile_pattern(p) for p in chosen]
        window = HoldBackWindow(patterns, SIZE)
        released = []
        for piece in split(text, cuts):
            released.append(window.feed(piece))
            self.assertLessEqual(window.held, SIZE)
        released.append(window.flush())
        expected = any(p.search(text) for p in patterns)
        self.assertEqual(window.hit is not None, expected)
        out = "".join(released)
        self.assertFalse(any(p.search(out) for p in patterns))
        if not expected:
            self.assertEqual(out, text)
