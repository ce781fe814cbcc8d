# -*- test-case-name: tests.test_workers -*-
"""
Worker processes (C{workers: N} or C{--workers N} with N above one).

The parent process opens the listeners, or inherits them from systemd,
and never accepts on them; it starts N worker processes that each run the
whole gateway (L{aiproxy.tap.GatewayService}) on the same listening
sockets, passed as file descriptors and adopted with
C{reactor.adoptStreamPort}, so the kernel spreads the connections among
them:

 - L{aiproxy.workers.listeners}: the shared sockets, opened by the parent
   and adopted by the workers;
 - L{aiproxy.workers.pool}: starting the workers, restarting one that dies
   (with a growing delay), signalling them and waiting for their exit;
 - L{aiproxy.workers.parent}: the parent's service tree: the listeners,
   the pool, C{/metrics} for the whole gateway, the config checked on
   C{SIGHUP} before the workers reload it, C{SIGTERM} forwarded;
 - L{aiproxy.workers.snapshot}: the parent's private directory holding the
   config the workers load and the metrics files they write;
 - L{aiproxy.workers.metrics}: the workers' metrics summed for C{/metrics};
 - L{aiproxy.workers.logs}: each worker's log lines name it;
 - L{aiproxy.workers.child}: a worker's entry point
   (C{python -m aiproxy.workers.child}).
"""

__all__: list[str] = []
