# -*- test-case-name: tests.test_holdback -*-
"""
The hold-back window: pattern matching over streamed text that arrives in
pieces, without buffering the whole response.

A body filter feeds each piece of response text to a L{HoldBackWindow} and
sends on only what the window releases. The window keeps back the tail that
could still be the start of a match, so a value split across two chunks
(C{"user@exa"} + C{"mple.com"}) is seen whole, and releases text as soon as
it can no longer be part of one.

Bound: at most C{size} characters are ever held. Text that has been held
for C{size} characters is released even if it could still begin a match,
so matching is exact for patterns whose matches (and lookarounds) span at
most C{size} characters; a longer match may be missed or cut.

Latency: text that cannot begin a match is released in the same call, so a
stream without near-matches is not delayed at all. Text that could begin a
match waits until the match fails, completes, or is C{size} characters
old; with ~4 characters per token, the default 64 is at most ~16 tokens.

Patterns are compiled with the C{regex} module, whose partial matching
tells whether the end of the held text could still grow into a match; its
syntax is that of Python's C{re}, plus the PCRE features APISIX users know
(possessive quantifiers, atomic groups, C{\\p{...}} classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import regex

__all__ = ["HoldBackWindow", "PatternError", "compile_pattern"]


class PatternError(ValueError):
    """
    A pattern cannot be used: it does not compile, or it matches the empty
    string (it would match everywhere).
    """


def compile_pattern(source: str, allow_empty: bool = False) -> Any:
    """
    Compile a pattern for a L{HoldBackWindow} or a one-shot search.

    @param source: the regular expression.
    @param allow_empty: accept a pattern that matches the empty string
        (never in a window, where it would match everywhere).
    @return: the compiled C{regex} pattern.
    @raise PatternError: when it does not compile, or matches the empty
        string unless allowed.
    """
    try:
        pattern = regex.compile(source)
    except (regex.error, ValueError, TypeError, OverflowError) as e:
        raise PatternError(f"invalid regular expression: {e}") from None
    if not allow_empty and pattern.fullmatch("") is not None:
        raise PatternError("invalid regular expression: it matches the empty string")
    return pattern


class HoldBackWindow:
    """
    Match patterns over one stream of text fed in pieces, holding back at
    most C{size} characters.

    Two modes:
      - detect (no C{replacements}): text is released unchanged; the first
        complete match of any pattern sets L{hit}, after which nothing more
        is released and the held text is dropped;
      - rewrite (C{replacements} given): each match is replaced. Patterns
        are tried together: the leftmost match wins, ties going to the
        earlier pattern, and replaced text is not scanned again, as one
        C{re.sub} over the whole text with the patterns as alternatives.

    For patterns within the bound (see the module docstring), any split of
    a text into pieces yields the same output as feeding it whole.

    @ivar size: the most characters held back.
    @ivar hit: in detect mode, C{(pattern index, matched text)} of the first
        match, else L{None}.
    """

    __slots__ = ("_context", "_held", "_patterns", "_replacements", "hit", "size")

    def __init__(
        self,
        patterns: Sequence[Any],
        size: int,
        replacements: Sequence[str] | None = None,
    ) -> None:
        """
        @param patterns: patterns compiled by L{compile_pattern}.
        @param size: the most characters held back (at least 0).
        @param replacements: one replacement template per pattern (C{\\1},
            C{\\g<name>} refer to groups), or L{None} for detect mode.
        """
        if size < 0:
            raise ValueError("size must be at least 0")
        if replacements is not None and len(replacements) != len(patterns):
            raise ValueError("one replacement per pattern is required")
        self._patterns = tuple(patterns)
        self._replacements = tuple(replacements) if replacements is not None else None
        self.size = size
        self.hit: tuple[int, str] | None = None
        self._held = ""
        # The last released characters of the input, so that C{\b}, C{^}
        # and lookbehinds at the start of the held text see what came before.
        self._context = ""

    @property
    def held(self) -> int:
        """
        The number of characters held back now.
        """
        return len(self._held)

    def feed(self, text: str) -> str:
        """
        Add the next piece of text.

        @return: the text released by this piece (rewritten in rewrite
            mode), possibly empty.
        """
        if self.hit is not None or (not text and not self._held):
            return ""
        return self._advance(self._held + text, final=False)

    def flush(self) -> str:
        """
        The text has ended: release everything held (rewritten in rewrite
        mode; in detect mode L{hit} may be set by a match that only the end
        of the text completes, such as one ending in C{$}).

        @return: the released text.
        """
        if not self._held:
            return ""
        return self._advance(self._held, final=True)

    def _advance(self, held: str, final: bool) -> str:
        """
        Decide what of C{held} can be released, and keep the rest.
        """
        context = self._context
        buf = context + held
        start = len(context)
        if self._replacements is None:
            out, pos = self._detect(buf, start, final)
        else:
            out, pos = self._rewrite(buf, start, final)
        self._held = buf[pos:]
        self._context = buf[max(0, pos - self.size) : pos]
        return out

    def _detect(self, buf: str, start: int, final: bool) -> tuple[str, int]:
        """
        Detect mode: look for a complete match anywhere in the context and
        held text; release up to the leftmost possible start of a match.
        """
        n = len(buf)
        if self.hit is not None:
            return "", n
        release = n
        for index, pattern in enumerate(self._patterns):
            m = pattern.search(buf, 0, partial=not final)
            if m is None:
                continue
            if not m.partial:
                begin = m.start()
                if final or m.end() < n or _survives(pattern, buf, begin):
                    self.hit = (index, m.group())
                    return "", n
                # Complete, but more text could still undo it (an anchor or
                # lookahead at the end): hold it, and any partial before it.
                hidden = _reaching_end(pattern, buf, start, begin)
                release = min(release, hidden if hidden is not None else begin)
                continue
            if m.start() < start:
                # A partial match begun in released text: look again from
                # the held text for one that could still be held back.
                m = pattern.search(buf, start, partial=True)
                if m is None:
                    continue
                if not m.partial:
                    self.hit = (index, m.group())
                    return "", n
            release = min(release, m.start())
        if not final:
            release = max(release, n - self.size)
        release = max(release, start)
        return buf[start:release], release

    def _rewrite(self, buf: str, pos: int, final: bool) -> tuple[str, int]:
        """
        Rewrite mode: replace the matches that are decided, release the
        text before the leftmost possible start of an undecided one.
        """
        patterns = self._patterns
        replacements = self._replacements
        assert replacements is not None
        n = len(buf)
        # Matches starting before the cut are decided: at least C{size}
        # characters follow their start.
        cut = n if final else n - self.size
        out: list[str] = []
        while pos < n:
            best = None
            rule = 0
            for index, pattern in enumerate(patterns):
                m = pattern.search(buf, pos)
                if m is not None and (best is None or m.start() < best.start()):
                    best, rule = m, index
            if best is None or best.start() >= cut:
                break
            begin, end = best.span()
            if begin == end:
                # An empty match (a lookaround-only pattern): no text to replace.
                out.append(buf[pos : begin + 1])
                pos = begin + 1
                continue
            out.append(buf[pos:begin])
            out.append(best.expand(replacements[rule]))
            pos = end
        if final:
            out.append(buf[pos:])
            return "".join(out), n
        if pos < cut:
            out.append(buf[pos:cut])
            pos = cut
        # The held tail: apply the matches that more text cannot change,
        # release what no match can start in, hold the rest.
        while True:
            hold = n
            decided = None
            rule = 0
            for index, pattern in enumerate(patterns):
                m = pattern.search(buf, pos, partial=True)
                if m is None:
                    continue
                if m.partial:
                    # No complete match: this is the leftmost partial one.
                    hold = min(hold, m.start())
                    continue
                begin = m.start()
                undecided = _reaching_end(pattern, buf, pos, begin + 1)
                if undecided is not None:
                    hold = min(hold, undecided)
                elif decided is None or begin < decided.start():
                    decided, rule = m, index
            if decided is None or decided.start() >= hold:
                out.append(buf[pos:hold])
                return "".join(out), hold
            begin, end = decided.span()
            out.append(buf[pos:begin])
            out.append(decided.expand(replacements[rule]))
            pos = end


#: Continuations tried on a match that ends where the text so far ends.
_PROBES = ("a", "0", " ", "\n", ".", "-")


def _survives(pattern: Any, buf: str, start: int) -> bool:
    """
    Whether a match of C{pattern} at C{start}, ending at the end of
    C{buf}, still matches whatever comes next: false for one that needs
    the end of the text (C{$}, C{\\Z}) or a lookahead there (C{\\b}).
    """
    return all(pattern.match(buf + probe, start) is not None for probe in _PROBES)


def _reaching_end(pattern: Any, buf: str, start: int, stop: int) -> int | None:
    """
    The first position in C{[start, stop)} where a match attempt of
    C{pattern} reaches the end of C{buf} (so more text could change its
    outcome), or L{None}.
    """
    for position in range(start, stop):
        if pattern.fullmatch(buf, position, partial=True) is not None:
            return position
    return None
