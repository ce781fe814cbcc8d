# -*- test-case-name: tests.test_builtin -*-
"""
The built-in filter plugins.

  - C{ai-prompt-guard} (request): refuse prompts by allow/deny patterns;
  - C{ai-prompt-decorator} (request): add messages around the prompt;
  - C{ai-response-guard} (body): cut a response whose text matches a deny
    pattern, with a refusal in the client's format;
  - C{ai-response-redact} (body): replace what matches patterns in the
    response text as it streams.
"""

from __future__ import annotations

from aiproxy.builtin._common import PluginConfigError
from aiproxy.builtin.prompt_decorator import PromptDecoratorPlugin
from aiproxy.builtin.prompt_guard import PromptGuardPlugin
from aiproxy.builtin.response_guard import ResponseGuardPlugin
from aiproxy.builtin.response_redact import ResponseRedactPlugin
from aiproxy.interfaces import IFilterPlugin

__all__ = ["BUILTINS", "PluginConfigError"]

#: One provider of L{IFilterPlugin} per built-in plugin.
BUILTINS: tuple[IFilterPlugin, ...] = (
    PromptGuardPlugin(),
    PromptDecoratorPlugin(),
    ResponseGuardPlugin(),
    ResponseRedactPlugin(),
)
