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
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

__all__ = ["Problem", "format_path", "load_schema", "path_key", "schema_problems"]

_SCHEMA_FILES = ("config", "ai-proxy", "ai-proxy-multi", "key-auth", "ai-rate-limiting")


def _fill_defaults(validator_class: Any) -> Any:
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
        # A subschema naming its own $schema/$id would be validated by a
        # validator that does not fill in defaults.
        merged = {
            k: v
            for k, v in _inline(target, documents, doc_id).items()
            if k not in ("$schema", "$id")
        }
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


#: Object keys written bare in a path; any other key is written C{["..."]}.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]+")


def format_path(parts: Iterable[str | int]) -> str:
    """
    Render a JSON path the way config errors name fields:
    C{routes[0].plugins.ai-proxy.timeout}. A key that is empty or holds
    anything but letters, digits, C{_}, C{-} and C{$} is written as a
    quoted index (C{auth.header["x.y"]}), so a path is always one line and
    never ambiguous.
    """
    out = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "(root)"


Problem = tuple[list[str | int], str]


def path_key(path: Iterable[str | int]) -> tuple[tuple[int, int | str], ...]:
    """
    A sort key putting paths in document order: C{routes[2]} before
    C{routes[10]}.
    """
    return tuple((0, part) if isinstance(part, int) else (1, str(part)) for part in path)


def _problems(error: ValidationError) -> Iterator[Problem]:
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
        for name in extras:
            yield path + [str(name)], f"unknown key {str(name)!r}"
        if not extras:
            yield path, error.message
    elif list(error.relative_schema_path)[-2:-1] == ["propertyNames"]:
        # A key outside the allowed names: reported at the key itself.
        yield path + [str(error.instance)], f"unknown key {str(error.instance)!r}"
    else:
        yield path, error.message


def _under(path: list[str | int], roots: Iterable[list[str | int]]) -> bool:
    """
    Whether C{path} is one of C{roots} or inside one of them.
    """
    return any(path[: len(root)] == root for root in roots)


def schema_problems(
    instance: Any,
    schema: Mapping[str, Any],
    prefix: Iterable[str | int] = (),
    skip: Iterable[list[str | int]] = (),
) -> list[Problem]:
    """
    Validate C{instance} against C{schema}, filling in defaults.

    @param prefix: the path of C{instance} inside the whole config file.
    @param skip: paths already reported (e.g. an unset variable): problems
        at or inside them would only repeat the first one.
    @return: C{(path, reason)} per problem, in document order. Nothing is
        reported inside an unknown key (its value was not expected at all).
    """
    prefix = list(prefix)
    validator = DefaultFillingValidator(schema)
    problems = [
        (prefix + path, message)
        for error in validator.iter_errors(instance)
        for path, message in _problems(error)
    ]
    unknown = [path for path, message in problems if message.startswith("unknown key ")]
    skip = list(skip)
    problems = [
        (path, message)
        for path, message in problems
        if not _under(path, skip)
        and not (_under(path, unknown) and not message.startswith("unknown key "))
    ]
    return sorted(problems, key=lambda problem: path_key(problem[0]))
