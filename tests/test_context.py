# -*- test-case-name: tests.test_context -*-
"""
Tests for L{aiproxy.context}: the per-request context, its usage figures
and its access record (docs/operations.md).
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from aiproxy.context import RECORD_KEYS, ExchangeContext


def context() -> ExchangeContext:
    """
    A fresh context of route C{chat}, instance C{ai-proxy-openai}.
    """
    return ExchangeContext("chat", "ai-proxy-openai", 100.0)


class UsageTests(SynchronousTestCase):
    """
    L{ExchangeContext.set_usage} reads usage objects of every protocol.
    """

    def figures(self, ctx: ExchangeContext) -> tuple[int | None, ...]:
        """
        Prompt, completion, total, cache read, cache creation, reasoning.
        """
        return (
            ctx.prompt_tokens,
            ctx.completion_tokens,
            ctx.total_tokens,
            ctx.cache_read_input_tokens,
            ctx.cache_creation_input_tokens,
            ctx.reasoning_tokens,
        )

    def test_openai(self) -> None:
        """
        OpenAI usage, with cached prompt tokens and reasoning tokens.
        """
        ctx = context()
        ctx.set_usage(
            {
                "prompt_tokens": 10,
                "completion_tokens": 20,
                "total_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 7},
            }
        )
        self.assertEqual(self.figures(ctx), (10, 20, 30, 4, None, 7))

    def test_openai_null_details(self) -> None:
        """
        C{null} details are no figures, not an error.
        """
        ctx = context()
        ctx.set_usage(
            {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            }
        )
        self.assertEqual(self.figures(ctx), (1, 2, 3, None, None, None))

    def test_deepseek_cache(self) -> None:
        """
        DeepSeek's C{prompt_cache_hit_tokens} counts as cache read.
        """
        ctx = context()
        ctx.set_usage({"prompt_tokens": 10, "completion_tokens": 1, "prompt_cache_hit_tokens": 6})
        self.assertEqual(ctx.cache_read_input_tokens, 6)

    def test_anthropic_two_steps(self) -> None:
        """
        Anthropic's usage comes twice (C{message_start}, C{message_delta});
        the total is input + output.
        """
        ctx = context()
        ctx.set_usage(
            {
                "input_tokens": 25,
                "output_tokens": 1,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 2,
            }
        )
        self.assertEqual(self.figures(ctx), (25, 1, 26, 5, 2, None))
        ctx.set_usage({"output_tokens": 15})
        self.assertEqual(self.figures(ctx), (25, 15, 40, 5, 2, None))

    def test_later_zero(self) -> None:
        """
        A later 0 does not erase a known count; a later non-zero value
        replaces it.
        """
        ctx = context()
        ctx.set_usage({"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5})
        ctx.set_usage({"input_tokens": 0, "output_tokens": 9, "cache_read_input_tokens": 0})
        self.assertEqual(self.figures(ctx)[:4], (25, 9, 34, 5))
        ctx.set_usage({"input_tokens": 30})
        self.assertEqual(self.figures(ctx)[:3], (30, 9, 39))

    def test_zero_when_unknown(self) -> None:
        """
        A 0 with nothing known before is recorded as 0.
        """
        ctx = context()
        ctx.set_usage({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        self.assertEqual(self.figures(ctx)[:3], (0, 0, 0))

    def test_responses(self) -> None:
        """
        Responses usage, with its own detail names.
        """
        ctx = context()
        ctx.set_usage(
            {
                "input_tokens": 20,
                "output_tokens": 9,
                "total_tokens": 29,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens_details": {"reasoning_tokens": 2},
            }
        )
        self.assertEqual(self.figures(ctx), (20, 9, 29, 4, None, 2))

    def test_not_integers(self) -> None:
        """
        Values that are not integer counts (strings, booleans, floats) are
        ignored.
        """
        ctx = context()
        ctx.set_usage({"prompt_tokens": "10", "completion_tokens": True, "total_tokens": 1.5})
        self.assertEqual(self.figures(ctx), (None,) * 6)

    def test_total_at_least_sum(self) -> None:
        """
        Without an upstream total, or with a smaller one, the total is
        prompt + completion.
        """
        ctx = context()
        ctx.set_usage({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 3})
        self.assertEqual(ctx.total_tokens, 15)


class TextTests(SynchronousTestCase):
    """
    The response text collected for filters.
    """

    def test_text(self) -> None:
        """
        Pieces are joined in order; nothing collected is the empty string.
        """
        ctx = context()
        self.assertEqual(ctx.text, "")
        for piece in ("Hel", "lo", " world"):
            ctx.add_text(piece)
        self.assertEqual(ctx.text, "Hello world")
        ctx.add_text("!")
        self.assertEqual(ctx.text, "Hello world!")

    def test_defaults(self) -> None:
        """
        A fresh context collects no text, is not done, has sent nothing and
        has an unchanged body.
        """
        ctx = context()
        self.assertEqual(
            (ctx.wants_text, ctx.done, ctx.output_started, ctx.body_changed), (False,) * 4
        )
        ctx.mark_body_changed()
        self.assertTrue(ctx.body_changed)


class RecordTests(SynchronousTestCase):
    """
    L{ExchangeContext.record}: the access-log record.
    """

    def test_spec_keys(self) -> None:
        """
        The record has every key of docs/operations.md and is JSON.
        """
        record = context().record()
        self.assertEqual(RECORD_KEYS - set(record), set())
        json.dumps(record)

    def test_values(self) -> None:
        """
        The record holds the request's figures under the documented names.
        """
        ctx = context()
        ctx.stream = True
        ctx.status = 200
        ctx.request_llm_model = "gpt-4o-mini"
        ctx.llm_model = "gpt-4o-mini-2024-07-18"
        ctx.ttft_ms = 120
        ctx.upstream_response_time_ms = 80
        ctx.set_usage({"prompt_tokens": 3, "completion_tokens": 4})
        ctx.has_tool_calls = True
        ctx.bytes_in = 50
        ctx.bytes_out = 700
        ctx.abort_reason = "client_disconnect"
        record = ctx.record()
        self.assertEqual(
            {key: record[key] for key in RECORD_KEYS},
            {
                "route_id": "chat",
                "instance": "ai-proxy-openai",
                "consumer": None,
                "status": 200,
                "request_type": "ai_stream",
                "request_llm_model": "gpt-4o-mini",
                "llm_model": "gpt-4o-mini-2024-07-18",
                "llm_time_to_first_token": 120,
                "upstream_response_time": 80,
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "total_tokens": 7,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
                "reasoning_tokens": None,
                "llm_has_tool_calls": True,
                "bytes_in": 50,
                "bytes_out": 700,
                "abort_reason": "client_disconnect",
            },
        )

    def test_chat_type_and_model_fallback(self) -> None:
        """
        A non-streamed request is C{ai_chat}; without a response model the
        requested one is logged as C{llm_model}.
        """
        ctx = context()
        ctx.request_llm_model = "m"
        record = ctx.record()
        self.assertEqual((record["request_type"], record["llm_model"]), ("ai_chat", "m"))

    def test_no_credentials(self) -> None:
        """
        Nothing of the request body or the usage object beyond the figures
        reaches the record: a key sent in the body never appears.
        """
        ctx = context()
        ctx.body = {
            "api_key": "sk-secret-1",
            "messages": [{"role": "user", "content": "sk-secret-2"}],
        }
        ctx.set_usage({"prompt_tokens": 1, "note": "sk-secret-3"})
        ctx.add_text("sk-secret-4")
        ctx.path = "/v1/chat/completions"
        serialised = json.dumps(ctx.record())
        self.assertNotIn("sk-secret", serialised)
