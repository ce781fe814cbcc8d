# -*- test-case-name: tests.test_workers -*-
"""
C{/metrics} for the whole gateway when it runs worker processes.

Each worker records its metrics as a single process does, but in
C{prometheus_client}'s multiprocess mode: C{PROMETHEUS_MULTIPROC_DIR}
(set by the parent in the workers' environment only, to a directory of
its private L{aiproxy.workers.snapshot.RunDirectory}) makes every value
live in a per-process file. The parent serves the sum of those files
(L{WorkersMetrics}): counters and histograms of dead workers stay in the
sum, so no counter goes back when a worker is restarted; the gauges sum
the live workers only (C{livesum}), the files of a dead one being
dropped (L{WorkersMetrics.process_dead}).

The parent also counts what only it knows: the reloads (the workers' own
reload counts are left out of the sum, each reload being counted once),
the workers running and the restarts.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["WorkersMetrics"]

#: Families the parent counts itself, left out of the workers' sum.
_PARENT_FAMILIES = frozenset({"aiproxy_config_reloads"})


class _WorkerFilesCollector:
    """
    The workers' metrics, summed from their files (none before the
    directory is known).
    """

    def __init__(self, owner: WorkersMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Any]:
        path = self._owner.path
        if path is None:
            return
        files = glob.glob(os.path.join(path, "*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):
            if metric.name not in _PARENT_FAMILIES:
                yield metric


class WorkersMetrics:
    """
    The parent's registry: the workers' summed metrics and its own.

    @ivar path: the directory of the workers' metrics files (set before the
        first worker starts).
    @ivar registry: what C{/metrics} serves.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.registry = registry = CollectorRegistry()
        self.reloads = Counter(
            "aiproxy_config_reloads",
            "Configuration reloads (SIGHUP), by result (success or failure).",
            ["result"],
            registry=registry,
        )
        self.workers = Gauge(
            "aiproxy_workers",
            "Worker processes running.",
            registry=registry,
        )
        self.restarts = Counter(
            "aiproxy_worker_restarts",
            "Worker processes that died and are restarted.",
            registry=registry,
        )
        registry.register(_WorkerFilesCollector(self))  # type: ignore[arg-type]

    def process_dead(self, pid: int) -> None:
        """
        Worker C{pid} ended: its live gauges leave the sum (its counters
        stay).
        """
        if self.path is not None:
            mark_process_dead(pid, self.path)
