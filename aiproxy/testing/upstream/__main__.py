# -*- test-case-name: tests.test_mock_upstream -*-
"""
C{python -m aiproxy.testing.upstream}: run the mock LLM upstream; see
L{aiproxy.testing.upstream.cli.main}.
"""

from aiproxy.testing.upstream.cli import main

__all__: list[str] = []

main()
