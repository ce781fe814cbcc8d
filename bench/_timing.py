"""
The timing the CPU benchmarks share.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

__all__ = ["cpu_time"]


def cpu_time(run: Callable[[], object], runs: int) -> float:
    """
    Time a function.

    @param run: The function.
    @param runs: How many timed runs, after one warm-up run.
    @return: The median CPU time of one run, in seconds.
    """
    run()
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)
