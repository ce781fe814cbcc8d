"""
Tests for the C{word-count} plugin: run with
C{python -m twisted.trial aiproxy_wordcount} once the package is installed.
"""

from __future__ import annotations

from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aiproxy.context import ExchangeContext
from aiproxy.filters import Replace
from aiproxy.interfaces import IBodyFilter, IBodyFilterFactory, IFilterPlugin
from aiproxy.plugins import available_plugins
from aiproxy_wordcount import WordCountPlugin


class WordCountTests(SynchronousTestCase):
    """
    The plugin, its configured factory and its filter.
    """

    def test_interfaces(self) -> None:
        """
        The plugin, the configured factory and the filter provide their
        interfaces.
        """
        plugin = WordCountPlugin()
        self.assertTrue(verifyObject(IFilterPlugin, plugin))
        factory = plugin.configure({"comment": True})
        self.assertTrue(verifyObject(IBodyFilterFactory, factory))
        self.assertTrue(
            verifyObject(IBodyFilter, factory.body_filter(ExchangeContext("r", "i", 0.0)))
        )

    def test_discovered(self) -> None:
        """
        Installed, the dropin is found by Twisted's plugin system and
        aiproxy offers it by name.
        """
        self.assertIn("word-count", [plugin.name for plugin in getPlugins(IFilterPlugin)])
        self.assertEqual(available_plugins()["word-count"].name, "word-count")

    def test_count(self) -> None:
        """
        At the end of a stream the filter sends the word count as a comment.
        """
        context = ExchangeContext("r", "i", 0.0)
        context.stream = True
        context.add_text("three little ")
        context.add_text("words")
        body_filter = WordCountPlugin().configure({"comment": True}).body_filter(context)
        self.assertIsNone(body_filter.filter_chunk(b"data: x\n\n", context))
        self.assertEqual(body_filter.finish(context), Replace(b": words=3\n\n"))
