# -*- test-case-name: tests.test_tap -*-
"""
C{aiproxy-check PATH}: validate a config without serving it.

Exits 0 when the config is valid, 1 with one C{<json path>: <reason>} line
per problem (the same messages C{twistd aiproxy} refuses to start with).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiproxy.config import ConfigError, load_config

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check the config named on the command line.

    @return: the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="aiproxy-check", description="Validate an aiproxy config file."
    )
    parser.add_argument("path", nargs="?", help="the YAML config file")
    parser.add_argument("-c", "--config", dest="config", help="the YAML config file")
    args = parser.parse_args(argv)
    path = args.config or args.path
    if not path:
        parser.error("a config file is required")
    from twisted.internet import reactor

    from aiproxy.routing.build import build_routes

    try:
        build_routes(load_config(path), reactor)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
