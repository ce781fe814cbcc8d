# -*- test-case-name: tests.test_request -*-
"""
The request path (docs/architecture.md): checking the client's body, detecting its
protocol, and building the upstream URL, headers and body.

Everything here is a pure function of the client request and the route's
config, so it is tested without sockets.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.web.http_headers import Headers

from aiproxy.stream.protocols import OPENAI_CHAT, PASSTHROUGH, detect_protocol

if TYPE_CHECKING:
    # Only a type here: providers import their rules' modules, which use this one.
    from aiproxy.upstream.providers import Provider

__all__ = [
    "ClientError",
    "Target",
    "apply_body_overrides",
    "check_content_type",
    "deep_merge",
    "default_base_url",
    "detect",
    "model_of",
    "parse_body",
    "too_large_message",
    "upstream_headers",
    "upstream_url",
]

#: Hop-by-hop headers (RFC 9110 section 7.6.1) and those aiproxy sets itself.
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"expect",
        b"content-type",
    }
)

_MISSING = object()

#: Client credentials that never travel upstream when the route has its own.
_CLIENT_CREDENTIALS = frozenset({b"authorization", b"cookie", b"x-api-key", b"api-key"})


class ClientError(Exception):
    """
    The client's request is refused: C{status} with a JSON body,
    C{{"message": message}} unless C{document} gives another (as
    APISIX's C{{"error_msg": ...}}).
    """

    def __init__(self, status: int, message: str, document: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.document = document

    def body(self) -> bytes:
        """
        The JSON body the client gets.
        """
        return json.dumps(self.document or {"message": self.message}).encode("utf-8")


@dataclass(frozen=True)
class Target:
    """
    Where a route sends requests: one provider with its config.

    @ivar name: the instance name in access records.
    @ivar conf: the C{ai-proxy} config (or a multi instance merged with the
        plugin's shared fields).
    """

    name: str
    provider: Provider
    conf: Mapping[str, Any]


def too_large_message(size: int, limit: int) -> str:
    """
    The 413 message of a body of C{size} bytes over C{limit}.
    """
    return (
        f"could not get body: request size {size} is greater than the maximum size {limit} allowed"
    )


def check_content_type(content_type: bytes | None) -> None:
    """
    Refuse a body that does not claim to be JSON (no header counts as JSON).

    @raise ClientError: 400.
    """
    if content_type is None:
        return
    value = content_type.decode("latin-1").strip()
    if not value.lower().startswith("application/json"):
        raise ClientError(
            400, f"unsupported content-type: {value}, only application/json is supported"
        )


#: A C{\\uD800}-C{\\uDFFF} escape: the body may hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> Any:
    """
    Refuse C{NaN}, C{Infinity} and C{-Infinity}: Python accepts them, JSON
    does not, and the body may be serialised again for upstream.
    """
    raise ValueError(f"invalid JSON constant {name}")


def _parse_float(text: str) -> float:
    """
    A JSON number that is not an integer; refuse one too large for a float
    (it would be serialised again as C{Infinity}).
    """
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is out of range")
    return value


#: The request body's JSON decoder (made once: C{json.loads} with options
#: makes one per call).
_decode_body = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float).decode


def parse_body(raw: bytes) -> dict[str, Any]:
    """
    Parse the client's JSON body.

    @raise ClientError: 400 for an empty, invalid or non-object body, or one
        that could not be serialised again as JSON (C{NaN}, a number out of
        range, a lone surrogate, nesting beyond Python's recursion limit).
    """
    if not raw.strip():
        raise ClientError(400, "could not get body: request body is empty")
    try:
        # What json.loads does with bytes.
        body = _decode_body(raw.decode(json.detect_encoding(raw), "surrogatepass"))
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except ValueError as e:  # also JSONDecodeError and UnicodeError
        raise ClientError(400, f"could not parse JSON request body: {e}") from None
    except RecursionError:
        raise ClientError(400, "could not parse JSON request body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ClientError(400, "could not parse JSON request body: expected a JSON object")
    return body


def _same(a: Any, b: Any) -> bool:
    """
    Whether two JSON values are equal, types included (Python's C{==}
    holds C{1 == 1.0 == True}, which would leave a client's C{1} in place of
    a configured C{true}).
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def deep_merge(target: dict[str, Any], patch: Mapping[str, Any], force: bool) -> bool:
    """
    Merge C{patch} into C{target} in place: objects on both sides are merged
    recursively; anything else is set where C{target} lacks the key, or
    always when C{force} is set (JSON Merge Patch without deletions).

    @return: whether C{target} changed.
    """
    changed = False
    for key, value in patch.items():
        current = target.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(current, dict):
            changed = deep_merge(current, value, force) or changed
        elif (current is _MISSING or force) and not _same(current, value):
            target[key] = copy.deepcopy(value)
            changed = True
    return changed


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """
    Set C{body["a"]["b"]} for C{path} C{("a", "b")}, creating objects on the way.

    @return: whether C{body} changed.
    """
    *parents, leaf = path
    for name in parents:
        child = body.get(name)
        if not isinstance(child, dict):
            child = body[name] = {}
        body = child
    if _same(body.get(leaf, _MISSING), value):
        return False
    body[leaf] = copy.deepcopy(value)
    return True


def apply_body_overrides(body: dict[str, Any], protocol: str, target: Target) -> bool:
    """
    Apply the route's body changes in order: C{options} (flat overwrite),
    C{override.llm_options.max_tokens} (into the provider's field; where
    that is C{max_completion_tokens}, a client C{max_tokens} is removed, as
    APISIX does), C{override.request_body} (deep
    merge), model removal, C{stream_options.include_usage} for streamed
    OpenAI chat, and the provider's own changes (its C{rules}).

    @return: whether the body changed (if not, the client's bytes are sent).
    """
    conf = target.conf
    provider = target.provider
    changed = False
    for key, value in (conf.get("options") or {}).items():
        changed = _set(body, (key,), value) or changed
    override = conf.get("override") or {}
    max_tokens = (override.get("llm_options") or {}).get("max_tokens")
    field = provider.max_tokens_field.get(protocol)
    if max_tokens is not None and field:
        changed = _set(body, tuple(field.split(".")), max_tokens) or changed
        if field == "max_completion_tokens" and "max_tokens" in body:
            # As APISIX: OpenAI refuses a body carrying both (reasoning models).
            del body["max_tokens"]
            changed = True
    patch = (override.get("request_body") or {}).get(protocol)
    if patch:
        changed = (
            deep_merge(body, patch, override.get("request_body_force_override", False)) or changed
        )
    if provider.remove_model and "model" in body:
        del body["model"]
        changed = True
    if protocol == OPENAI_CHAT and body.get("stream") is True:
        changed = _set(body, ("stream_options", "include_usage"), True) or changed
    if provider.rules is not None:
        changed = provider.rules.shape_body(body, protocol, conf) or changed
    return changed


def default_base_url(target: Target) -> str | None:
    """
    The provider's C{scheme://host[:port]} for C{target} without
    C{override.endpoint} (from its config when the provider's rules say
    it), or L{None} when the endpoint is required.
    """
    rules = target.provider.rules
    return rules.base_url(target.conf) if rules is not None else target.provider.base_url


def upstream_url(
    target: Target,
    protocol: str,
    client_path: str,
    client_query: str,
    body: Mapping[str, Any] | None = None,
) -> str:
    """
    The upstream URL: C{override.endpoint} (its path verbatim when it has
    one, even C{/}, else the provider's default path), else the provider's
    default host and path. A provider with C{rules} makes its default path
    from C{body} (bedrock: the model and C{stream}). The query is
    C{auth.query} with the endpoint's own parameters over it (as APISIX
    merges them); the client's query is not forwarded. Passthrough keeps the client's path, and its query goes
    over the endpoint's; the client cannot override C{auth.query}
    parameters.

    @raise ClientError: when the provider's rules find no path (bedrock
        without a model).
    """
    conf = target.conf
    endpoint = (conf.get("override") or {}).get("endpoint")
    base = endpoint or default_base_url(target)
    if base is None:
        raise ClientError(500, f"provider {target.provider.name} needs override.endpoint")
    scheme, netloc, path, query, _ = urlsplit(base)
    params = parse_qsl(query, keep_blank_values=True)
    if protocol == PASSTHROUGH:
        path = client_path
        given = parse_qsl(client_query, keep_blank_values=True)
        names = {k for k, _ in given}
        params = [(k, v) for k, v in params if k not in names] + given
    elif not endpoint or not path:
        rules = target.provider.rules
        if rules is not None:
            path = rules.path(conf, protocol, body or {})
        else:
            path = target.provider.paths[protocol]
    auth_query = (conf.get("auth") or {}).get("query") or {}
    if auth_query:
        if protocol == PASSTHROUGH:
            params = [(k, v) for k, v in params if k not in auth_query] + list(auth_query.items())
        else:
            given_names = {k for k, _ in params}
            params = [(k, v) for k, v in auth_query.items() if k not in given_names] + params
    return urlunsplit((scheme, netloc, path, urlencode(params), ""))


def upstream_headers(
    client_headers: Iterable[tuple[bytes, Sequence[bytes]]], auth: Mapping[str, Any]
) -> Headers:
    """
    The upstream request headers: the client's minus hop-by-hop (also
    those its C{Connection} header names), C{host},
    C{content-length} and C{accept-encoding}, minus its credentials when
    the route supplies its own (C{auth.header}, C{auth.query}, or a
    signature or token from C{auth.aws} or C{auth.gcp}); then
    C{auth.header} (always winning) and
    C{content-type: application/json}.
    """
    auth_headers: Mapping[str, str] = auth.get("header") or {}
    own_credentials = bool(auth_headers or auth.get("query") or auth.get("aws") or auth.get("gcp"))
    replaced = {name.lower().encode("latin-1") for name in auth_headers}
    client_headers = list(client_headers)
    # Headers the client names in Connection are hop-by-hop too (RFC 9110 7.6.1).
    listed = {
        token.strip().lower()
        for name, values in client_headers
        if name.lower() == b"connection"
        for value in values
        for token in value.split(b",")
    }
    headers = Headers()
    for name, values in client_headers:
        lower = name.lower()
        if lower in _DROPPED or lower in replaced or lower in listed:
            continue
        if own_credentials and lower in _CLIENT_CREDENTIALS:
            continue
        headers.setRawHeaders(name, values)
    for header, value in auth_headers.items():
        headers.setRawHeaders(header.encode("latin-1"), [value.encode("latin-1")])
    headers.setRawHeaders(b"content-type", [b"application/json"])
    return headers


def detect(path: str, body: Mapping[str, Any]) -> str:
    """
    The client's protocol.

    @raise ClientError: 400 for an empty JSON object.
    """
    protocol = detect_protocol(path, body)
    if protocol is None:
        raise ClientError(400, "no matching AI protocol for the request")
    return protocol


def model_of(conf: Mapping[str, Any], body: Mapping[str, Any]) -> str | None:
    """
    The model of a request whose provider puts it in the URL: the route's
    C{options.model}, else the body's C{model}.
    """
    for model in ((conf.get("options") or {}).get("model"), body.get("model")):
        if isinstance(model, str) and model:
            return model
    return None
