# -*- test-case-name: tests.test_config -*-
"""
JSON Schema validation with defaults filled in from the schema.

The schemas ship as package data (C{aiproxy/schemas/*.json}). They may refer
to each other by C{$id} (C{aiproxy:ai-proxy#/$defs/...}); references are
inlined once at load time so that defaults behind a C{$ref} are visible to
the default-filling validator.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

__all__ = ["format_path", "load_schema", "schema_errors"]

_SCHEMA_FILES = ("config", "ai-proxy", "ai-proxy-multi")


def _fill_defaults(validator_class: type) -> type:
    """
    Extend a validator class so that validating an object fills in the
    C{default} of every absent property (defaults are deep-copied).
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


DefaultFillingValidator = _fill_defaults(Draft202012Validator)


def _inline(node: Any, documents: Mapping[str, dict], base: str) -> Any:
    """
    Return C{node} with every C{$ref} replaced by the referenced schema.

    @param documents: schema documents by C{$id}.
    @param base: the C{$id} of the document C{node} belongs to.
    """
    if isinstance(node, list):
        return [_inline(item, documents, base) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"]
        doc_id, _, pointer = ref.partition("#")
        doc_id = doc_id or base
        target: Any = documents[doc_id]
        for part in filter(None, pointer.split("/")):
            target = target[part]
        merged = dict(_inline(target, documents, doc_id))
        merged.update({k: _inline(v, documents, base) for k, v in node.items() if k != "$ref"})
        return merged
    return {k: _inline(v, documents, base) for k, v in node.items() if k != "$defs"}


@cache
def _documents() -> dict[str, dict]:
    """
    The shipped schema documents, by C{$id}.
    """
    package = resources.files("aiproxy") / "schemas"
    documents = {}
    for name in _SCHEMA_FILES:
        document = json.loads((package / f"{name}.json").read_text("utf-8"))
        documents[document["$id"]] = document
    return documents


@cache
def load_schema(name: str) -> dict:
    """
    Load a shipped schema with its references inlined.

    @param name: C{config}, C{ai-proxy} or C{ai-proxy-multi}.
    @return: a self-contained JSON Schema.
    """
    documents = _documents()
    doc_id = f"aiproxy:{name}"
    return _inline(documents[doc_id], documents, doc_id)


def format_path(parts: Iterable[str | int]) -> str:
    """
    Render a JSON path the way config errors name fields:
    C{routes[0].plugins.ai-proxy.timeout}.
    """
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _problems(error: ValidationError) -> Iterator[tuple[list[str | int], str]]:
    """
    The path(s) and reason of one validation error. A missing or unexpected
    property is reported at its own path rather than its parent's; a schema's
    own C{x-message} replaces jsonschema's wording.
    """
    path: list[str | int] = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if schema.get("x-message"):
        yield path, schema["x-message"]
    elif error.validator == "required":
        yield path + [error.message.split("'")[1]], "is a required property"
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        extras = [name for name in error.instance if name not in known and not patterns]
        for name in extras or [""]:
            yield path + [name] if name else path, f"unknown key '{name}'" if name else error.message
    else:
        yield path, error.message


def schema_errors(
    instance: Any, schema: Mapping[str, Any], prefix: Iterable[str | int] = ()
) -> Iterator[str]:
    """
    Validate C{instance} against C{schema}, filling in defaults, and yield
    one C{"<json path>: <reason>"} line per problem.

    @param prefix: the path of C{instance} inside the whole config file.
    """
    prefix = list(prefix)
    validator = DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        for path, message in _problems(error):
            yield f"{format_path(prefix + path)}: {message}"

