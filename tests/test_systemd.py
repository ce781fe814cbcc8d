# -*- test-case-name: tests.test_systemd -*-
"""
Tests for the systemd units in C{conf/}: their settings, C{systemd-analyze
verify} (skipped where it is not installed), and socket activation
exercised the way systemd does it: the daemon started with an inherited
listening socket as fd 3, C{LISTEN_FDS}, C{LISTEN_FDNAMES} and its own pid
in C{LISTEN_PID}.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.daemon import (
    REPO_ROOT,
    ChildProcess,
    http_call,
    in_thread,
    proxy_route,
    start_mock,
    twistd_command,
    wait_until,
)
from tests.helpers import write_config

CONF = REPO_ROOT / "conf"
SERVICE = CONF / "aiproxy.service"
SOCKET = CONF / "aiproxy.socket"
OPERATIONS = REPO_ROOT / "docs" / "operations.md"

CHAT = {"model": "gpt-sd", "messages": [{"role": "user", "content": "hi"}]}


def unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """
    A unit file's settings by section, in order (a key may repeat).
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, (key, found)
    return found[0]


class UnitFileTests(SynchronousTestCase):
    """
    The shipped units say what docs/operations.md and docs/operations.md
    promise.
    """

    def setUp(self) -> None:
        self.service = unit(SERVICE)["Service"]
        self.socket = unit(SOCKET)["Socket"]

    def test_exec_start(self) -> None:
        """
        twistd runs in the foreground (so that C{LISTEN_PID} is its pid),
        without a pid file, and adopts the socket by the name the socket
        unit gives it.
        """
        command = shlex.split(one(self.service, "ExecStart"))
        self.assertEqual(command[0], "/opt/aiproxy/bin/twistd")
        self.assertIn("--nodaemon", command)
        self.assertIn("--pidfile=", command)
        self.assertEqual(command[command.index("--config") + 1], "/etc/aiproxy/aiproxy.yaml")
        listen = command[command.index("--listen") + 1]
        name = one(self.socket, "FileDescriptorName")
        self.assertEqual(listen, f"systemd:domain=INET:name={name}")
        self.assertEqual(one(self.service, "Type"), "simple")

    def test_reload_and_stop(self) -> None:
        """
        Reload checks the config and sends SIGHUP; stop is SIGTERM, with
        time for the default C{shutdown_grace_s} (30 s) and the final flush.
        """
        reload = values(self.service, "ExecReload")
        self.assertEqual(reload[-1], "/bin/kill -HUP $MAINPID")
        self.assertIn("aiproxy-check --workers auto /etc/aiproxy/aiproxy.yaml", reload[0])
        self.assertEqual(one(self.service, "KillSignal"), "SIGTERM")
        self.assertGreater(int(one(self.service, "TimeoutStopSec")), 30 + 5)
        self.assertEqual(one(self.service, "Restart"), "on-failure")

    def test_hardening(self) -> None:
        """
        A dynamic user in a read-only, capability-free sandbox that may only
        use IP and UNIX sockets.
        """
        for key, expected in {
            "DynamicUser": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "NoNewPrivileges": "yes",
            "CapabilityBoundingSet": "",
        }.items():
            self.assertEqual(one(self.service, key), expected, key)
        self.assertEqual(
            set(one(self.service, "RestrictAddressFamilies").split()),
            {"AF_INET", "AF_INET6", "AF_UNIX"},
        )

    def test_socket(self) -> None:
        """
        The socket unit listens on the gateway's default address and starts
        aiproxy.service.
        """
        self.assertEqual(one(self.socket, "ListenStream"), "127.0.0.1:9080")
        self.assertEqual(one(self.socket, "Service"), "aiproxy.service")
        self.assertIn("aiproxy.socket", one(unit(SERVICE)["Unit"], "Requires"))

    def test_documented(self) -> None:
        """
        docs/operations.md names both units and the paths they use.
        """
        text = OPERATIONS.read_text(encoding="utf-8")
        for needle in (
            "conf/aiproxy.service",
            "conf/aiproxy.socket",
            "/opt/aiproxy",
            "/etc/aiproxy/aiproxy.yaml",
            "/etc/aiproxy/aiproxy.env",
            "systemctl reload aiproxy",
        ):
            self.assertIn(needle, text)


