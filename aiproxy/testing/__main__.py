# -*- test-case-name: tests.test_mock_upstream -*-
"""
C{python -m aiproxy.testing}: run the mock LLM upstream.

The same as C{python -m aiproxy.testing.upstream}; see
L{aiproxy.testing.upstream.main}.
"""

from aiproxy.testing.upstream import main

__all__: list[str] = []

main()
