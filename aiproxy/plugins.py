# -*- test-case-name: tests.test_builtin -*-
"""
Finding filter plugins: the built-in ones and third-party dropins.

A third-party package ships a module in C{twisted/plugins/} holding an
object that provides L{twisted.plugin.IPlugin} and L{IFilterPlugin}; once the
package is installed, routes can name the plugin without touching aiproxy.
Its C{configure} may raise L{PluginConfigError} to refuse a config its
schema allows; the loader reports each problem at its JSON path.

The helpers a plugin may build on are importable from here: the hold-back
window and its patterns, and the SSE decoder and event for a filter that
decodes its own input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from twisted.plugin import getPlugins

from aiproxy.builtin import BUILTINS, PluginConfigError
from aiproxy.holdback import HoldBackWindow, PatternError, compile_pattern
from aiproxy.interfaces import IFilterPlugin
from aiproxy.stream.sse import SSEDecoder, SSEEvent

__all__ = [
    "BUILTIN_PLUGINS",
    "HoldBackWindow",
    "PatternError",
    "PluginConfigError",
    "SSEDecoder",
    "SSEEvent",
    "available_plugins",
    "compile_pattern",
    "plugin_schemas",
]

log = Logger()

#: C{ai-prompt-guard}, C{ai-prompt-decorator}, C{ai-response-guard} and
#: C{ai-response-redact}.
BUILTIN_PLUGINS: tuple[IFilterPlugin, ...] = BUILTINS


def available_plugins() -> dict[str, IFilterPlugin]:
    """
    Every filter plugin by name: the built-ins, then installed dropins.
    A dropin cannot replace a built-in of the same name.
    """
    plugins: dict[str, IFilterPlugin] = {plugin.name: plugin for plugin in BUILTIN_PLUGINS}
    for plugin in getPlugins(IFilterPlugin):
        if plugin.name in plugins:
            if plugins[plugin.name] is not plugin:
                log.warn(
                    "ignoring plugin {name} from {module}: the name is taken",
                    name=plugin.name,
                    module=type(plugin).__module__,
                )
            continue
        plugins[plugin.name] = plugin
    return plugins


def plugin_schemas() -> dict[str, Mapping[str, Any]]:
    """
    The config schema of every available filter plugin, by name.
    """
    return {name: plugin.config_schema for name, plugin in available_plugins().items()}