class VerifyTests(SynchronousTestCase):
    """
    C{systemd-analyze verify} accepts the units.
    """

    def test_verify(self) -> None:
        """
        The units verify cleanly, their programs replaced by stand-ins
        (verify checks that each command exists and is executable, and
        /opt/aiproxy is not installed here).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        directory = Path(self.mktemp())
        (directory / "bin").mkdir(parents=True)
        for name in ("twistd", "aiproxy-check"):
            stand_in = directory / "bin" / name
            stand_in.write_text("#!/bin/sh\nexit 0\n")
            stand_in.chmod(0o755)
        for path in (SERVICE, SOCKET):
            text = path.read_text(encoding="utf-8").replace(
                "/opt/aiproxy/bin/", f"{directory.resolve()}/bin/"
            )
            (directory / path.name).write_text(text, encoding="utf-8")
        result = subprocess.run(
            [analyze, "verify", "aiproxy.socket", "aiproxy.service"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Lines about units outside ours (the host's own) are not ours to fix.
        ours = [line for line in (result.stdout + result.stderr).splitlines() if "aiproxy" in line]
        self.assertEqual((result.returncode, ours), (0, []), result.stdout + result.stderr)


class _ActivatedDaemon(ChildProcess):
    """
    C{twistd aiproxy} started as systemd starts a socket-activated
    service: C{sock} as fd 3, C{LISTEN_FDS=1}, C{LISTEN_FDNAMES} and, set
    by a shell that then C{exec}s twistd, C{LISTEN_PID} = twistd's pid.
    """

    def __init__(self, config: Path, sock: socket.socket, name: str = "aiproxy") -> None:
        twistd = twistd_command()
        command = [
            "/bin/sh",
            "-c",
            'LISTEN_PID=$$; export LISTEN_PID; exec "$@"',
            "sh",
            *twistd,
            "-n",
            "--pidfile=",
            "aiproxy",
            "--config",
            str(config),
            "--listen",
            f"systemd:domain=INET:name={name}",
        ]
        super().__init__(command, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": name})
        self.sock = sock

    def spawn(self) -> None:
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self,
            self.command[0],
            self.command,
            env=self.env,
            path=str(REPO_ROOT),
            childFDs={0: "w", 1: "r", 2: "r", 3: self.sock.fileno()},
        )
        self.running = True


class SocketActivationTests(TestCase):
    """
    The daemon serves on a socket it inherits, and a restart refuses no
    connection (the socket outlives the process, as with aiproxy.socket).
    """

    def listening_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        os.set_inheritable(sock.fileno(), True)
        self.addCleanup(sock.close)
        return sock

    async def start(self, config: Path, sock: socket.socket) -> _ActivatedDaemon:
        daemon = _ActivatedDaemon(config, sock)
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        daemon.spawn()
        return daemon

    async def test_activation_and_restart(self) -> None:
        """
        A request sent to the socket before the daemon is up is answered
        once it is; after SIGTERM (exit 0) a connection is still accepted by
        the socket and answered by the next daemon.
        """
        mock = await start_mock(self)
        config = write_config(Path(self.mktemp()).resolve(), {"routes": [proxy_route(mock)]})
        sock = self.listening_socket()
        port = sock.getsockname()[1]

        first = await self.start(config, sock)
        answer = await in_thread(http_call, port, "POST", "/v1/chat/completions", CHAT, None, 20)
        self.assertEqual(answer.status, 200)
        self.assertTrue(
            any("GatewaySite starting on" in line for line in first.lines), first.output
        )
        first.signal("TERM")
        self.assertEqual(await first.wait_exit(10), 0, first.output)

        # Nothing runs, yet the socket accepts; the next daemon answers.
        pending = in_thread(http_call, port, "POST", "/v1/chat/completions", CHAT, None, 20)
        second = await self.start(config, sock)
        answer = await pending
        self.assertEqual(answer.status, 200)
        await wait_until(
            lambda: (
                sum(line.startswith("{") for line in first.stdout_lines + second.stdout_lines) == 2
            ),
            5,
            what="one access record from each daemon",
        )
        self.assertNotIn("Traceback", first.output + second.output)
        second.signal("TERM")
        self.assertEqual(await second.wait_exit(10), 0, second.output)
        await wait_until(lambda: not second.running, 5)

    async def test_wrong_pid_ignored(self) -> None:
        """
        Sockets meant for another process (C{LISTEN_PID} not ours) are not
        adopted: the daemon refuses to start, saying why, instead of
        serving on them.
        """
        sock = self.listening_socket()
        config = write_config(Path(self.mktemp()).resolve(), {"routes": []})
        daemon = _ActivatedDaemon(config, sock)
        daemon.command[2] = 'LISTEN_PID=1; export LISTEN_PID; exec "$@"'
        daemon.spawn()
        self.addCleanup(lambda: Deferred.fromCoroutine(daemon.stop()))
        code = await daemon.wait_exit(20)
        self.assertNotEqual(code, 0)
        self.assertIn(
            "cannot listen on 'systemd:domain=INET:name=aiproxy': no such socket was passed by systemd",
            daemon.output,
        )
        self.assertNotIn("Traceback", daemon.output)
