# -*- test-case-name: tests.test_workers -*-
"""
The config as the parent checked it, and the parent's private directory.

The parent reads the config file once, checks it, and writes the very
text it checked into its own directory (L{RunDirectory}); the workers load
that copy, at start and on C{SIGHUP}. So a worker never loads a file the
parent did not check (one edited after the check, or before a worker is
restarted), and every worker serves the same config.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

from aiproxy.config import Config, ConfigError, parse_config

__all__ = ["RunDirectory", "read_config"]


def read_config(path: str, environ: Mapping[str, str] | None = None) -> tuple[str, Config]:
    """
    Read and validate the config file at C{path}, as
    L{aiproxy.config.load_config} does, keeping its text.

    @return: the text and the config.
    @raise ConfigError: with every problem found, or if the file cannot be
        read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"(root): cannot read {path}: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            [f"(root): cannot read {path}: not UTF-8 text (byte {e.start}: {e.reason})"]
        ) from None
    return text, parse_config(text, environ, source=path)


class RunDirectory:
    """
    A private directory (mode 0700) for one run of the parent: the config
    the workers load and, with metrics, the directory of their metrics
    files; removed when the parent stops.

    @ivar path: the directory.
    @ivar config_path: the config the workers load.
    @ivar metrics_path: the directory of the workers' metrics files.
    """

    def __init__(self, base: str | None = None) -> None:
        """
        @param base: where to create it; the system's temporary directory
            by default (C{TMPDIR}).
        """
        self.path = tempfile.mkdtemp(prefix="aiproxy-", dir=base)
        self.config_path = os.path.join(self.path, "config.yaml")
        self.metrics_path = os.path.join(self.path, "metrics")
        os.mkdir(self.metrics_path, 0o700)

    def write_config(self, text: str) -> None:
        """
        Make C{text} the config the workers load, replacing the previous one
        at once (a worker never reads half of it).
        """
        temporary = self.config_path + ".new"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, self.config_path)

    def remove(self) -> None:
        """
        Remove the directory and everything in it.
        """
        shutil.rmtree(self.path, ignore_errors=True)
