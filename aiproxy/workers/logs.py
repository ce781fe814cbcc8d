# -*- test-case-name: tests.test_workers -*-
"""
A worker's log events name the worker: text lines carry C{worker <index>
pid <pid>} in their system field (C{[worker 1 pid 4242
aiproxy.lifecycle#info]}), access records a C{"worker"} key holding the
pid, and every event C{worker} and C{worker_pid} keys (for JSON
observers). The workers share the parent's stdout: each event is still
written as one line by one C{write}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver
from zope.interface import implementer

from aiproxy.accesslog import ACCESS_NAMESPACE

__all__ = ["WorkerLogObserver"]


def _default_system(event: dict[str, Any]) -> str:
    """
    The system Twisted's classic text shows for an event without one.
    """
    level = event.get("log_level")
    level_name = "-" if level is None else level.name
    return f"{event.get('log_namespace', '-')}#{level_name}"


@implementer(ILogObserver)
class WorkerLogObserver:
    """
    Passes a worker's events on to C{observer}, naming the worker.
    """

    def __init__(self, observer: ILogObserver, index: int, pid: int) -> None:
        self._observer = observer
        self._index = index
        self._pid = pid
        self._prefix = f"worker {index} pid {pid}"
        self._access_suffix = f',"worker":{pid}}}'

    def __call__(self, event: dict[str, Any]) -> None:
        event = dict(event, worker=self._index, worker_pid=self._pid)
        system = event.get("log_system")
        if system is None:
            system = _default_system(event)
        event["log_system"] = f"{self._prefix} {system}"
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            access = event.get("access_json")
            if isinstance(access, str) and access.endswith("}") and access != "{}":
                event["access_json"] = access[:-1] + self._access_suffix
        self._observer(event)
