"""
Helpers several test modules share: the data of a streamed body, log event
capture, config files, TLS certificates made at test time, and the events and
contexts of the conversion tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.config import PROXY_PLUGINS, parse_config
from aiproxy.context import ExchangeContext
from aiproxy.routing.build import build_routes
from aiproxy.schema import load_schema
from aiproxy.stream.sse import SSEDecoder

__all__ = [
    "certificate",
    "data_events",
    "feed_all",
    "key_pem",
    "log_events",
    "write_config",
]


def data_events(body: bytes) -> list[bytes]:
    """
    The C{data} values of an SSE body, in order.
    """
    return [
        line[len(b"data: ") :]
        for block in body.replace(b"\r\n", b"\n").split(b"\n\n")
        for line in block.split(b"\n")
        if line.startswith(b"data: ")
    ]


T = TypeVar("T")


class _Decoder(Protocol[T]):
    def feed(self, data: bytes) -> list[T]: ...

    def close(self) -> list[T]: ...


def feed_all(decoder: _Decoder[T], chunks: Iterable[bytes]) -> list[T]:
    """
    Feed chunks to a stream decoder in order, then close it: everything it
    decoded.
    """
    decoded = []
    for chunk in chunks:
        decoded.extend(decoder.feed(chunk))
    decoded.extend(decoder.close())
    return decoded


def log_events(testcase: SynchronousTestCase, namespace: str | None = None) -> list[dict[str, Any]]:
    """
    A list that collects the log events emitted until the test ends: all
    of them, or those of C{namespace}.
    """
    events: list[dict[str, Any]] = []

    def collect(event: dict[str, Any]) -> None:
        if namespace is None or event.get("log_namespace") == namespace:
            events.append(event)

    observer = cast(ILogObserver, collect)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def write_config(
    directory: str | Path, document: Mapping[str, Any] | str, name: str = "aiproxy.yaml"
) -> Path:
    """
    Write a config (a document, or YAML text as it is) into C{directory}.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    path = path / name
    text = (
        document if isinstance(document, str) else yaml.safe_dump(dict(document), sort_keys=False)
    )
    path.write_text(text, encoding="utf-8")
    return path


def certificate(
    key: ec.EllipticCurvePrivateKey,
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: str,
    ca: bool,
    hostnames: Sequence[str] = (),
) -> x509.Certificate:
    """
    A certificate for C{key} with common name C{subject}, signed by
    C{issuer_key} (common name C{issuer}), valid from an hour ago for a day.

    @param hostnames: the names (DNS names or IP addresses) it is valid
        for; none, no C{subjectAltName}.
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hostnames:
        names = [_general_name(hostname) for hostname in hostnames]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """
    C{key} as unencrypted PKCS#8 PEM.
    """
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


# -- protocol conversion -------------------------------------------------------


def make_context(model: str | None = None) -> ExchangeContext:
    """
    A fresh context, C{model} being the model sent upstream.
    """
    context = ExchangeContext("route", "instance", 12.5)
    context.llm_model = model
    return context


def user(content: Any = "Hello") -> dict[str, Any]:
    """
    A user message.
    """
    return {"role": "user", "content": content}


def compact(document: Any) -> bytes:
    """
    C{document} as the converter writes JSON.
    """
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def block_start(index: int, block: dict[str, Any]) -> tuple[str, Any]:
    """
    A C{content_block_start} event.
    """
    return (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def block_delta(index: int, delta: dict[str, Any]) -> tuple[str, Any]:
    """
    A C{content_block_delta} event.
    """
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> tuple[str, Any]:
    """
    A C{content_block_stop} event.
    """
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def feed_stream(streamer: Any, context: ExchangeContext, pieces: Iterable[bytes]) -> bytes:
    """
    What a stream converter writes for an upstream SSE stream arriving in
    C{pieces} (each decoded as it comes), its end included.
    """
    decoder = SSEDecoder()
    out = b""
    for piece in pieces:
        events = decoder.feed(piece)
        if events:
            out += streamer.convert_events(events, context)
    return out + streamer.finish(context)


def build_table(*routes: Mapping[str, Any]) -> Any:
    """
    Load and build C{routes} as the daemon does (no filter plugins).

    @raise ConfigError: with the problems found.
    """
    schemas = {name: load_schema(name) for name in PROXY_PLUGINS}
    config = parse_config(json.dumps({"routes": list(routes)}), {}, schemas)
    return build_routes(config, Clock(), plugins={})
