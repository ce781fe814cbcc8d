# -*- test-case-name: tests.test_budget -*-
"""
How many worker processes a setting means, and the budgets that many
processes would multiply.
"""

from __future__ import annotations

import os

from aiproxy.config import Config
from aiproxy.schema import format_path

__all__ = ["local_budget_problems", "worker_count"]


def worker_count(workers: int | str) -> int:
    """
    The number of worker processes C{workers} (a number or C{"auto"}) means.
    """
    if workers == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return int(workers)


def local_budget_problems(config: Config, workers: int | str) -> list[str]:
    """
    The C{ai-rate-limiting} configs whose C{policy: local} counters would
    each be counted per worker process (so multiplied by their number)
    when C{workers} is more than one: one problem line each.
    """
    count = worker_count(workers)
    if count <= 1:
        return []
    reason = (
        f"policy local counts per process and {count} worker processes would multiply "
        "the budget: use policy redis (or redis-cluster), or workers: 1"
    )
    places: list[list[str | int]] = [
        ["routes", index, "plugins", "ai-rate-limiting", "policy"]
        for index, route in enumerate(config.routes)
        if route.rate_limiting is not None and route.rate_limiting["policy"] == "local"
    ]
    places.extend(
        ["consumers", index, "plugins", "ai-rate-limiting", "policy"]
        for index, consumer in enumerate(config.consumers)
        if consumer.rate_limiting is not None and consumer.rate_limiting["policy"] == "local"
    )
    return [f"{format_path(path)}: {reason}" for path in places]
