# -*- test-case-name: tests.test_e2e_plugins -*-
"""
End-to-end tests of the filter plugins through the real C{twistd aiproxy}
daemon and the mock upstream: the four built-ins, including values split
across upstream chunks and events, and a third-party plugin package
installed with pip and found by Twisted's plugin system.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from openai import OpenAI
from twisted.trial.unittest import TestCase

from aiproxy.builtin.prompt_guard import PROHIBITED
from aiproxy.stream.sse import SSEDecoder
from tests.daemon import (
    REPO_ROOT,
    ROUTE_API_KEY,
    http_call,
    in_thread,
    proxy_route,
    run_command,
    start_daemon,
    start_mock,
    wait_until,
)
from tests.helpers import write_config

EXAMPLE = REPO_ROOT / "docs" / "examples" / "aiproxy-wordcount"

EMAIL_RULE = {"pattern": r"[\w.+-]+@[\w-]+\.[\w.]+", "replacement": "[email]"}


def pieces(text: str, events: int) -> list[str]:
    """
    How the mock splits C{text} into C{events} content events.
    """
    parts = min(events, len(text))
    return [text[len(text) * i // parts : len(text) * (i + 1) // parts] for i in range(parts)]


def straddles(text: str, events: int, secret: str) -> bool:
    """
    Whether the mock's split of C{text} cuts C{secret} in two.
    """
    start = text.index(secret)
    offset = 0
    for piece in pieces(text, events):
        offset += len(piece)
        if start < offset < start + len(secret):
            return True
    return False


def stream_events(body: bytes) -> list[Any]:
    """
    The data of every event of a stream body, parsed; the body must end at
    an event boundary and every data must be JSON or C{[DONE]}.
    """
    decoder = SSEDecoder()
    events = decoder.feed(body)
    assert decoder.pending == 0, body
    return [e.data.decode() if e.data == b"[DONE]" else json.loads(e.data) for e in events]


def stream_text(body: bytes) -> str:
    """
    The content text of an OpenAI chat stream body.
    """
    return "".join(
        choice["delta"].get("content") or ""
        for data in stream_events(body)
        if isinstance(data, dict)
        for choice in data.get("choices", [])
    )


def chat(text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "gpt-e2e", "stream": stream, "messages": [{"role": "user", "content": text}]}


def mock_headers(**controls: Any) -> dict[str, str]:
    return {f"x-mock-{name.replace('_', '-')}": str(value) for name, value in controls.items()}


class BuiltinPluginTests(TestCase):
    """
    The four built-ins on one daemon.
    """

    async def test_builtins(self) -> None:
        """
        ai-response-guard finds a deny pattern split across two upstream
        events written in halves, before it reaches the client, and ends
        the stream with a refusal (or answers C{deny_code} when nothing
        was sent); ai-response-redact redacts a secret split the same way,
        in valid events the OpenAI SDK reads; ai-prompt-guard refuses a
        prompt with APISIX's message and ai-prompt-decorator's messages
        reach the upstream.
        """
        mock = await start_mock(self)
        routes = [
            proxy_route(
                mock,
                route_id="guard",
                uri="/guard/v1/chat/completions",
                streaming_flush_interval_ms=0,
                plugins={
                    "ai-response-guard": {
                        "deny_patterns": ["forbidden"],
                        "deny_message": "denied by policy",
                    }
                },
            ),
            proxy_route(
                mock,
                route_id="guard403",
                uri="/guard403/v1/chat/completions",
                plugins={"ai-response-guard": {"deny_patterns": ["forbidden"], "deny_code": 403}},
            ),
            proxy_route(
                mock,
                route_id="redact",
                uri="/redact/v1/chat/completions",
                plugins={"ai-response-redact": {"rules": [EMAIL_RULE]}},
            ),
            proxy_route(
                mock,
                route_id="prompt",
                uri="/prompt/v1/chat/completions",
                plugins={
                    "ai-prompt-guard": {"deny_patterns": ["pass(word)?"]},
                    "ai-prompt-decorator": {
                        "prepend": [{"role": "system", "content": "Be brief."}]
                    },
                },
            ),
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None

        # The guard, after output: "forbidden" straddles two content events,
        # every upstream write is split in two HTTP chunks.
        text = "this is forbidden stuff and then some more text"
        self.assertTrue(straddles(text, 6, "forbidden"))
        controls = mock_headers(text=text, events=6, split_events=1, delay_ms=30)
        response = await in_thread(
            http_call, port, "POST", "/guard/v1/chat/completions", chat("go"), controls
        )
        self.assertEqual(response.status, 200, (response.body, daemon.output))
        self.assertTrue(response.complete)
        self.assertNotIn(b"forb", response.body)
        self.assertEqual(stream_text(response.body), "this is denied by policy")
        events = stream_events(response.body)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        await wait_until(
            lambda: mock.stats()["streams_aborted"] == 1, what="the upstream stream to be aborted"
        )
        records = await daemon.wait_for_records(1)
        self.assertEqual(records[-1]["abort_reason"], "ai_response_guard")

        # The guard, before output: the first content event matches.
        self.assertEqual(pieces("forbidden stuff here now", 2)[0], "forbidden st")
        controls = mock_headers(text="forbidden stuff here now", events=2, burst=2, split_events=1)
        response = await in_thread(
            http_call, port, "POST", "/guard403/v1/chat/completions", chat("go"), controls
        )
        self.assertEqual(response.status, 403)
        self.assertEqual(response.headers["content-type"], "text/event-stream")
        self.assertEqual(stream_text(response.body), "your request is rejected")
        self.assertEqual(stream_events(response.body)[-1], "[DONE]")

        # The guard on a non-streamed answer.
        controls = mock_headers(text="all forbidden", events=2)
        response = await in_thread(
            http_call,
            port,
            "POST",
            "/guard403/v1/chat/completions",
            chat("go", stream=False),
            controls,
        )
        self.assertEqual(response.status, 403)
        refusal = response.json()
        self.assertEqual(refusal["object"], "chat.completion")
        self.assertEqual(refusal["choices"][0]["message"]["content"], "your request is rejected")

        # The redactor: "user@exa" + "mple.com" in two events, split writes.
        text = "mail user@exa" + "mple.com now!"
        self.assertEqual(pieces(text, 2), ["mail user@exa", "mple.com now!"])
        controls = mock_headers(text=text, events=2, split_events=1)
        response = await in_thread(
            http_call, port, "POST", "/redact/v1/chat/completions", chat("go"), controls
        )
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertEqual(stream_text(response.body), "mail [email] now!")
        self.assertNotIn(b"user@", response.body)
        self.assertEqual(stream_events(response.body)[-1], "[DONE]")

        def sdk_stream() -> str:
            client = OpenAI(
                base_url=f"http://127.0.0.1:{port}/redact/v1", api_key="client-key", max_retries=0
            )
            stream = client.chat.completions.create(
                model="gpt-e2e",
                messages=[{"role": "user", "content": "go"}],
                stream=True,
                extra_headers=mock_headers(
                    text="reach me at bob@example.org or alice@exa" + "mple.net",
                    events=7,
                    split_events=1,
                ),
            )
            return "".join(
                chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
            )

        self.assertEqual(await in_thread(sdk_stream), "reach me at [email] or [email]")

        # The redactor on a non-streamed answer.
        controls = mock_headers(text="mail a@b.com", events=2)
        response = await in_thread(
            http_call,
            port,
            "POST",
            "/redact/v1/chat/completions",
            chat("go", stream=False),
            controls,
        )
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "mail [email]")

        # The prompt guard and the decorator.
        before = mock.stats()["requests"]
        response = await in_thread(
            http_call,
            port,
            "POST",
            "/prompt/v1/chat/completions",
            chat("my password is x", stream=False),
        )
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json(), {"message": PROHIBITED})
        self.assertEqual(mock.stats()["requests"], before)
        response = await in_thread(
            http_call, port, "POST", "/prompt/v1/chat/completions", chat("hello", stream=False)
        )
        self.assertEqual(response.status, 200)
        sent = json.loads(mock.requests()[-1]["body"])
        self.assertEqual(
            sent["messages"],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        )


def _install_command(target: Path, source: Path) -> list[str]:
    """
    The pip command installing the example package into C{target}: without
    build isolation when this environment can build it (no download).
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--target",
        str(target),
    ]
    if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
        command.append("--no-build-isolation")
    return command + [str(source)]


