# -*- test-case-name: tests.test_security_e2e -*-
"""
Security through the real daemon: TLS to upstreams verified by default
(a self-signed upstream fails closed; a test CA given as C{ssl_ca_file}
works), TLS on the listener, secrets that never show (not in anything the
daemon printed, not in a response, not in the metrics) and client
credentials that are not forwarded, the request head and body limits, and
request targets and C{Host} headers that never steer the upstream URL.

The certificates are made at test time with C{cryptography}.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aiproxy.testing.upstream import MockUpstream
from tests.daemon import (
    ROUTE_API_KEY,
    MockServer,
    RawHTTPClient,
    RawResponse,
    _TrackingSite,
    closed_port,
    http_call,
    in_thread,
    proxy_route,
    start_daemon,
    start_mock,
)
from tests.helpers import certificate, key_pem
from tests.test_proxy import Gateway, make_table, request_bytes

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CHAT_STREAM = {**CHAT, "stream": True}

#: The secrets of the secret-hygiene test: the route's, then the client's.
HEADER_SECRET = "sk-header-secret-7f3a9c2e11d4"
QUERY_SECRET = "query-secret-5b8e0d6a93c7"
CLIENT_SECRET = "client-bearer-secret-2c9f41e8a0"
COOKIE_SECRET = "cookie-secret-e61b07d3f95a"
SECRETS = (HEADER_SECRET, QUERY_SECRET, CLIENT_SECRET, COOKIE_SECRET, ROUTE_API_KEY)

CRASH_WORDS = ("Traceback", "Unhandled Error", "Unhandled error")


# -- certificates ------------------------------------------------------------------


def _write_pair(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    key_path = directory / f"{stem}.key"
    cert_path = directory / f"{stem}.pem"
    key_path.write_bytes(key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


#: The names of the test certificates (not the CA's).
_HOSTNAMES = ("localhost", "127.0.0.1")


class Certificates:
    """
    A test CA with a leaf for C{localhost}/C{127.0.0.1}, and a self-signed
    certificate for the same names, written as PEM files.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = certificate(ca_key, "aiproxy test CA", ca_key, "aiproxy test CA", ca=True)
        _, self.ca = _write_pair(directory, "ca", ca_key, ca)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = certificate(
            leaf_key, "localhost", ca_key, "aiproxy test CA", ca=False, hostnames=_HOSTNAMES
        )
        self.leaf_key, self.leaf = _write_pair(directory, "leaf", leaf_key, leaf)
        own_key = ec.generate_private_key(ec.SECP256R1())
        own = certificate(
            own_key, "localhost", own_key, "localhost", ca=False, hostnames=_HOSTNAMES
        )
        self.self_signed_key, self.self_signed = _write_pair(directory, "self-signed", own_key, own)


def ssl_endpoint(key: Path, cert: Path, port: int = 0) -> str:
    """
    A loopback C{ssl:} server endpoint string.
    """
    return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"


async def start_tls_mock(testcase: TestCase, key: Path, cert: Path) -> MockServer:
    """
    A mock upstream served over TLS with C{cert}, stopped by the test's
    cleanup.
    """
    upstream = MockUpstream(reactor)
    site = _TrackingSite(upstream.resource())
    listening = await serverFromString(reactor, ssl_endpoint(key, cert)).listen(site)
    mock = MockServer(upstream, listening.getHost().port, site, listening)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(mock.stop()))
    return mock


# -- raw requests ------------------------------------------------------------------


def raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """
    Send C{head} (and C{body}) as they are and read until the server
    closes or stops answering: everything it sent.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                if _complete(received):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return received


def _complete(raw: bytes) -> bool:
    """
    Whether C{raw} holds a whole response with a C{Content-Length}.
    """
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


def chat_head(
    target: bytes, host: bytes | None = b"127.0.0.1", body: bytes = b"", extra: bytes = b""
) -> bytes:
    """
    A POST request head for C{target} with a JSON body of C{len(body)}.
    """
    lines = [b"POST " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


class TLSUpstreamTests(TestCase):
    """
    C{ssl_verify} (default true) and C{ssl_ca_file}.
    """

    async def test_verification(self) -> None:
        """
        A self-signed upstream fails closed with a 502 that says why; the
        same upstream with C{ssl_verify: false} works; an upstream whose
        certificate a test CA issued works once that CA is the route's
        C{ssl_ca_file}, by name and by address, and fails without it.
        """
        certs = Certificates(Path(self.mktemp()).resolve())
        untrusted = await start_tls_mock(self, certs.self_signed_key, certs.self_signed)
        trusted = await start_tls_mock(self, certs.leaf_key, certs.leaf)
        routes = [
            proxy_route(
                route_id="self-signed",
                uri="/self-signed",
                endpoint=f"https://127.0.0.1:{untrusted.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="unverified",
                uri="/unverified",
                ssl_verify=False,
                endpoint=f"https://127.0.0.1:{untrusted.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="ca-name",
                uri="/ca-name",
                ssl_ca_file=str(certs.ca),
                endpoint=f"https://localhost:{trusted.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="ca-ip",
                uri="/ca-ip",
                ssl_ca_file=str(certs.ca),
                streaming_flush_interval_ms=0,
                endpoint=f"https://127.0.0.1:{trusted.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="no-ca",
                uri="/no-ca",
                endpoint=f"https://localhost:{trusted.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="wrong-ca",
                uri="/wrong-ca",
                ssl_ca_file=str(certs.self_signed),
                endpoint=f"https://localhost:{trusted.port}/v1/chat/completions",
            ),
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None

        for path in ("/self-signed", "/no-ca", "/wrong-ca"):
            response = await in_thread(http_call, port, path=path, body=CHAT)
            self.assertEqual(response.status, 502, path)
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertIn("certificate verify failed", response.json()["message"], path)
        self.assertEqual(untrusted.stats()["requests"], 0)
        self.assertEqual(trusted.stats()["requests"], 0)

        response = await in_thread(http_call, port, path="/unverified", body=CHAT)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["object"], "chat.completion")
        for path in ("/ca-name", "/ca-ip"):
            response = await in_thread(http_call, port, path=path, body=CHAT)
            self.assertEqual(response.status, 200, path)
        response = await in_thread(http_call, port, path="/ca-ip", body=CHAT_STREAM)
        self.assertTrue(response.complete)
        self.assertIn(b"data: [DONE]", response.body)
        self.assertEqual(untrusted.stats()["requests"], 1)
        self.assertEqual(trusted.stats()["requests"], 3)
        records = await daemon.wait_for_records(7)
        self.assertEqual(
            [(r["route_id"], r["status"], r["abort_reason"]) for r in records[:3]],
            [
                ("self-signed", 502, "upstream_error"),
                ("no-ca", 502, "upstream_error"),
                ("wrong-ca", 502, "upstream_error"),
            ],
        )
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )


class TLSListenerTests(TestCase):
    """
    The daemon's listener on an C{ssl:} endpoint.
    """

    async def test_ssl_listener(self) -> None:
        """
        A client trusting the test CA talks to the daemon over TLS (next to
        a plain listener) and gets streamed and whole answers.
        """
        certs = Certificates(Path(self.mktemp()).resolve())
        mock = await start_mock(self)
        tls_port = closed_port()
        daemon = await start_daemon(
            self,
            [proxy_route(mock, streaming_flush_interval_ms=0)],
            args=["--listen", ssl_endpoint(certs.leaf_key, certs.leaf, tls_port)],
        )
        context = ssl.create_default_context(cafile=str(certs.ca))

        def over_tls(body: dict[str, Any]) -> tuple[str, RawResponse]:
            client = RawHTTPClient(tls_port)
            client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
            try:
                version = client.sock.version() or ""
                client.send_request("POST", "/v1/chat/completions", body)
                return version, client.read_body(client.read_head())
            finally:
                client.close()

        version, response = await in_thread(over_tls, CHAT_STREAM)
        self.assertTrue(version.startswith("TLS"))
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertIn(b"data: [DONE]", response.body)
        _, response = await in_thread(over_tls, CHAT)
        self.assertEqual(response.json()["object"], "chat.completion")

        def plain_to_tls() -> bytes:
            return raw_exchange(tls_port, chat_head(b"/v1/chat/completions"), timeout=2)

        self.assertFalse((await in_thread(plain_to_tls)).startswith(b"HTTP/1.1 200"))
        response = await in_thread(http_call, daemon.port, body=CHAT)
        self.assertEqual(response.status, 200)
        self.assertEqual(mock.stats()["requests"], 3)


class SecretTests(TestCase):
    """
    No API key, C{auth.query} value or C{authorization} header ever shows,
    and client credentials are not forwarded when the route has its own.
    """

    async def test_secrets_never_show(self) -> None:
        """
        Successful, failing, refused and oversized requests on routes with an
        C{auth.header} and an C{auth.query} secret (and payload logging on):
        the upstream gets the route's credentials, never the client's
        C{authorization} or C{cookie}; no secret is in anything the daemon
        printed, in any response (bodies, error bodies, headers) or in the
        metrics.
        """
        certs = Certificates(Path(self.mktemp()).resolve())
        mock = await start_mock(self)
        tls_mock = await start_tls_mock(self, certs.self_signed_key, certs.self_signed)
        auth = {
            "header": {"Authorization": f"Bearer {HEADER_SECRET}"},
            "query": {"key": QUERY_SECRET},
        }
        logging = {"summaries": True, "payloads": True}
        routes = [
            proxy_route(
                mock,
                "secret",
                "/secret",
                auth=auth,
                logging=logging,
                streaming_flush_interval_ms=0,
                max_req_body_size=2000,
            ),
            proxy_route(mock, "slow", "/slow", auth=auth, logging=logging, timeout=300),
            proxy_route(
                route_id="refused",
                uri="/refused",
                auth=auth,
                logging=logging,
                endpoint=f"http://127.0.0.1:{closed_port()}/v1/chat/completions?region=x",
            ),
            proxy_route(
                route_id="tls",
                uri="/tls",
                auth=auth,
                logging=logging,
                endpoint=f"https://127.0.0.1:{tls_mock.port}/v1/chat/completions",
            ),
            proxy_route(
                route_id="dns",
                uri="/dns",
                auth=auth,
                logging=logging,
                endpoint="http://upstream.invalid/v1/chat/completions",
            ),
        ]
        metrics_port = closed_port()
        daemon = await start_daemon(
            self,
            config={
                "routes": routes,
                "metrics_listen": f"tcp:port={metrics_port}:interface=127.0.0.1",
            },
        )
        port = daemon.port
        assert port is not None
        client_headers = {
            "Authorization": f"Bearer {CLIENT_SECRET}",
            "Cookie": f"session={COOKIE_SECRET}",
            "X-Api-Key": CLIENT_SECRET,
        }
        calls: list[tuple[str, Any, dict[str, str]]] = [
            ("/secret", CHAT, {}),
            ("/secret", CHAT_STREAM, {}),
            ("/secret", CHAT, {"x-mock-status": "401"}),
            ("/secret", CHAT_STREAM, {"x-mock-status": "500"}),
            ("/secret", CHAT_STREAM, {"x-mock-truncate": "1"}),
            ("/secret", b"{not json", {}),
            ("/secret", {"messages": "x" * 3000}, {}),
            ("/secret", CHAT, {"Content-Type": "text/plain"}),
            ("/slow", CHAT, {"x-mock-first-delay-ms": "2000"}),
            ("/refused", CHAT, {}),
            ("/tls", CHAT, {}),
            ("/dns", CHAT, {}),
            ("/nowhere", CHAT, {}),
        ]
        responses: list[RawResponse] = []
        for path, body, headers in calls:
            responses.append(
                await in_thread(
                    http_call, port, path=path, body=body, headers={**client_headers, **headers}
                )
            )
        statuses = [r.status for r in responses]
        self.assertEqual(statuses[:4], [200, 200, 401, 500])
        self.assertEqual(statuses[5:], [400, 413, 400, 504, 502, 502, 502, 404])

        seen = mock.requests()
        self.assertEqual(len(seen), 6)
        for record in seen:
            headers = record["headers"]
            self.assertEqual(headers["authorization"], [f"Bearer {HEADER_SECRET}"])
            self.assertNotIn("cookie", headers)
            self.assertNotIn("x-api-key", headers)
            self.assertIn(f"key={QUERY_SECRET}", record["path"])

        def scrape_metrics() -> bytes:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=5
            ) as answer:
                return answer.read()  # type: ignore[no-any-return]

        metrics = await in_thread(scrape_metrics)
        self.assertIn(b"aiproxy_requests_total", metrics)
        await daemon.wait_for_records(len(calls))

        exposed = {
            "daemon output": daemon.output,
            "metrics": metrics.decode("utf-8", "replace"),
        }
        for (path, _, _), response in zip(calls, responses, strict=True):
            exposed[f"response {path} {response.status}"] = (
                json.dumps(response.headers) + "\n" + response.body.decode("utf-8", "replace")
            )
        for where, text in exposed.items():
            for secret in SECRETS:
                self.assertNotIn(secret, text, f"{secret} in {where}")
        self.assertTrue(any("aborting" in line for line in daemon.lines))
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )


class HeadLimitTests(SynchronousTestCase):
    """
    The request head limits of L{aiproxy.server.GatewayChannel}, without
    sockets.
    """

    def refused(self, data: bytes) -> tuple[int, Any, Gateway]:
        gateway = Gateway(self, make_table())
        gateway.channel.dataReceived(data)
        response = gateway.response()
        self.assertTrue(gateway.closed)
        self.assertEqual(response.header("connection"), "close")
        self.assertEqual(response.header("content-type"), "application/json")
        return response.status, response.json(), gateway

    def test_too_many_headers(self) -> None:
        """
        More than 500 headers: 431 with a JSON body, and an access record.
        """
        status, body, gateway = self.refused(
            request_bytes(headers={b"x-h%d" % i: b"v" for i in range(600)})
        )
        self.assertEqual((status, body), (431, {"message": "request header fields too large"}))
        self.assertEqual(gateway.record["abort_reason"], "request_headers_too_large")
        self.assertEqual(gateway.record["path"], "/v1/chat/completions")
        self.assertEqual(gateway.client.calls, [])

    def test_head_too_large(self) -> None:
        """
        A head of more than 16 KiB in total: 431.
        """
        status, _, _ = self.refused(
            request_bytes(headers={b"x-h%d" % i: b"a" * 1000 for i in range(20)})
        )
        self.assertEqual(status, 431)

    def test_header_line_too_long(self) -> None:
        """
        One header line longer than 16 KiB: 431 (Twisted alone would close
        the connection without an answer).
        """
        status, _, _ = self.refused(request_bytes(headers={b"x-big": b"a" * 20000}))
        self.assertEqual(status, 431)

    def test_request_line_too_long(self) -> None:
        """
        A request line longer than 16 KiB: 414.
        """
        status, body, gateway = self.refused(
            request_bytes(path=b"/v1/chat/completions?" + b"a" * 20000)
        )
        self.assertEqual((status, body), (414, {"message": "request line too long"}))
        self.assertEqual(gateway.record["abort_reason"], "request_line_too_long")

    def test_malformed(self) -> None:
        """
        A header line without a colon, or a bad request line: 400.
        """
        for data in (
            b"POST /v1/chat/completions HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ):
            status, body, _ = self.refused(data)
            self.assertEqual((status, body), (400, {"message": "bad request"}), data)

    def test_nothing_read_after_refusal(self) -> None:
        """
        Bytes arriving after the refusal are ignored: one answer only.
        """
        gateway = Gateway(self, make_table())
        gateway.channel.dataReceived(b"POST /x HTTP/1.1\r\nbad\r\n\r\n")
        gateway.channel.dataReceived(request_bytes())
        self.assertEqual(gateway.raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(gateway.client.calls, [])


class UpstreamTLSFailureTests(SynchronousTestCase):
    """
    A failed TLS handshake with the upstream is named as such.
    """

    def test_message(self) -> None:
        """
        The 502 says that TLS failed and why, not that the upstream closed
        the connection.
        """
        from OpenSSL import SSL
        from twisted.python.failure import Failure
        from twisted.web._newclient import ResponseNeverReceived

        gateway = Gateway(self, make_table())
        gateway.send(CHAT)
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        gateway.upstream.deferred.errback(Failure(ResponseNeverReceived([Failure(error)])))
        response = gateway.response()
        self.assertEqual(response.status, 502)
        self.assertEqual(
            response.json(), {"message": "TLS with upstream failed: certificate verify failed"}
        )
        self.assertEqual(gateway.record["abort_reason"], "upstream_error")


class RequestLimitTests(TestCase):
    """
    Head and body limits through the daemon, and request targets that
    cannot steer the upstream URL.
    """

    async def test_limits_and_targets(self) -> None:
        """
        Oversized heads get 431/414 and oversized bodies 413 before they are
        read; malformed C{Host} headers, absolute-form targets, dot segments
        (plain and percent-encoded) and C{//host} paths get a 4xx or reach
        the route's upstream at its own host and path; a passthrough keeps
        the upstream's host. The daemon serves normally afterwards.
        """
        mock = await start_mock(self)
        routes = [
            proxy_route(mock, "v1", "/v1/*", max_req_body_size=1000),
            proxy_route(mock, "any", "/*"),
        ]
        daemon = await start_daemon(self, routes)
        port = daemon.port
        assert port is not None
        body = json.dumps(CHAT).encode()

        async def raw(head: bytes, data: bytes = b"") -> bytes:
            return await in_thread(raw_exchange, port, head, data)

        heads = {
            "many headers": chat_head(
                b"/v1/chat/completions", extra=b"".join(b"x-h%d: v\r\n" % i for i in range(600))
            ),
            "long header": chat_head(
                b"/v1/chat/completions", extra=b"x-big: " + b"a" * 20000 + b"\r\n"
            ),
            "long target": chat_head(b"/v1/chat/completions?" + b"a" * 20000),
        }
        expected = {"many headers": 431, "long header": 431, "long target": 414}
        for name, head in heads.items():
            answer = await raw(head, body)
            self.assertEqual(status_of(answer), expected[name], name)
            self.assertIn(b"connection: close", answer.lower())
            self.assertIn(b'"message"', body_of(answer))

        answer = await raw(chat_head(b"/v1/chat/completions", body=b"x" * 5000))
        self.assertEqual(status_of(answer), 413)
        self.assertEqual(
            json.loads(body_of(answer)),
            {
                "message": "could not get body: request size 5000 is greater than the maximum size 1000 allowed"
            },
        )
        chunked = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"258\r\n" + b"x" * 600 + b"\r\n" for _ in range(3))
        )
        self.assertEqual(status_of(await raw(chunked)), 413)
        self.assertEqual(mock.stats()["requests"], 0)

        targets: list[tuple[bytes, bytes | None]] = [
            (b"/v1/chat/completions", b"evil.example"),
            (b"/v1/chat/completions", b"127.0.0.1:1@evil.example:80"),
            (b"/v1/chat/completions", b""),
            (b"/v1/chat/completions", None),
            (b"http://evil.example/v1/chat/completions", b"evil.example"),
            (b"https://evil.example:8443/v1/chat/completions", b"127.0.0.1"),
            (b"//evil.example/v1/chat/completions", b"127.0.0.1"),
            (b"/v1//evil.example/x", b"127.0.0.1"),
            (b"/v1/../../etc/passwd", b"127.0.0.1"),
            (b"/v1/%2e%2e/%2e%2e/admin", b"127.0.0.1"),
            (b"/v1/chat/completions/..%2f..%2fadmin", b"127.0.0.1"),
            (b"/%2F%2Fevil.example/x", b"127.0.0.1"),
            (b"/v1/chat/completions#@evil.example/x", b"127.0.0.1"),
            (b"/v1/chat/completions?url=http://evil.example/&key=1", b"127.0.0.1"),
            (b"@evil.example/x", b"127.0.0.1"),
            (b"evil.example:80", b"127.0.0.1"),
            (b"*", b"127.0.0.1"),
        ]
        for target, host in targets:
            answer = await raw(chat_head(target, host, body), body)
            status = status_of(answer)
            self.assertTrue(status == 200 or 400 <= status < 500, (target, answer))
        passthrough = json.dumps({"anything": 1}).encode()
        for target in (b"//evil.example/x", b"/v1//evil.example/x", b"/%2F%2Fevil.example/x"):
            answer = await raw(chat_head(target, b"evil.example", passthrough), passthrough)
            self.assertIn(status_of(answer), (200, 404), target)

        seen = mock.requests()
        self.assertGreater(len(seen), 5)
        mock_host = f"127.0.0.1:{mock.port}"
        for record in seen:
            self.assertEqual(record["headers"]["host"], [mock_host], record["path"])
            if record["body"] == passthrough.decode():
                self.assertFalse(record["path"].startswith(("http:", "https:")))
            else:
                self.assertEqual(record["path"], "/v1/chat/completions")

        response = await in_thread(http_call, port, body=CHAT_STREAM)
        self.assertTrue(response.complete)
        self.assertTrue(daemon.running)
        self.assertFalse(
            [line for line in daemon.lines if any(word in line for word in CRASH_WORDS)]
        )
