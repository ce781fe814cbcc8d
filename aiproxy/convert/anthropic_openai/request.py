# -*- test-case-name: tests.test_convert_anthropic_openai -*-
"""
An Anthropic Messages request as an OpenAI chat request: the system
prompt, content blocks, tools and their names, thinking, output format.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from aiproxy.upstream.request import ClientError

__all__ = ["openai_tool_name", "strict_schema"]


#: Anthropic built-in tool types (no C{input_schema}): never sent upstream.
_BUILTIN_TOOL_PREFIXES = ("computer_", "bash_", "text_editor_", "web_search", "code_execution_")

#: OpenAI's longest tool name, and what a rewritten name keeps of the
#: sanitized one before C{_<8 hex of sha256>}.
_TOOL_NAME_MAX = 64

_TOOL_NAME_HASH = 8

_TOOL_NAME_PREFIX = _TOOL_NAME_MAX - _TOOL_NAME_HASH - 1

#: Every byte outside C{[a-zA-Z0-9_-]} → C{_} (names are sanitized byte by
#: byte, as APISIX does: a non-ASCII character becomes one C{_} per byte).
_NAME_BYTES = bytes(
    c if (chr(c).isascii() and chr(c).isalnum()) or chr(c) in "_-" else ord("_") for c in range(256)
)

#: How many rewritten tool names the converter remembers to restore them.
_NAMES_LIMIT = 4096

#: An Anthropic C{tool_choice} type → the OpenAI C{tool_choice}.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}

#: C{thinking.budget_tokens} thresholds → C{reasoning_effort} (else
#: C{minimal}).
_EFFORTS = ((4096, "high"), (2048, "medium"), (1024, "low"))

#: The effort of C{adaptive} thinking without C{output_config.effort}.
_ADAPTIVE_EFFORT = "medium"

#: Schema keywords holding a list, and a map, of sub-schemas.
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")

_SCHEMA_MAPS = ("$defs", "definitions")

_BILLING_PREFIX = "x-anthropic-billing-header:"

_CCH = re.compile(r" ?cch=[^;]*;?")


def _refuse(message: str) -> ClientError:
    """
    The 400 refusing a request, in APISIX's C{{"error_msg": ...}} shape.
    """
    return ClientError(400, message, {"error_msg": message})


def _count(value: Any) -> int:
    """
    C{value} if it is a token count, else 0.
    """
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def openai_tool_name(name: str) -> str:
    """
    The OpenAI name of an Anthropic tool: the name itself when it is
    valid (C{[a-zA-Z0-9_-]}, at most 64 bytes), else its first 55
    sanitized bytes, C{_} and the first 8 hex digits of the SHA-256 of the
    name. A function of the name alone, so the C{tools} array and the
    C{tool_use} blocks of the history agree.
    """
    raw = name.encode("utf-8", "surrogatepass")
    sanitized = raw.translate(_NAME_BYTES)
    if sanitized == raw and len(raw) <= _TOOL_NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:_TOOL_NAME_HASH]
    return sanitized[:_TOOL_NAME_PREFIX].decode("ascii") + "_" + digest


def strict_schema(schema: Any) -> Any:
    """
    A copy of a JSON schema fit for OpenAI's strict mode: every object with
    C{properties} gets C{additionalProperties: false} and all its
    properties, sorted, as C{required}; sub-schemas (C{properties},
    C{items}, C{anyOf}/C{oneOf}/C{allOf}, C{$defs}/C{definitions}) alike.
    The client's schema is left as it is.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    properties = schema.get("properties")
    if schema.get("type") == "object" and isinstance(properties, dict):
        out["properties"] = {key: strict_schema(value) for key, value in properties.items()}
        out["additionalProperties"] = False
        out["required"] = sorted(properties)
    if "items" in schema:
        out["items"] = strict_schema(schema["items"])
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [strict_schema(sub) for sub in schema[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in schema[key].items()}
    return out


def _effort(thinking: Any, output_config: Any) -> str | None:
    """
    The C{reasoning_effort} of a C{thinking} setting: C{enabled} by its
    budget, C{adaptive} by C{output_config.effort} (else C{medium}).
    """
    if not isinstance(thinking, dict):
        return None
    kind = thinking.get("type")
    if kind == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return effort if isinstance(effort, str) and effort else _ADAPTIVE_EFFORT
    if kind != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool):
        budget = 0
    for least, effort in _EFFORTS:
        if budget >= least:
            return effort
    return "minimal"


def _strip_billing(text: str) -> str | None:
    """
    An C{x-anthropic-billing-header:} text without its C{cch=} entries
    (they change with every request and would defeat prompt caching), or
    L{None} when nothing is left; any other text as it is.
    """
    if text[: len(_BILLING_PREFIX)].lower() != _BILLING_PREFIX:
        return text
    value = _CCH.sub("", text[len(_BILLING_PREFIX) :]).strip("; ")
    return _BILLING_PREFIX + value if value else None


def _system(system: Any) -> str | None:
    """
    The text of the C{system} field: a string, or its text blocks joined
    (billing header C{cch=} entries stripped, C{cache_control} dropped).
    """
    if isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        return None
    parts = []
    for block in system:
        if isinstance(block, dict) and block.get("type") == "text":
            text = block.get("text")
            if isinstance(text, str):
                cleaned = _strip_billing(text)
                if cleaned is not None:
                    parts.append(cleaned)
    return "".join(parts) or None


def _media(block: dict[str, Any]) -> dict[str, Any] | None:
    """
    The C{image_url} part of an C{image} (base64 or URL source) or
    C{document} (base64) block, or L{None}.
    """
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    kind = block.get("type")
    source_type = source.get("type")
    if source_type == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            return None
        media_type = source.get("media_type")
        if not isinstance(media_type, str):
            media_type = "image/png" if kind == "image" else "application/pdf"
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "image" and source_type == "url":
        url = source.get("url")
        if isinstance(url, str) and url:
            return {"type": "image_url", "image_url": {"url": url}}
    return None


def _tool_result_content(content: Any) -> Any:
    """
    The content of a C{tool} message: a string, its text blocks joined, or
    parts when it holds images or documents.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    has_media = False
    for sub in content:
        if not isinstance(sub, dict):
            continue
        kind = sub.get("type")
        if kind == "text" and isinstance(sub.get("text"), str):
            texts.append(sub["text"])
            parts.append({"type": "text", "text": sub["text"]})
        elif kind == "image" or kind == "document":
            part = _media(sub)
            if part is not None:
                parts.append(part)
                has_media = True
    return parts if has_media else "".join(texts)


def _joined_text(parts: list[dict[str, Any]]) -> str:
    return "".join(part["text"] for part in parts if part["type"] == "text")


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """
    The strict C{json_schema} response format of C{output_format} (when a
    non-empty object) or C{output_config.format}, or L{None}.
    """
    output_format = body.get("output_format")
    if not isinstance(output_format, dict) or not output_format:
        config = body.get("output_config")
        output_format = config.get("format") if isinstance(config, dict) else None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
        return None
    schema = output_format.get("schema")
    if not isinstance(schema, dict) or not schema:
        return None
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "structured_output",
            "schema": strict_schema(schema),
            "strict": True,
        },
    }
