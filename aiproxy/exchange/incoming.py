# -*- test-case-name: tests.test_proxy -*-
"""
The client's request, read and checked once, then shaped anew for each
upstream attempt (the instance's URL, credentials and body changes).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from aiproxy.access.keyauth import SentKey, without_parameters
from aiproxy.context import ExchangeContext
from aiproxy.filters import Reject
from aiproxy.interfaces import IRequestFilter
from aiproxy.routing.routes import Instance, Route
from aiproxy.stream.protocols import PASSTHROUGH
from aiproxy.upstream.request import (
    ClientError,
    apply_body_overrides,
    check_content_type,
    detect,
    parse_body,
    too_large_message,
    upstream_headers,
)

__all__ = ["ClientRequest", "UpstreamCall", "send"]


#: The C{auth} kinds that give the route its own credentials.
_CREDENTIALS = ("header", "query", "aws", "gcp")


class UpstreamCall(NamedTuple):
    """
    One upstream request, ready to send.
    """

    method: str
    url: str
    headers: Headers
    body: bytes


class ClientRequest:
    """
    The checked client request of one exchange.

    @ivar protocol: the client's protocol (C{openai-chat}, ...).
    @ivar body: the parsed JSON body (as the request filters left it).
    @ivar stream: the client asked for a stream.
    """

    def __init__(
        self,
        request: Request,
        route: Route,
        context: ExchangeContext,
        sent_key: SentKey | None = None,
    ) -> None:
        """
        Read and check C{request}'s body for C{route}, filling in C{context}.

        @param sent_key: where the client sent its gateway key: never
            forwarded upstream.
        @raise ClientError: when the client's request is refused.
        """
        conf = route.conf
        raw = request.content.read() if request.content is not None else b""
        context.bytes_in = len(raw)
        if len(raw) > conf["max_req_body_size"]:
            raise ClientError(413, too_large_message(len(raw), conf["max_req_body_size"]))
        check_content_type(request.getHeader(b"content-type"))
        body = parse_body(raw)
        protocol = detect(context.path, body)
        if not route.serving(protocol):
            # No instance serves it: the first one says why (a 400).
            route.instances[0].converter(protocol)
        if len(route.instances) == 1:
            context.provider = route.instances[0].target.provider.name
        context.protocol = context.upstream_protocol = protocol
        context.body = body
        context.stream = body.get("stream") is True
        model = body.get("model")
        context.request_llm_model = model if isinstance(model, str) else None
        self.protocol = protocol
        self.body: dict[str, Any] = body
        self.stream = context.stream
        self._raw = raw
        self._headers = request.requestHeaders
        self._query = request.uri.partition(b"?")[2].decode("latin-1")
        if sent_key is not None:
            self._headers = self._headers.copy()
            for name in sent_key.headers:
                self._headers.removeHeader(name)
            if sent_key.query:
                self._query = without_parameters(self._query, sent_key.query)
        self._copy = len(route.instances) > 1
        self._sent = False

    def filter(
        self, request_filters: Sequence[IRequestFilter], context: ExchangeContext
    ) -> Reject | None:
        """
        Run the route's request filters, in order, on C{context} (whose
        body they may change).

        @return: the L{Reject} that answers the client instead, or L{None}.
        """
        for request_filter in request_filters:
            result = request_filter.filter_request(context)
            if isinstance(result, Reject):
                return result
        assert context.body is not None
        self.body = context.body
        return None

    def upstream_call(self, instance: Instance, context: ExchangeContext) -> UpstreamCall:
        """
        The request for C{instance}: a fresh one from the checked body, with
        the instance's URL, credentials and body changes (recorded in
        C{context}).
        """
        target = instance.target
        protocol = self.protocol
        body = self.body
        if self._copy:
            # Each instance changes the body its own way (options, model).
            body = copy.deepcopy(body)
        if self._sent:
            # Nothing of an earlier attempt's answer counts (a fallback).
            context.stream = self.stream
            context.reset_response()
        self._sent = True
        context.instance = instance.name
        context.provider = target.provider.name
        converter = instance.converter(protocol)
        changed = context.body_changed
        client_body = body
        if converter is not None:
            body = converter.convert_request(body, context)
            protocol = converter.upstream_protocol
            changed = True
        context.upstream_protocol = protocol
        # Before the body changes: a provider may take its path from the
        # client's body (bedrock, vertex predict: the model; bedrock: whether
        # it streams).
        url = instance.upstream_url(protocol, context.path, self._query, client_body)
        changed = apply_body_overrides(body, protocol, target) or changed
        context.body = body
        model = body.get("model")
        if isinstance(model, str):
            context.llm_model = model
        raw = self._raw
        if changed:
            raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        auth = target.conf["auth"]
        headers = upstream_headers(self._headers.getAllRawHeaders(), auth)
        if converter is not None:
            converter.convert_headers(headers, any(auth.get(kind) for kind in _CREDENTIALS))
        return UpstreamCall(
            context.method if protocol == PASSTHROUGH else "POST",
            url,
            headers,
            raw,
        )


def send(instance: Instance, call: UpstreamCall) -> Deferred[Any]:
    """
    Send C{call} with C{instance}'s client, authorized first when its
    provider needs it; the Deferred fires with the response as soon as its
    headers arrive (cancelling it stops the request in whatever phase).
    """
    auth = instance.auth
    if auth is None:
        return instance.client.request(*call)
    authorized: Deferred[UpstreamCall] = auth.authorize(call)
    return authorized.addCallback(lambda signed: instance.client.request(*signed))
