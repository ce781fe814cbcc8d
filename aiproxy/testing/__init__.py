# -*- test-case-name: tests.test_mock_upstream -*-
"""
Test support shipped with aiproxy.

L{aiproxy.testing.upstream} is a deterministic mock LLM upstream (OpenAI chat
completions, Anthropic Messages, OpenAI Responses and embeddings) served by
twisted.web, used by the test-suite, the example configuration and the
benchmarks. Run it with C{python -m aiproxy.testing} or
C{python -m aiproxy.testing.upstream}.

This package does not import its submodules, so that running
C{python -m aiproxy.testing.upstream} does not load that module twice.
"""

__all__: list[str] = []
