# -*- test-case-name: tests.test_access -*-
"""
Consumers and their keys.

A key is only ever held as its SHA-256 digest: the config may give the key
(usually through C{${ENV}}) or its digest (C{key_sha256}); a client's key
is digested and looked up by digest, so the lookup takes the same time
whatever the key, and no comparison of secrets can leak how much matched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiproxy.schema import Problem

__all__ = ["MIN_KEY_LENGTH", "Consumer", "ConsumerTable", "consumer_problems", "key_digest"]

#: The shortest key a consumer may have.
MIN_KEY_LENGTH = 16


def key_digest(key: str | bytes) -> bytes:
    """
    The SHA-256 digest of a key.
    """
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def _configured_digest(key_auth: Mapping[str, Any]) -> bytes:
    """
    The digest of a consumer's C{key-auth} config (C{key} or C{key_sha256}).
    """
    if "key" in key_auth:
        return key_digest(key_auth["key"])
    return bytes.fromhex(key_auth["key_sha256"])


@dataclass(frozen=True)
class Consumer:
    """
    A caller of the gateway.

    @ivar budget: its own C{ai-rate-limiting} budget
        (an L{aiproxy.budget.limits.Budget}), or L{None}.
    """

    username: str
    budget: Any = None


class ConsumerTable:
    """
    The consumers of a config, by key digest.
    """

    def __init__(self, consumers: Iterable[tuple[bytes, Consumer]] = ()) -> None:
        self._by_digest = dict(consumers)

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, key: str | bytes) -> Consumer | None:
        """
        The consumer whose key is C{key}, or L{None}.
        """
        return self._by_digest.get(key_digest(key))

    @classmethod
    def build(cls, consumers: Iterable[Any], budget: Any = None) -> ConsumerTable:
        """
        The table of validated consumers.

        @param consumers: L{aiproxy.config.ConsumerConfig}s.
        @param budget: builds a consumer's own budget from its index and
            C{ai-rate-limiting} config.
        """
        entries = []
        for index, consumer in enumerate(consumers):
            own = None
            if consumer.rate_limiting is not None and budget is not None:
                own = budget(index, consumer)
            entries.append(
                (_configured_digest(consumer.key_auth), Consumer(consumer.username, own))
            )
        return cls(entries)


def consumer_problems(consumers: Any) -> Iterator[Problem]:
    """
    What the schema cannot see in a C{consumers} list: a username or key
    used twice (naming both places), a key shorter than L{MIN_KEY_LENGTH}.
    A key is never quoted.
    """
    if not isinstance(consumers, list):
        return
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for index, consumer in enumerate(consumers):
        if not isinstance(consumer, dict):
            continue
        path: list[str | int] = ["consumers", index]
        name = consumer.get("username")
        if isinstance(name, str):
            if name in names:
                yield (
                    path + ["username"],
                    f"duplicate username {name!r} (also consumers[{names[name]}])",
                )
            else:
                names[name] = index
        key_auth = (consumer.get("plugins") or {}).get("key-auth")
        if not isinstance(key_auth, dict):
            continue
        key = key_auth.get("key")
        if isinstance(key, str) and len(key) < MIN_KEY_LENGTH:
            yield (
                path + ["plugins", "key-auth", "key"],
                f"the key has {len(key)} characters; at least {MIN_KEY_LENGTH} are required",
            )
            continue
        try:
            digest = _configured_digest(key_auth)
        except (KeyError, TypeError, ValueError):
            continue
        if digest in digests:
            other = digests[digest]
            yield (
                path + ["plugins", "key-auth"],
                f"the same key as consumers[{other}].plugins.key-auth"
                f" ({consumers[other].get('username')!r}): keys must be unique",
            )
        else:
            digests[digest] = index
