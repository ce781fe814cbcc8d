# -*- test-case-name: tests.test_balancer -*-
"""
Picking the instance of an C{ai-proxy-multi} route that a request goes to,
and the next one when an attempt fails (APISIX's priority balancer over
C{roundrobin} or C{chash} pickers).

Instances are grouped by C{priority}, highest first. A request is served
by the highest level that still has an instance it can use: one not tried
yet by this request, healthy (unless no instance of the route is), and
whose provider serves the request's protocol. Within a level:

  - C{roundrobin}: smooth weighted round robin (nginx's): deterministic,
    interleaved (weights 5, 1, 1 give C{a a b a c a a}); an instance that
    cannot be used is left out of the round, as nginx skips a down peer;
  - C{chash}: consistent hashing of the request's key (C{hash_on} and
    C{key}) on a ring of the level's instances (points in proportion to
    their weights); a retry, or an instance that cannot be used, moves on
    clockwise around the ring, so a key keeps its instance while it is
    usable.

Weights follow APISIX (C{resty.roundrobin}): an instance of weight 0 is
never picked while its level holds one of positive weight, not even as a
fallback; a level whose instances all weigh 0 is balanced as if they all
weighed 1.
"""

from __future__ import annotations

import bisect
import re
import socket
import zlib
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "Balancer",
    "HASH_VARIABLES",
    "Selection",
    "hash_key_problem",
    "request_hash_key",
    "request_variable",
]


class _Balanced(Protocol):
    """
    What the balancer needs of an instance.
    """

    name: str
    weight: int
    priority: int

    @property
    def healthy(self) -> bool: ...


T = TypeVar("T", bound=_Balanced)

#: Ring points per instance of a level, on average.
_POINTS = 160


@dataclass
class _Level(Generic[T]):
    """
    The instances of one priority, with their effective weights and the
    shared state of the level's picker.
    """

    priority: int
    members: list[T]
    weights: dict[str, int]
    current: dict[str, int] = field(default_factory=dict)
    ring: list[tuple[int, int]] = field(default_factory=list)
    ring_keys: list[int] = field(default_factory=list)


def _ring_hash(text: str) -> int:
    """
    A stable 32-bit hash (the same in every process, unlike C{hash()}).
    """
    return zlib.crc32(text.encode("utf-8"))


class Balancer(Generic[T]):
    """
    The picker of one route's instances; its round-robin state is shared
    by every request of the route (and lives as long as the route table).

    @ivar algorithm: C{roundrobin} or C{chash}.
    """

    def __init__(self, instances: Sequence[T], algorithm: str = "roundrobin") -> None:
        self.instances = tuple(instances)
        self.algorithm = algorithm
        levels: dict[int, list[T]] = {}
        for instance in self.instances:
            levels.setdefault(instance.priority, []).append(instance)
        self._levels: list[_Level[T]] = []
        for priority in sorted(levels, reverse=True):
            members = levels[priority]
            if any(member.weight > 0 for member in members):
                weights = {m.name: m.weight for m in members if m.weight > 0}
            else:
                weights = {m.name: 1 for m in members}
            level = _Level(priority, [m for m in members if m.name in weights], weights)
            level.current = {name: 0 for name in weights}
            if algorithm == "chash":
                self._build_ring(level)
            self._levels.append(level)

    @staticmethod
    def _build_ring(level: _Level[T]) -> None:
        """
        Place each instance of C{level} on the hash ring, with points in
        proportion to its weight (C{_POINTS} per instance on average).
        """
        total = sum(level.weights.values())
        count = len(level.members)
        ring: list[tuple[int, int]] = []
        for index, member in enumerate(level.members):
            points = max(1, round(_POINTS * count * level.weights[member.name] / total))
            ring.extend((_ring_hash(f"{member.name}\0{point}"), index) for point in range(points))
        ring.sort()
        level.ring = ring
        level.ring_keys = [point for point, _ in ring]

    def selection(
        self, usable: Callable[[T], bool] | None = None, key: Callable[[], str] | None = None
    ) -> Selection[T]:
        """
        Start picking for one request.

        @param usable: whether the request can go to an instance at all
            (its provider serves the request's protocol); every instance
            when L{None}.
        @param key: the request's hash key, asked for once, at the first
            C{chash} pick.
        """
        return Selection(self, usable, key)

    def _pick(self, level: _Level[T], candidates: list[T], selection: Selection[T]) -> T:
        """
        One instance among C{candidates} (members of C{level}, in config
        order, never empty).
        """
        if self.algorithm == "chash":
            return self._pick_hashed(level, candidates, selection)
        # Smooth weighted round robin over the candidates only.
        current = level.current
        weights = level.weights
        total = 0
        best: T | None = None
        for candidate in candidates:
            name = candidate.name
            current[name] += weights[name]
            total += weights[name]
            if best is None or current[name] > current[best.name]:
                best = candidate
        assert best is not None
        current[best.name] -= total
        return best

    def _pick_hashed(self, level: _Level[T], candidates: list[T], selection: Selection[T]) -> T:
        """
        The first candidate clockwise from the request key's point (or, on
        a retry, from where the previous pick on this level stopped).
        """
        ring = level.ring
        positions = selection._ring_position
        if positions is None:
            positions = selection._ring_position = {}
        start = positions.get(level.priority)
        if start is None:
            if selection._hash is None:
                selection._hash = _ring_hash(selection._key() if selection._key else "")
            start = bisect.bisect_left(level.ring_keys, selection._hash) % len(ring)
        allowed = {id(candidate) for candidate in candidates}
        for step in range(len(ring)):
            position = (start + step) % len(ring)
            member = level.members[ring[position][1]]
            if id(member) in allowed:
                positions[level.priority] = position
                return member
        # Unreachable: every member has at least one point.
        return candidates[0]


