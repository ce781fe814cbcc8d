"""
C{word-count}: an aiproxy body filter that counts the words of each
response, logs the count, and ends a stream with an SSE comment
C{: words=N} (clients ignore comments).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from aiproxy.filters import Replace
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory, IFilterPlugin

__all__ = ["WordCount", "WordCountFilter", "WordCountPlugin"]

log = Logger()


@implementer(IBodyFilter)
class WordCountFilter:
    """
    One response: nothing to do per chunk, the count at the end.
    """

    def __init__(self, comment: bool) -> None:
        self.comment = comment

    def filter_chunk(self, chunk: bytes, context: Any) -> None:
        """
        Pass every chunk on; C{context.text} collects the text meanwhile.
        """
        return None

    def finish(self, context: Any) -> Replace | None:
        """
        Count the words of the whole response text.
        """
        words = len(context.text.split())
        log.info(
            "word-count: route {route} answered {words} words", route=context.route_id, words=words
        )
        if self.comment and context.stream:
            return Replace(b": words=%d\n\n" % words)
        return None


@implementer(IBodyFilterFactory)
class WordCount:
    """
    A route's configured C{word-count}.
    """

    def __init__(self, comment: bool) -> None:
        self.comment = comment

    def body_filter(self, context: Any) -> WordCountFilter:
        return WordCountFilter(self.comment)


@implementer(IPlugin, IFilterPlugin)
class WordCountPlugin:
    """
    The plugin object the dropin exposes.
    """

    name = "word-count"
    priority = 100
    config_schema = {
        "type": "object",
        "properties": {
            "comment": {
                "type": "boolean",
                "default": True,
                "description": "End streams with an SSE comment ': words=N'.",
            },
        },
        "additionalProperties": False,
    }

    def configure(self, config: dict) -> WordCount:
        return WordCount(config["comment"])
