# -*- test-case-name: tests.test_docs -*-
"""
The documentation stays true: the field tables of C{docs/configuration.md}
are those the shipped schemas give, its examples are what aiproxy accepts
(or refuses, with the problems it shows), and the figures
C{docs/architecture.md} quotes are the code's.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aiproxy.config import PROXY_PLUGINS, ConfigError, parse_config
from aiproxy.exchange.writer import MAX_PENDING
from aiproxy.routing.build import build_routes
from aiproxy.schema import load_schema
from aiproxy.stream.sse import SSEDecoder

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: The environment the documented examples are loaded with.
EXAMPLE_ENVIRON = {"OPENAI_API_KEY": "sk-example"}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _load_generator() -> ModuleType:
    """
    Import C{docs/gen_config_docs.py}, which is a script, not a module of
    the package.
    """
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "docs" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


def _fences(text: str) -> list[tuple[str, str]]:
    """
    The fenced code blocks of a Markdown text: language and content.
    """
    return [(match.group(1), match.group(2)) for match in _FENCE.finditer(text)]


def _parse(text: str):
    """
    Parse a documented config with only the proxy plugins installed.
    """
    from tests.test_vertex import key_json

    schemas = {name: load_schema(name) for name in PROXY_PLUGINS}
    # The vertex-ai example reads a service-account key, made at test time.
    return parse_config(text, {**EXAMPLE_ENVIRON, "GCP_SA_KEY": key_json()}, schemas)


class GeneratedTablesTests(SynchronousTestCase):
    """
    The generated regions of the configuration reference.
    """

    def test_current(self) -> None:
        """
        Every generated region of C{docs/configuration.md} is what the
        schemas and the provider table give now.
        """
        text = CONFIGURATION.read_text("utf-8")
        expected = generator.regenerate(text)
        if text != expected:
            diff = difflib.unified_diff(
                text.splitlines(),
                expected.splitlines(),
                "docs/configuration.md",
                "regenerated",
                lineterm="",
            )
            self.fail(
                "docs/configuration.md is out of date with the schemas; regenerate it with\n"
                "    python docs/gen_config_docs.py\n"
                "and commit the result.\n" + "\n".join(list(diff)[:60])
            )

    def test_every_field_described(self) -> None:
        """
        Every field of every shipped schema has a C{description}: it is the
        field's one-line meaning in the reference.
        """
        missing = [
            f"{name}: {path}"
            for name in ("config", "ai-proxy", "ai-proxy-multi")
            for path, _, schema in generator.field_rows(load_schema(name))
            if not schema.get("description")
        ]
        self.assertEqual(missing, [])

    def test_regenerate_replaces_only_regions(self) -> None:
        """
        Regenerating rewrites what lies between the markers and leaves the
        hand-written text around them alone.
        """
        regions = "".join(
            f"before {name}\n<!-- BEGIN GENERATED: {name} -->\nstale\n<!-- END GENERATED: {name} -->\nafter\n"
            for name in generator.REGIONS
        )
        result = generator.regenerate(regions)
        self.assertNotIn("stale", result)
        for name in generator.REGIONS:
            self.assertIn(f"before {name}\n<!-- BEGIN GENERATED: {name} -->\n", result)
        self.assertIn("| `timeout` | integer | `30000` |", result)
        self.assertEqual(generator.regenerate(result), result)

    def test_missing_region(self) -> None:
        """
        A document that lacks one of the regions is refused, so a table
        cannot disappear unnoticed.
        """
        with self.assertRaises(ValueError) as raised:
            generator.regenerate(
                "<!-- BEGIN GENERATED: config -->\n<!-- END GENERATED: config -->\n"
            )
        self.assertIn("route", str(raised.exception))

    def test_unknown_region(self) -> None:
        """
        A region name the generator does not know is refused.
        """
        text = "".join(
            f"<!-- BEGIN GENERATED: {name} -->\n<!-- END GENERATED: {name} -->\n"
            for name in [*generator.REGIONS, "nonesuch"]
        )
        with self.assertRaises(ValueError) as raised:
            generator.regenerate(text)
        self.assertIn("nonesuch", str(raised.exception))


class ExampleTests(SynchronousTestCase):
    """
    The YAML examples of the configuration reference.
    """

    def test_valid_examples(self) -> None:
        """
        Every YAML example is a config that loads and whose routes build,
        except those marked C{# invalid}.
        """
        examples = [
            body for lang, body in _fences(CONFIGURATION.read_text("utf-8")) if lang == "yaml"
        ]
        valid = [body for body in examples if not body.startswith("# invalid")]
        self.assertGreaterEqual(len(valid), 2)
        for body in valid:
            config = _parse(body)
            build_routes(config, MemoryReactorClock(), plugins={})

    def test_invalid_example(self) -> None:
        """
        An example marked C{# invalid} is followed by a C{text} block with
        exactly the problems aiproxy reports for it, in order.
        """
        blocks = _fences(CONFIGURATION.read_text("utf-8"))
        checked = 0
        for (lang, body), (next_lang, expected) in zip(blocks, blocks[1:], strict=False):
            if lang == "yaml" and body.startswith("# invalid"):
                self.assertEqual(next_lang, "text")
                with self.assertRaises(ConfigError) as raised:
                    _parse(body)
                self.assertEqual(raised.exception.problems, expected.splitlines())
                checked += 1
        self.assertEqual(checked, 1)


class ArchitectureFiguresTests(SynchronousTestCase):
    """
    The sizes C{docs/architecture.md} quotes.
    """

    def test_figures(self) -> None:
        """
        The interval writer's pending cap, the SSE decoder's carry-over cap
        and Twisted's transport buffer are the sizes the architecture
        document states.
        """
        text = ARCHITECTURE.read_text("utf-8")
        self.assertEqual(MAX_PENDING, 64 * 1024)
        self.assertEqual(SSEDecoder()._max_remainder, 1024 * 1024)
        self.assertEqual(FileDescriptor.bufferSize, 64 * 1024)
        self.assertIn("64 KiB", text)
        self.assertIn("1 MiB", text)
