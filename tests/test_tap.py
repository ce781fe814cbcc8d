# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{aiproxy.tap} (the C{twistd aiproxy} options) and
L{aiproxy.check} (C{aiproxy-check}): invalid configs are refused with a
line naming the file, then one C{<json path>: <reason>} line per problem,
on stderr and without twistd's usage text (docs/operations.md).
"""

from __future__ import annotations

import os
import sys
from io import StringIO

from cryptography.hazmat.primitives import serialization
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aiproxy import check
from aiproxy.config import Config
from aiproxy.routing.routes import RouteTable
from aiproxy.tap import DEFAULT_BACKLOG, GatewayService, Options, makeService, with_backlog
from aiproxy.workers.parent import WorkerParent

VALID = """
listen: "tcp:port=0:interface=127.0.0.1"
routes:
  - id: chat
    uri: /v1/chat/completions
    plugins:
      ai-proxy:
        provider: openai
        auth: {header: {Authorization: "Bearer sk-test"}}
        override: {endpoint: "http://127.0.0.1:7751/v1/chat/completions"}
"""

#: Two schema problems.
INVALID = """
routes:
  - uri: /v1/chat/completions
    plugins:
      ai-proxy:
        provider: openai
        auth: {}
        streaming_flush_interval_ms: -1
        timeout: 0
"""

INVALID_PROBLEMS = [
    "routes[0].plugins.ai-proxy.streaming_flush_interval_ms: -1 is less than the minimum of 0",
    "routes[0].plugins.ai-proxy.timeout: 0 is less than the minimum of 1",
]

#: A token budget counted in the process.
LOCAL_BUDGET = """
routes:
  - uri: /v1/chat/completions
    plugins:
      ai-rate-limiting: {limit: 1000, time_window: 60}
      ai-proxy:
        provider: openai
        auth: {header: {Authorization: "Bearer sk-test"}}
"""

#: Valid for the schema, refused when the routes are built.
UNSERVED = """
routes:
  - uri: /converse
    plugins:
      ai-proxy: {provider: bedrock, auth: {}}
"""


class ConfigFileMixin:
    """
    Writes config files for a test.
    """

    def config_file(self, text: str) -> str:
        """
        A file holding C{text}; its path.
        """
        path: str = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class RefusalMixin:
    """
    Captures stderr; runs options that must be refused.
    """

    def setUp(self) -> None:
        self.stderr = StringIO()
        self.patch(sys, "stderr", self.stderr)  # type: ignore[attr-defined]

    def refused(self, args: list[str]) -> list[str]:
        """
        Parse C{args}, which must exit 1; the lines printed on stderr.
        """
        error = self.assertRaises(  # type: ignore[attr-defined]
            SystemExit, Options().parseOptions, args
        )
        self.assertEqual(error.code, 1)  # type: ignore[attr-defined]
        return self.stderr.getvalue().splitlines()


class OptionsTests(RefusalMixin, SynchronousTestCase, ConfigFileMixin):
    """
    L{Options}: C{--config} (required), C{--listen} (repeatable).
    """

    def test_config(self) -> None:
        """
        C{--config PATH} loads the config and builds its routes.
        """
        options = Options()
        options.parseOptions(["--config", self.config_file(VALID)])
        self.assertIsInstance(options["parsed"], Config)
        self.assertIsInstance(options["routes"], RouteTable)
        self.assertEqual([route.id for route in options["routes"].routes], ["chat"])
        self.assertEqual(options["listen"], [])

    def test_short_config(self) -> None:
        """
        C{-c PATH} is the short form.
        """
        options = Options()
        options.parseOptions(["-c", self.config_file(VALID)])
        self.assertEqual(options["parsed"].listen, ("tcp:port=0:interface=127.0.0.1",))

    def test_config_required(self) -> None:
        """
        Without C{--config}, the options are refused.
        """
        error = self.assertRaises(usage.UsageError, Options().parseOptions, [])
        self.assertIn("--config", str(error))

    def test_listen_repeatable(self) -> None:
        """
        C{--listen} may be given several times; all are kept, in order.
        """
        options = Options()
        options.parseOptions(
            ["-c", self.config_file(VALID), "--listen", "tcp:8081", "--listen", "unix:/tmp/a.sock"]
        )
        self.assertEqual(options["listen"], ["tcp:8081", "unix:/tmp/a.sock"])

    def test_listen_fresh_per_instance(self) -> None:
        """
        Each L{Options} has its own C{--listen} list.
        """
        first = Options()
        first.parseOptions(["-c", self.config_file(VALID), "--listen", "tcp:1"])
        second = Options()
        second.parseOptions(["-c", self.config_file(VALID)])
        self.assertEqual(second["listen"], [])

    def test_invalid_config(self) -> None:
        """
        An invalid config exits 1 after printing, on stderr, a line naming
        the file and every problem, one per line, and nothing else (no
        usage text).
        """
        path = self.config_file(INVALID)
        self.assertEqual(
            self.refused(["-c", path]), [f"{path}: invalid configuration", *INVALID_PROBLEMS]
        )

    def test_unserved_config(self) -> None:
        """
        A config the routes cannot be built from is refused the same way.
        """
        path = self.config_file(UNSERVED)
        self.assertEqual(
            self.refused(["-c", path]),
            [
                f"{path}: invalid configuration",
                "routes[0].plugins.ai-proxy.provider_conf.region: required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy.auth.aws: required for provider 'bedrock'",
            ],
        )

    def test_missing_file(self) -> None:
        """
        A config file that cannot be read is refused, naming it.
        """
        path = self.mktemp()
        self.assertEqual(
            self.refused(["-c", path]),
            [
                f"{path}: invalid configuration",
                f"(root): cannot read {path}: No such file or directory",
            ],
        )

    def test_not_utf8(self) -> None:
        """
        A config file that is not UTF-8 text is refused, naming it.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"routes: []\n# \xff\n")
        lines = self.refused(["-c", path])
        self.assertEqual(lines[0], f"{path}: invalid configuration")
        self.assertTrue(lines[1].startswith(f"(root): cannot read {path}: not UTF-8 text"))

    def test_listen_problem(self) -> None:
        """
        A C{--listen} endpoint whose socket systemd did not pass is refused
        with one line naming the option, without usage text.
        """
        self.patch(os, "environ", {})
        path = self.config_file(VALID)
        self.assertEqual(
            self.refused(["-c", path, "--listen", "systemd:domain=INET:index=0"]),
            [
                "--listen: cannot listen on 'systemd:domain=INET:index=0': no such socket was "
                "passed by systemd (LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID must name this "
                "process; start it through its .socket unit)"
            ],
        )

    def test_config_listen_problem(self) -> None:
        """
        The same problem in the config's C{listen} names the file and the
        config's key.
        """
        self.patch(os, "environ", {})
        path = self.config_file(
            VALID.replace("tcp:port=0:interface=127.0.0.1", "systemd:domain=INET:index=0")
        )
        lines = self.refused(["-c", path])
        self.assertEqual(lines[0], f"{path}: invalid configuration")
        self.assertTrue(
            lines[1].startswith("listen: cannot listen on 'systemd:domain=INET:index=0'")
        )
        self.assertEqual(len(lines), 2)

    def test_listen_overrides_config(self) -> None:
        """
        The service listens on the C{--listen} endpoints instead of the
        config's C{listen}.
        """
        options = Options()
        options.parseOptions(
            ["-c", self.config_file(VALID), "--listen", "tcp:0", "--listen", "tcp:0"]
        )
        service = makeService(options)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        options = Options()
        options.parseOptions(["-c", self.config_file(VALID)])
        service = makeService(options)
        self.assertEqual(len([s for s in service if isinstance(s, StreamServerEndpointService)]), 1)


