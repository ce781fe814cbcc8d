"""
The Redis counter stores (C{policy: redis} and C{redis-cluster}) against
real C{redis-server} processes (L{tests.redis_server}), in the real
reactor; the slot hashing and the TLS choice without a server.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any
from unittest import mock

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet._sslverify import ClientTLSOptions
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from aiproxy.budget.cluster import ClusterCounters, crc16, key_slot
from aiproxy.budget.redis import (
    ConnectionState,
    RedisConnection,
    RedisCounters,
    close_counter_stores,
    counter_store,
    tls_creator,
)
from aiproxy.budget.store import StoreUnavailable
from aiproxy.interfaces import ICounterStore
from tests.daemon import closed_port, wait_until
from tests.helpers import log_events
from tests.redis_server import (
    RedisCluster,
    RedisServer,
    redis_skip_reason,
    start_redis,
    start_redis_cluster,
)


def _store(testcase: TestCase, conf: dict[str, Any]) -> Any:
    """
    A store for C{conf} (not from the registry), closed by the cleanup.
    """
    redis = conf["policy"] == "redis"
    store = RedisCounters(conf, reactor) if redis else ClusterCounters(conf, reactor)
    testcase.addCleanup(store.close)
    return store


async def _ready(store: Any) -> None:
    """
    Wait until a single-server store is connected.
    """
    await wait_until(lambda: store.connection.state is ConnectionState.READY, what="connected")


async def _failure(d: Deferred[Any]) -> StoreUnavailable:
    """
    The L{StoreUnavailable} that C{d} fails with.
    """
    try:
        result = await d
    except StoreUnavailable as e:
        return e
    raise AssertionError(f"expected StoreUnavailable, got {result!r}")


class _Round:
    """
    Counts L{RedisConnection.pipeline} calls (round trips) per server and
    the commands they carry, while a test patches it in.
    """

    def __init__(self, testcase: TestCase) -> None:
        self.calls: Counter[str] = Counter()
        self.commands: list[tuple[str, Sequence[Any]]] = []
        real = RedisConnection.pipeline

        def counting(connection: RedisConnection, commands: Sequence[Any]) -> Any:
            self.calls[connection.label] += 1
            self.commands += [(connection.label, command) for command in commands]
            return real(connection, commands)

        testcase.patch(RedisConnection, "pipeline", counting)


def _tls_connection(creator: Any) -> SSL.Connection:
    """
    The OpenSSL connection C{creator} makes for a client.
    """
    protocol = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
    return creator.clientConnectionForTLS(protocol)  # type: ignore[no-any-return]


class SlotTests(SynchronousTestCase):
    """
    Keys map to cluster slots as the Redis Cluster specification says.
    """

    def test_crc16(self) -> None:
        """
        The CRC16 is XMODEM's: the check value of C{123456789} is 0x31C3.
        """
        self.assertEqual(crc16(b"123456789"), 0x31C3)
        self.assertEqual(crc16(b""), 0)

    def test_slots(self) -> None:
        """
        Known slots of plain keys (as C{CLUSTER KEYSLOT} gives them).
        """
        self.assertEqual(key_slot("foo"), 12182)
        self.assertEqual(key_slot("bar"), 5061)
        self.assertEqual(key_slot(b"123456789"), 0x31C3 % 16384)

    def test_hash_tags(self) -> None:
        """
        Only the text between the first C{{} and the next C{}} is hashed,
        when it is not empty.
        """
        self.assertEqual(key_slot("{user1000}.following"), key_slot("{user1000}.followers"))
        self.assertEqual(key_slot("{user1000}.following"), key_slot("user1000"))
        self.assertEqual(key_slot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384)
        self.assertEqual(key_slot("foo{{bar}}zap"), key_slot("{bar"))
        self.assertEqual(key_slot("foo{bar}{zap}"), key_slot("bar"))


class ClusterConfigTests(SynchronousTestCase):
    """
    C{redis_cluster_nodes} is a list of C{host:port}.
    """

    def test_not_host_port(self) -> None:
        """
        A node that is not C{host:port} is refused when the store is made.
        """
        conf = {"policy": "redis-cluster", "redis_cluster_nodes": ["10.0.0.1:7000", "r:x"]}
        error = self.assertRaises(ValueError, ClusterCounters, conf, reactor)
        self.assertEqual(str(error), "redis_cluster_nodes: each must be host:port")


class TLSChoiceTests(SynchronousTestCase):
    """
    C{redis_ssl_verify} chooses between a verifying and a non-verifying TLS
    client.
    """

    def test_verify(self) -> None:
        """
        With verification, the client checks the certificate, for the host.
        """
        creator: Any = tls_creator("redis.example", 6380, True)
        self.assertIsInstance(creator, ClientTLSOptions)
        self.assertEqual(creator._hostnameASCII, "redis.example")
        connection = _tls_connection(creator)
        self.assertTrue(connection.get_context().get_verify_mode() & SSL.VERIFY_PEER)
        self.assertEqual(connection.get_servername(), b"redis.example")

    def test_no_verify(self) -> None:
        """
        Without verification nothing is checked, and SNI is still sent.
        """
        creator = tls_creator("redis.example", 6380, False)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(creator))
        connection = _tls_connection(creator)
        self.assertEqual(connection.get_context().get_verify_mode(), SSL.VERIFY_NONE)
        self.assertEqual(connection.get_servername(), b"redis.example")


class RegistryTests(TestCase):
    """
    L{counter_store} gives one store per distinct Redis, per process.
    """

    skip = redis_skip_reason()

    async def test_same_parameters_same_store(self) -> None:
        """
        The same connection parameters give the same object; another
        database, password or policy gives another; closing them all
        empties the registry.
        """
        redis = await start_redis(self)
        self.addCleanup(close_counter_stores)
        first = counter_store(redis.conf(limit=10, time_window=60), reactor)
        self.assertIs(counter_store(redis.conf(rules=[]), reactor), first)
        self.assertIsNot(counter_store(redis.conf(redis_database=2), reactor), first)
        self.assertIsNot(counter_store(redis.conf(redis_password="x"), reactor), first)
        assert isinstance(first, RedisCounters)
        await close_counter_stores()
        self.assertIs(first.connection.state, ConnectionState.CLOSED)
        again = counter_store(redis.conf(), reactor)
        self.assertIsNot(again, first)
        await _ready(again)
        self.assertEqual(await again.spent(["k"]), [0])

    def test_local_policy(self) -> None:
        """
        The in-process policy is not a shared store.
        """
        self.assertRaises(ValueError, counter_store, {"policy": "local"}, reactor)

    async def test_closed(self) -> None:
        """
        A closed store refuses at once, and the registry makes a new one.
        """
        redis = await start_redis(self)
        self.addCleanup(close_counter_stores)
        store = counter_store(redis.conf(), reactor)
        await store.close()
        error = await _failure(store.spent(["a"]))
        self.assertEqual(error.cause, f"redis 127.0.0.1:{redis.port} is closed")
        self.assertIsNot(counter_store(redis.conf(), reactor), store)


class RedisCountersTests(TestCase):
    """
    L{RedisCounters} against one real server.
    """

    skip = redis_skip_reason()

    async def _store(self, **options: Any) -> tuple[RedisServer, RedisCounters]:
        redis = await start_redis(self, **options)
        store = _store(self, redis.conf())
        await _ready(store)
        return redis, store

    async def test_interface(self) -> None:
        """
        It is an L{ICounterStore} described by its address.
        """
        redis, store = await self._store()
        self.assertTrue(verifyObject(ICounterStore, store))
        self.assertEqual(store.description, f"redis 127.0.0.1:{redis.port}")

    async def test_missing(self) -> None:
        """
        Counters that do not exist hold 0; no keys, no answer needed.
        """
        _, store = await self._store()
        self.assertEqual(await store.spent(["a", "b"]), [0, 0])
        self.assertEqual(await store.spent([]), [])
        await store.charge([])

    async def test_charge(self) -> None:
        """
        Charges add up per key, the same key charged twice in one call too.
        """
        redis, store = await self._store()
        await store.charge([("a", 5, 60), ("b", 7, 60), ("a", 1, 60)])
        self.assertEqual(await store.spent(["a", "b", "c"]), [6, 7, 0])
        self.assertEqual(redis.command("GET", "a"), "6")

    async def test_ttl(self) -> None:
        """
        A counter created by a charge expires after its ttl; a later charge
        with another ttl does not extend it.
        """
        redis, store = await self._store()
        await store.charge([("w", 1, 100)])
        self.assertTrue(95 <= redis.command("TTL", "w") <= 100)
        await store.charge([("w", 1, 5000)])
        self.assertTrue(95 <= redis.command("TTL", "w") <= 100)
        redis.command("SET", "forever", "3")
        await store.charge([("forever", 1, 30)])
        self.assertTrue(25 <= redis.command("TTL", "forever") <= 30)
        self.assertEqual(await store.spent(["w", "forever"]), [2, 4])

    async def test_concurrent(self) -> None:
        """
        Many charges at once, from two stores (two gateways), sum exactly.
        """
        redis, store = await self._store()
        other = _store(self, redis.conf())
        await _ready(other)
        charges = [
            (store if i % 2 else other).charge([("total", i, 60), (f"k{i % 7}", 1, 60)])
            for i in range(400)
        ]
        await gatherResults(charges)
        self.assertEqual(await store.spent(["total"]), [sum(range(400))])
        self.assertEqual(sum(await other.spent([f"k{i}" for i in range(7)])), 400)

    async def test_round_trips(self) -> None:
        """
        C{spent} is one C{MGET} and C{charge} one C{EVALSHA}, one round trip
        each; when the server lost the script, C{EVAL} brings it back.
        """
        redis, store = await self._store()
        rounds = _Round(self)
        keys = [f"key{i}" for i in range(20)]
        await store.charge([(key, 1, 60) for key in keys])
        self.assertEqual(await store.spent(keys), [1] * 20)
        self.assertEqual(sum(rounds.calls.values()), 2)
        self.assertEqual([c[0] for _, c in rounds.commands], ["EVALSHA", "MGET"])
        redis.command("SCRIPT", "FLUSH")
        await store.charge([("key0", 1, 60)])
        self.assertEqual(await store.spent(["key0"]), [2])
        stats = redis.command("INFO", "commandstats")
        self.assertIn("cmdstat_mget:calls=2,", stats)
        self.assertIn("cmdstat_eval:calls=2,", stats)

    async def test_database(self) -> None:
        """
        C{redis_database} selects the database the counters are in.
        """
        redis = await start_redis(self)
        store = _store(self, redis.conf(redis_database=3))
        self.assertEqual(store.description, f"redis 127.0.0.1:{redis.port}/3")
        await store.charge([("d", 4, 60)])
        self.assertIn("db3:keys=1,expires=1", redis.command("INFO", "keyspace"))
        self.assertIsNone(redis.command("GET", "d"))


class AuthTests(TestCase):
    """
    Password and ACL user authentication; credentials never show.
    """

    skip = redis_skip_reason()

    async def test_password(self) -> None:
        """
        The password of C{requirepass} lets the store in.
        """
        redis = await start_redis(self, password="pass-one-secret")
        store = _store(self, redis.conf())
        await store.charge([("p", 2, 60)])
        self.assertEqual(await store.spent(["p"]), [2])

    async def test_wrong_password(self) -> None:
        """
        A wrong password fails with a cause that does not hold it; so does
        a missing one.
        """
        redis = await start_redis(self, password="pass-one-secret")
        events = log_events(self, "aiproxy.budget.redis")
        store = _store(self, redis.conf(redis_password="wrong-secret-value"))
        error = await _failure(store.spent(["p"]))
        self.assertIn(
            f"redis 127.0.0.1:{redis.port} refused the connection: WRONGPASS", error.cause
        )
        self.assertNotIn("secret", error.cause)
        self.assertNotIn("secret", store.description)
        error = await _failure(store.charge([("p", 1, 60)]))
        self.assertIn("WRONGPASS", error.cause)
        anonymous = _store(self, redis.conf(redis_password=None))
        error = await _failure(anonymous.spent(["p"]))
        self.assertIn("refused the connection: NOAUTH", error.cause)
        said = [formatEvent(event) for event in events]
        self.assertIn(f"Counter store unavailable: {error.cause}", said)
        self.assertFalse([line for line in said if "secret" in line])

    async def test_acl_user(self) -> None:
        """
        An ACL user and its password (C{AUTH user pass}) let the store in;
        a wrong password for it does not, and does not show.
        """
        redis = await start_redis(self, username="gateway", password="acl-secret-pass")
        store = _store(self, redis.conf())
        await store.charge([("u", 3, 60)])
        self.assertEqual(await store.spent(["u"]), [3])
        wrong = _store(self, redis.conf(redis_password="acl-secret-wrong"))
        error = await _failure(wrong.spent(["u"]))
        self.assertIn("WRONGPASS", error.cause)
        self.assertNotIn("secret", error.cause)


class AvailabilityTests(TestCase):
    """
    Timeouts, a server that goes away and comes back.
    """

    skip = redis_skip_reason()

    async def test_unreachable(self) -> None:
        """
        Nothing listening: the request fails at once with the reason.
        """
        port = closed_port()
        store = _store(self, {"policy": "redis", "redis_host": "127.0.0.1", "redis_port": port})
        started = time.monotonic()
        error = await _failure(store.spent(["a"]))
        self.assertEqual(error.cause, f"redis 127.0.0.1:{port} unreachable: Connection refused")
        self.assertLess(time.monotonic() - started, 0.5)

    async def test_timeout(self) -> None:
        """
        A server that stops answering fails the request after about
        C{redis_timeout}; once it answers again, so does the store.
        """
        redis = await start_redis(self)
        store = _store(self, redis.conf(redis_timeout=300))
        await _ready(store)
        redis.pause()
        started = time.monotonic()
        error = await _failure(store.charge([("t", 1, 60)]))
        elapsed = time.monotonic() - started
        self.assertEqual(error.cause, f"redis 127.0.0.1:{redis.port} did not answer within 300 ms")
        self.assertTrue(0.25 <= elapsed < 1.0, elapsed)
        started = time.monotonic()
        await _failure(store.spent(["t"]))
        self.assertLess(time.monotonic() - started, 0.5)
        redis.resume()
        await _ready(store)
        await store.charge([("t", 1, 60)])
        self.assertEqual(await store.spent(["t"]), [1])

    async def test_restart(self) -> None:
        """
        A killed server fails requests fast; restarted on the same port, it
        counts again.
        """
        redis = await start_redis(self)
        events = log_events(self, "aiproxy.budget.redis")
        store = _store(self, redis.conf(redis_timeout=5000))
        await store.charge([("r", 1, 60)])
        await redis.kill()
        started = time.monotonic()
        await _failure(store.spent(["r"]))
        error = await _failure(store.spent(["r"]))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(
            error.cause, f"redis 127.0.0.1:{redis.port} unreachable: Connection refused"
        )
        await redis.start()
        await _ready(store)
        await store.charge([("r", 2, 60)])
        self.assertEqual(await store.spent(["r"]), [2])
        where = f"redis 127.0.0.1:{redis.port}"
        said = [formatEvent(event) for event in events]
        self.assertEqual(said.count(f"Counter store connected: {where}"), 2, said)
        self.assertIn(f"{where}: connection closed; reconnecting", said)
        self.assertEqual(said.count(f"Counter store unavailable: {error.cause}"), 1, said)


class TLSTests(TestCase):
    """
    A real TLS Redis, with and without certificate verification.
    """

    skip = redis_skip_reason()

    async def test_tls(self) -> None:
        """
        Without verification a self-made certificate is accepted; with it,
        it is refused until the system's trust store (here C{SSL_CERT_FILE})
        has its CA.
        """
        redis = await start_redis(self, tls=True)
        store = _store(self, redis.conf(redis_ssl_verify=False))
        await store.charge([("s", 1, 60)])
        self.assertEqual(await store.spent(["s"]), [1])
        verifying = _store(self, redis.conf(redis_ssl_verify=True))
        error = await _failure(verifying.spent(["s"]))
        self.assertEqual(
            error.cause,
            f"redis 127.0.0.1:{redis.port} unreachable: TLS failed: certificate verify failed",
        )
        trust = mock.patch.dict(os.environ, {"SSL_CERT_FILE": str(redis.directory / "ca.pem")})
        trust.start()
        self.addCleanup(trust.stop)
        trusting = _store(self, redis.conf(redis_ssl_verify=True))
        self.assertEqual(await trusting.spent(["s"]), [1])


class ClusterTests(TestCase):
    """
    L{ClusterCounters} against a real three-node cluster.
    """

    skip = redis_skip_reason()

    def _spread(self, cluster: RedisCluster, per_node: int = 3) -> list[str]:
        """
        Keys of C{per_node} different slots on each node, node after node.
        """
        keys: dict[int, list[str]] = {node.port: [] for node in cluster.nodes}
        i = 0
        while any(len(found) < per_node for found in keys.values()):
            key = f"aiproxy:rl:scope{i}:1700000000"
            i += 1
            found = keys[cluster.node_for(key).port]
            if len(found) < per_node:
                found.append(key)
        return [key for found in keys.values() for key in found]

    async def test_routing(self) -> None:
        """
        C{counter_store} makes one L{ClusterCounters} per cluster. Keys of
        every node are charged where they belong (in the slot C{CLUSTER
        KEYSLOT} gives) with their ttl, and read back: one round trip to
        each node involved, one command per slot. One reachable seed is
        enough, an unreachable one is passed over.
        """
        cluster = await start_redis_cluster(self)
        self.addCleanup(close_counter_stores)
        store = counter_store(cluster.conf(), reactor)
        self.assertIsInstance(store, ClusterCounters)
        self.assertIs(counter_store(cluster.conf(limit=1, time_window=1), reactor), store)
        self.assertTrue(verifyObject(ICounterStore, store))
        self.assertEqual(store.description, "redis-cluster test-cluster")
        keys = self._spread(cluster)
        for key in keys:
            self.assertEqual(key_slot(key), cluster.nodes[0].command("CLUSTER", "KEYSLOT", key))
        await store.charge([(key, i + 1, 60) for i, key in enumerate(keys)])
        rounds = _Round(self)
        self.assertEqual(await store.spent([*keys, "missing"]), [*range(1, len(keys) + 1), 0])
        self.assertEqual(sorted(rounds.calls.values()), [1, 1, 1])
        self.assertEqual(len(rounds.commands), len({key_slot(k) for k in [*keys, "missing"]}))
        for i, key in enumerate(keys):
            self.assertEqual(cluster.node_for(key).command("GET", key), str(i + 1))
            self.assertTrue(0 < cluster.node_for(key).command("TTL", key) <= 60)
        rounds.calls.clear()
        await store.charge([(key, 1, 60) for key in keys[:3]])
        self.assertEqual(list(rounds.calls.values()), [1])
        seeds = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{cluster.nodes[1].port}"]
        other = _store(self, cluster.conf(redis_cluster_nodes=seeds))
        self.assertEqual(await other.spent(keys[:3]), [2, 3, 4])

    async def test_moved(self) -> None:
        """
        A slot migrated to another node after the store read the map: the
        C{ASK} during the migration and the C{MOVED} after it are followed,
        and the map is read again.
        """
        cluster = await start_redis_cluster(self)
        events = log_events(self, "aiproxy.budget.cluster")
        store = _store(self, cluster.conf())
        key = "{budget}:a"
        source = cluster.node_for(key)
        target = next(node for node in cluster.nodes if node is not source)
        slot = key_slot(key)
        await store.charge([(key, 5, 60)])
        source_id, target_id = (cluster.ids[cluster.nodes.index(n)] for n in (source, target))
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        rounds = _Round(self)
        await store.charge([("{budget}:b", 2, 60)])
        self.assertEqual(
            target.command("CLUSTER", "COUNTKEYSINSLOT", slot), 1, "charged on the target"
        )
        self.assertIn(("ASKING",), [command for _, command in rounds.commands])
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        for node in cluster.nodes:
            node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        rounds.commands.clear()
        self.assertEqual(await store.spent([key, "{budget}:b"]), [5, 2])
        sent = [command[0] for _, command in rounds.commands]
        self.assertEqual(sent.count("MGET"), 2)
        self.assertIn("CLUSTER", sent)
        rounds.commands.clear()
        self.assertEqual(await store.spent([key]), [5])
        self.assertEqual(rounds.commands, [(f"redis 127.0.0.1:{target.port}", ("MGET", key))])
        self.assertEqual(
            [formatEvent(event) for event in events],
            [f"redis-cluster test-cluster: slot {slot} moved to 127.0.0.1:{target.port}"],
        )

    async def test_unreachable(self) -> None:
        """
        No seed answers: the request fails with the reason.
        """
        port = closed_port()
        conf = {
            "policy": "redis-cluster",
            "redis_cluster_nodes": [f"127.0.0.1:{port}"],
            "redis_cluster_name": "gone",
        }
        store = _store(self, conf)
        error = await _failure(store.spent(["a"]))
        self.assertEqual(
            error.cause,
            f"redis-cluster gone: no node gave the slot map "
            f"(redis 127.0.0.1:{port} unreachable: Connection refused)",
        )