class Selection(Generic[T]):
    """
    The instances one request tried, and which to try next.

    Health is read once, when the selection starts: instances marked
    unhealthy then are skipped for the whole request, unless no instance of
    the route was healthy, in which case health is ignored (APISIX: "all
    upstream nodes is unhealthy, use default").
    """

    def __init__(
        self,
        balancer: Balancer[T],
        usable: Callable[[T], bool] | None,
        key: Callable[[], str] | None,
    ) -> None:
        self._balancer = balancer
        self._usable = usable
        self._key = key
        self._hash: int | None = None
        #: Where the previous hashed pick stopped, by priority (made on
        #: first use: a single instance's request never needs it).
        self._ring_position: dict[int, int] | None = None
        self.tried: list[T] = []
        instances = balancer.instances
        self._unhealthy: AbstractSet[int] = frozenset()
        if len(instances) > 1:
            unhealthy = {id(i) for i in instances if not i.healthy}
            if len(unhealthy) < len(instances):
                self._unhealthy = unhealthy
        self._level = 0

    @property
    def all_unhealthy(self) -> bool:
        """
        Whether health was ignored because no instance was healthy.
        """
        instances = self._balancer.instances
        return len(instances) > 1 and not self._unhealthy and not any(i.healthy for i in instances)

    def next(self) -> T | None:
        """
        The next instance to try, or L{None} when none is left.
        """
        balancer = self._balancer
        if len(balancer.instances) == 1:
            # One instance: always it, once (APISIX makes no picker at all).
            if self.tried:
                return None
            only = balancer.instances[0]
            if self._usable is not None and not self._usable(only):
                return None
            self.tried.append(only)
            return only
        tried = {id(instance) for instance in self.tried}
        levels = balancer._levels
        while self._level < len(levels):
            level = levels[self._level]
            candidates = [
                member
                for member in level.members
                if id(member) not in tried
                and id(member) not in self._unhealthy
                and (self._usable is None or self._usable(member))
            ]
            if candidates:
                picked = balancer._pick(level, candidates, self)
                self.tried.append(picked)
                return picked
            self._level += 1
        return None


# -- hash keys ------------------------------------------------------------------

#: The variables C{hash_on: vars} may name (APISIX's list), besides
#: C{arg_<name>}; C{vars_combinations} may also use C{http_<name>} and
#: C{cookie_<name>}.
HASH_VARIABLES = (
    "uri",
    "request_uri",
    "query_string",
    "remote_addr",
    "remote_port",
    "server_addr",
    "server_port",
    "server_name",
    "host",
    "hostname",
)

_ARG = re.compile(r"arg_[0-9A-Za-z_-]+")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
#: A C{$name} or C{${name}} reference in a C{vars_combinations} key.
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z0-9_-]+)\}|([A-Za-z0-9_]+))")