class ThirdPartyPluginTests(TestCase):
    """
    A plugin shipped as its own package.
    """

    timeout = 240

    async def test_wordcount_package(self) -> None:
        """
        Before the example package is installed a route naming
        C{word-count} is a config error; after C{pip install} (into a
        directory on the daemon's C{PYTHONPATH}) and a refreshed dropin
        cache, the package's own tests pass and the daemon routes traffic
        through the plugin without any change to aiproxy.
        """
        work = Path(self.mktemp()).resolve()
        source = work / "src"
        target = work / "site"
        shutil.copytree(
            EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        )
        mock = await start_mock(self)
        route = proxy_route(mock, streaming_flush_interval_ms=0, plugins={"word-count": {}})
        config = write_config(work, {"routes": [route]})

        code, output = await run_command(self, [sys.executable, "-m", "aiproxy.check", str(config)])
        self.assertEqual(code, 1, output)
        self.assertIn("routes[0].plugins.word-count: unknown plugin 'word-count'", output)

        code, output = await run_command(self, _install_command(target, source), timeout=180)
        self.assertEqual(code, 0, output)
        env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(target)])}
        refresh = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
        code, output = await run_command(self, [sys.executable, "-c", refresh], env=env)
        self.assertEqual(code, 0, output)
        self.assertTrue((target / "twisted" / "plugins" / "dropin.cache").exists())
        code, output = await run_command(
            self, [sys.executable, "-m", "twisted.trial", "aiproxy_wordcount"], env=env, timeout=60
        )
        self.assertEqual(code, 0, output)
        code, output = await run_command(
            self, [sys.executable, "-m", "aiproxy.check", str(config)], env=env
        )
        self.assertEqual(code, 0, output)

        daemon = await start_daemon(self, [route], env=env)
        assert daemon.port is not None
        controls = mock_headers(text="one two three four five", events=3)
        response = await in_thread(
            http_call, daemon.port, "POST", "/v1/chat/completions", chat("count"), controls
        )
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertTrue(response.body.endswith(b": words=5\n\n"), response.body[-80:])
        self.assertEqual(stream_text(response.body), "one two three four five")
        await daemon.wait_for_line("word-count: route chat answered 5 words")
        self.assertNotIn(ROUTE_API_KEY, daemon.output)
