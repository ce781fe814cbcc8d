# -*- test-case-name: tests.test_tap -*-
"""
C{aiproxy-check PATH}: validate a config without serving it.

Exits 0 when the config is valid, 1 after a line C{<file>: invalid
configuration} and one C{<json path>: <reason>} line per problem, on stderr
(what C{twistd aiproxy} prints when it refuses to start). C{--workers N}
checks it for that many worker processes, as C{twistd aiproxy --workers N}
would run it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiproxy.config import ConfigError, load_config
from aiproxy.workers.sizing import local_budget_problems

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
    parser.add_argument(
        "--workers",
        metavar="N|auto",
        help="check it for this many worker processes (twistd aiproxy --workers)",
    )
    args = parser.parse_args(argv)
    path = args.config or args.path
    if not path:
        parser.error("a config file is required")
    from twisted.internet import reactor

    from aiproxy.routing.build import build_routes
    from aiproxy.tap import MAX_WORKERS, workers_setting

    workers = None
    if args.workers is not None:
        try:
            workers = workers_setting(args.workers)
        except ValueError:
            parser.error(
                f"--workers: {args.workers!r} is neither a number from 1 to {MAX_WORKERS} nor auto"
            )
    try:
        config = load_config(path)
        build_routes(config, reactor)
        problems = local_budget_problems(config, config.workers if workers is None else workers)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
