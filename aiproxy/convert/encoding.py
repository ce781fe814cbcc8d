# -*- test-case-name: tests.test_convert -*-
"""
The JSON every converter writes: compact, UTF-8, non-ASCII kept as it is.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dumps", "encode"]

#: One encoder for every call (C{json.dumps} with these options makes a new
#: one each time).
encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(document: Any) -> bytes:
    """
    Compact JSON, UTF-8 (a lone surrogate, which UTF-8 cannot carry,
    becomes C{?}).
    """
    return encode(document).encode("utf-8", "replace")