def _known_variable(name: str, extended: bool) -> bool:
    """
    Whether C{name} is a variable aiproxy can resolve.

    @param extended: also C{http_*} and C{cookie_*} (C{vars_combinations}).
    """
    if name in HASH_VARIABLES or _ARG.fullmatch(name):
        return True
    return extended and (name.startswith("http_") or name.startswith("cookie_")) and len(name) > 5


def hash_key_problem(hash_on: str, key: str | None) -> str | None:
    """
    What is wrong with a C{chash} balancer's C{hash_on} and C{key}, or
    L{None}.
    """
    if hash_on == "consumer":
        return None
    if key is None:
        return f"required when balancer.algorithm is chash and hash_on is {hash_on}"
    if hash_on == "vars":
        if not _known_variable(key, extended=False):
            known = ", ".join(HASH_VARIABLES)
            return f"unsupported variable {key!r}: one of {known}, or arg_<name>"
        return None
    if hash_on in ("header", "cookie"):
        if not _NAME.fullmatch(key):
            return f"invalid {hash_on} name {key!r}: letters, digits, '_' and '-' only"
        return None
    # vars_combinations
    names = [braced or bare for braced, bare in _REFERENCE.findall(key)]
    if not names:
        return f"{key!r} names no variable ($name or ${{name}})"
    unknown = [name for name in names if not _known_variable(name, extended=True)]
    if unknown:
        return f"unsupported variable {unknown[0]!r}"
    return None


@cache
def _hostname() -> str:
    return socket.gethostname()


def _address(address: Any) -> tuple[str, str]:
    """
    Host and port of a Twisted address, as text (empty for a UNIX socket).
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return ("" if host is None else str(host), "" if port is None else str(port))


def request_variable(request: Any, name: str) -> str | None:
    """
    The value of an nginx-style variable for a client request, or L{None}
    when it has none.

    @param request: a L{twisted.web.server.Request}.
    """
    if name == "uri":
        return str(request.path.decode("latin-1"))
    if name == "request_uri":
        return str(request.uri.decode("latin-1"))
    if name == "query_string":
        return str(request.uri.partition(b"?")[2].decode("latin-1"))
    if name in ("remote_addr", "remote_port"):
        host, port = _address(request.getClientAddress())
        return host if name == "remote_addr" else port
    if name in ("server_addr", "server_port"):
        host, port = _address(request.getHost())
        return host if name == "server_addr" else port
    if name in ("host", "server_name"):
        value = request.getHeader(b"host")
        if value is None:
            return None
        host = value.decode("latin-1").strip().lower()
        if host.startswith("["):
            return host.partition("]")[0] + "]"
        return host.rpartition(":")[0] if host.count(":") == 1 else host
    if name == "hostname":
        return _hostname()
    if name == "consumer_name":
        return getattr(request, "consumer_name", None)
    if name.startswith("arg_"):
        values = request.args.get(name[4:].encode("latin-1"))
        return values[0].decode("latin-1") if values else None
    if name.startswith("http_"):
        header = request.getHeader(name[5:].replace("_", "-").encode("latin-1"))
        return None if header is None else header.decode("latin-1")
    if name.startswith("cookie_"):
        cookie = request.getCookie(name[7:].encode("latin-1"))
        return None if cookie is None else cookie.decode("latin-1")
    return None


def request_hash_key(request: Any, hash_on: str, key: str | None) -> str:
    """
    The C{chash} key of a client request, as APISIX computes it: the
    variable, header or cookie named by C{key}, or the C{vars_combinations}
    template with its variables filled in; the client's address when that
    is empty. C{consumer} hashes the consumer's username (the client's
    address for an anonymous request).
    """
    value: str | None = None
    if hash_on == "consumer":
        value = getattr(request, "consumer_name", None)
    elif key is not None:
        if hash_on == "vars":
            value = request_variable(request, key)
        elif hash_on == "header":
            header = request.getHeader(key.encode("latin-1"))
            value = None if header is None else header.decode("latin-1")
        elif hash_on == "cookie":
            value = request_variable(request, "cookie_" + key)
        elif hash_on == "vars_combinations":
            value = _REFERENCE.sub(
                lambda m: request_variable(request, m.group(1) or m.group(2)) or "", key
            )
    if not value:
        value = request_variable(request, "remote_addr") or ""
    return value