class WorkersOptionTests(RefusalMixin, SynchronousTestCase, ConfigFileMixin):
    """
    C{--workers N|auto} overrides the config's C{workers}; more than one
    makes the service the parent of worker processes.
    """

    def test_default(self) -> None:
        """
        Without C{--workers} or C{workers}, one process serves: the service
        is the gateway itself.
        """
        options = Options()
        options.parseOptions(["-c", self.config_file(VALID)])
        self.assertIsNone(options["workers"])
        self.assertEqual(options["worker_count"], 1)
        self.assertIsInstance(makeService(options), GatewayService)

    def test_config(self) -> None:
        """
        The config's C{workers} counts when C{--workers} is not given.
        """
        options = Options()
        options.parseOptions(["-c", self.config_file(VALID + "workers: 3\n")])
        self.assertEqual(options["worker_count"], 3)

    def test_override(self) -> None:
        """
        C{--workers} overrides the config's C{workers}; C{auto} is the
        number of cores the process may run on.
        """
        path = self.config_file(VALID + "workers: 3\n")
        options = Options()
        options.parseOptions(["-c", path, "--workers", "1"])
        self.assertEqual((options["workers"], options["worker_count"]), (1, 1))
        self.patch(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
        options = Options()
        options.parseOptions(["-c", path, "--workers", "auto"])
        self.assertEqual((options["workers"], options["worker_count"]), ("auto", 5))

    def test_parent(self) -> None:
        """
        With more than one worker, the service is the parent of the
        workers: it listens on the same endpoints, serves nothing itself,
        and runs that many workers.
        """
        options = Options()
        options.parseOptions(["-c", self.config_file(VALID), "--workers", "2"])
        service = makeService(options)
        self.assertIsInstance(service, WorkerParent)
        assert isinstance(service, WorkerParent)
        self.assertEqual(service.pool.count, 2)
        self.assertEqual(
            [listener.endpoint for listener in service.listeners],
            [with_backlog("tcp:port=0:interface=127.0.0.1")],
        )

    def test_invalid(self) -> None:
        """
        A C{--workers} value that is not a number from 1 to 256 nor
        C{auto} is refused with one line.
        """
        path = self.config_file(VALID)
        for value in ("0", "257", "many"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(
                self.refused(["-c", path, "--workers", value]),
                [f"--workers: {value!r} is neither a number from 1 to 256 nor auto"],
            )

    def test_local_budget(self) -> None:
        """
        C{--workers} goes through the config's check of token budgets
        counted in the process: more than one worker refuses them.
        """
        path = self.config_file(LOCAL_BUDGET)
        Options().parseOptions(["-c", path, "--workers", "1"])
        lines = self.refused(["-c", path, "--workers", "2"])
        self.assertEqual(lines[0], f"{path}: invalid configuration")
        self.assertEqual(len(lines), 2)
        self.assertTrue(
            lines[1].startswith("routes[0].plugins.ai-rate-limiting.policy: policy local"), lines
        )

    def test_unshared_endpoint(self) -> None:
        """
        Workers share only TCP, UNIX and systemd sockets: a TLS listener is
        refused with them (and accepted without).
        """
        from cryptography.hazmat.primitives.asymmetric import ec

        from tests.helpers import certificate, key_pem

        key = ec.generate_private_key(ec.SECP256R1())
        pem = key_pem(key) + certificate(key, "localhost", key, "localhost", ca=False).public_bytes(
            serialization.Encoding.PEM
        )
        key_path = self.mktemp()
        with open(key_path, "wb") as f:
            f.write(pem)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key_path}"
        path = self.config_file(VALID)
        Options().parseOptions(["-c", path, "--listen", endpoint])
        self.assertEqual(
            self.refused(["-c", path, "--workers", "2", "--listen", endpoint]),
            [
                f"--listen: cannot share {endpoint!r} with worker processes: only tcp, tcp6, "
                "unix and systemd endpoints can be (terminate TLS in front of aiproxy, or run "
                "workers: 1)"
            ],
        )


class BacklogTests(SynchronousTestCase):
    """
    Listeners get a backlog that survives a burst of connections.
    """

    def test_added(self) -> None:
        """
        TCP, SSL and UNIX endpoints without a backlog get C{DEFAULT_BACKLOG}.
        """
        for endpoint in (
            "tcp:9080",
            "tcp6:port=9080",
            "ssl:port=8443:privateKey=k.pem",
            "unix:/run/a.sock",
        ):
            self.assertEqual(with_backlog(endpoint), f"{endpoint}:backlog={DEFAULT_BACKLOG}")

    def test_kept(self) -> None:
        """
        An explicit backlog, and endpoints that have none to set (systemd's
        sockets are already listening), are left alone.
        """
        for endpoint in ("tcp:port=9080:backlog=5", "systemd:domain=INET:name=aiproxy"):
            self.assertEqual(with_backlog(endpoint), endpoint)


class CheckTests(SynchronousTestCase, ConfigFileMixin):
    """
    C{aiproxy-check}: validate a config without serving it.
    """

    def setUp(self) -> None:
        self.stdout = StringIO()
        self.stderr = StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def test_valid(self) -> None:
        """
        A valid config exits 0, saying so on stdout and nothing on stderr.
        """
        path = self.config_file(VALID)
        self.assertEqual(check.main([path]), 0)
        self.assertEqual(self.stdout.getvalue(), f"{path}: ok\n")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_invalid(self) -> None:
        """
        An invalid config exits 1 with a line naming the file and exactly
        one line per problem on stderr, as C{twistd aiproxy} prints them.
        """
        path = self.config_file(INVALID)
        self.assertEqual(check.main([path]), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [f"{path}: invalid configuration", *INVALID_PROBLEMS],
        )
        self.assertEqual(self.stdout.getvalue(), "")

    def test_unserved(self) -> None:
        """
        Problems found when building the routes are reported too.
        """
        path = self.config_file(UNSERVED)
        self.assertEqual(check.main(["--config", path]), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
                f"{path}: invalid configuration",
                "routes[0].plugins.ai-proxy.provider_conf.region: required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy.auth.aws: required for provider 'bedrock'",
            ],
        )

    def test_config_option(self) -> None:
        """
        C{-c}/C{--config} name the file like the positional argument.
        """
        path = self.config_file(VALID)
        self.assertEqual(check.main(["-c", path]), 0)
        self.assertEqual(check.main(["--config", path]), 0)

    def test_missing_file(self) -> None:
        """
        A missing file exits 1 naming it.
        """
        path = self.mktemp()
        self.assertEqual(check.main([path]), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
                f"{path}: invalid configuration",
                f"(root): cannot read {path}: No such file or directory",
            ],
        )

    def test_workers(self) -> None:
        """
        C{--workers N} checks the config for N worker processes, as
        C{twistd aiproxy --workers N} would run it.
        """
        path = self.config_file(LOCAL_BUDGET)
        self.assertEqual(check.main([path, "--workers", "1"]), 0)
        self.assertEqual(check.main([path, "--workers", "2"]), 1)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(lines[0], f"{path}: invalid configuration")
        self.assertTrue(lines[1].startswith("routes[0].plugins.ai-rate-limiting.policy:"))
        error = self.assertRaises(SystemExit, check.main, [path, "--workers", "none"])
        self.assertEqual(error.code, 2)

    def test_no_file(self) -> None:
        """
        Without a file the command is a usage error (exit status 2).
        """
        error = self.assertRaises(SystemExit, check.main, [])
        self.assertEqual(error.code, 2)
        self.assertIn("a config file is required", self.stderr.getvalue())
