# -*- test-case-name: tests.test_mock_upstream -*-
"""
A deterministic mock LLM upstream on twisted.web, controllable per request.

It speaks eight APIs, chosen by the end of a C{POST} request's path (the
prefix is free, so any C{override.endpoint} path works):

  - C{.../chat/completions}: OpenAI chat completions, streamed as
    C{chat.completion.chunk} events when the body has C{"stream": true};
  - C{.../v1/messages}: Anthropic Messages, streamed or not;
  - C{.../responses}: OpenAI Responses (minimal), streamed or not;
  - C{.../embeddings}: one vector;
  - C{.../converse}: Amazon Bedrock Converse, never streamed;
  - C{.../converse-stream}: Amazon Bedrock ConverseStream, always streamed
    as AWS EventStream messages (C{application/vnd.amazon.eventstream});
  - C{...:predict}: Vertex AI predict of a text embedding model (Vertex
    chat goes to C{.../chat/completions} above);
  - C{.../token}: an OAuth2 token endpoint for Google's JWT-bearer grant
    (form-encoded), answering C{{"access_token": "mock-token-<n>",
    "expires_in", "token_type"}}, C{n} counted in C{token_requests}
    (L{aiproxy.testing.upstream.oauth}).

Any other request is echoed back as JSON (method, path, query, headers,
body) with status 200. Administrative resources, which are neither recorded
nor counted as requests:

  - C{GET /_mock/stats}: counters, see L{MockStats.as_dict};
  - C{POST /_mock/reset}: zero the counters and forget recorded requests;
  - C{GET /_mock/requests}: the last L{RECORDED_REQUESTS} requests, see
    L{RecordedRequest.as_dict};
  - C{GET /chunks}: the number of data events sent on the most recent stream,
    as plain text.

Each request is controlled by query parameters of its URL or by
C{x-mock-<name>} request headers (the header wins; C{x-mock-delay-ms} and
C{x-mock-delay_ms} both work); the controls are the fields of
L{MockControls}.

The content is deterministic: the pieces are C{"tok0 "}, C{"tok1 "}, ...
unless a C{text} is given, C{created} is the fixed L{CREATED}, identifiers
carry the request's number (C{x-request-id: mock-<n>}, counted from 1 after
start or reset), C{prompt_tokens} is the control of that name and
C{completion_tokens} the number of content pieces.

Use L{start_mock_upstream} in tests, L{MockUpstream.resource} to mount it in
another site, or the command line::

    python -m aiproxy.testing.upstream --listen tcp:port=7751:interface=127.0.0.1

The modules: L{controls} reads the controls, L{dialects} shapes each API's
answers, L{replies} plans the answer to a call and encodes it, L{delivery}
sends it with its timing, L{bookkeeping} keeps the counters and recorded
requests, L{resource} serves all of it, and L{cli} is the command line.
"""

from aiproxy.testing.upstream.bookkeeping import MockStats, RecordedRequest
from aiproxy.testing.upstream.cli import DEFAULT_LISTEN, Options, main
from aiproxy.testing.upstream.controls import MockControlError, MockControls
from aiproxy.testing.upstream.delivery import _Delivery as _Delivery
from aiproxy.testing.upstream.dialects import CREATED, DEFAULT_MODEL
from aiproxy.testing.upstream.dialects import _ChatCompletions as _ChatCompletions
from aiproxy.testing.upstream.dialects import _Turn as _Turn
from aiproxy.testing.upstream.replies import _headers as _headers
from aiproxy.testing.upstream.replies import _Reply as _Reply
from aiproxy.testing.upstream.replies import _stream_reply as _stream_reply
from aiproxy.testing.upstream.resource import (
    RECORDED_REQUESTS,
    MockUpstream,
    RunningMockUpstream,
    start_mock_upstream,
)

__all__ = [
    "CREATED",
    "DEFAULT_LISTEN",
    "DEFAULT_MODEL",
    "RECORDED_REQUESTS",
    "MockControlError",
    "MockControls",
    "MockStats",
    "MockUpstream",
    "Options",
    "RecordedRequest",
    "RunningMockUpstream",
    "main",
    "start_mock_upstream",
]
