# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{aiproxy.tap} (the C{twistd aiproxy} options) and
L{aiproxy.check} (C{aiproxy-check}): invalid configs are refused with one
C{<json path>: <reason>} line per problem (docs/operations.md).
"""

from __future__ import annotations

import sys
from io import StringIO

from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from aiproxy import check
from aiproxy.config import Config
from aiproxy.routing.routes import RouteTable
from aiproxy.tap import DEFAULT_BACKLOG, Options, makeService, with_backlog

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


class OptionsTests(SynchronousTestCase, ConfigFileMixin):
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
        An invalid config is a L{usage.UsageError} listing every problem,
        one per line, after a line naming the file.
        """
        path = self.config_file(INVALID)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertEqual(
            str(error).splitlines(), [f"invalid configuration {path}:", *INVALID_PROBLEMS]
        )

    def test_unserved_config(self) -> None:
        """
        A config the routes cannot be built from is refused the same way.
        """
        path = self.config_file(UNSERVED)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertEqual(
            str(error).splitlines(),
            [
                f"invalid configuration {path}:",
                "routes[0].plugins.ai-proxy.provider_conf.region: required for provider 'bedrock'",
                "routes[0].plugins.ai-proxy.auth.aws: required for provider 'bedrock'",
            ],
        )

    def test_missing_file(self) -> None:
        """
        A config file that cannot be read is refused, naming it.
        """
        path = self.mktemp()
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertIn(
            f"(root): cannot read {path}: No such file or directory", str(error).splitlines()
        )

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
        An invalid config exits 1 with exactly one line per problem on
        stderr.
        """
        self.assertEqual(check.main([self.config_file(INVALID)]), 1)
        self.assertEqual(self.stderr.getvalue().splitlines(), INVALID_PROBLEMS)
        self.assertEqual(self.stdout.getvalue(), "")

    def test_unserved(self) -> None:
        """
        Problems found when building the routes are reported too.
        """
        self.assertEqual(check.main(["--config", self.config_file(UNSERVED)]), 1)
        self.assertEqual(
            self.stderr.getvalue().splitlines(),
            [
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
            [f"(root): cannot read {path}: No such file or directory"],
        )

    def test_no_file(self) -> None:
        """
        Without a file the command is a usage error (exit status 2).
        """
        error = self.assertRaises(SystemExit, check.main, [])
        self.assertEqual(error.code, 2)
        self.assertIn("a config file is required", self.stderr.getvalue())
