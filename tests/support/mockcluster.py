"""librdkafka's mock cluster, from Python, with fault injection.

confluent-kafka-python does not expose librdkafka's mock API (``rdkafka_mock.h``), but the mock
cluster listens on real loopback TCP ports, so any client — this process's confluent-kafka
clients, or a ``streamer run`` subprocess — can use its bootstrap string. This module loads the
librdkafka shared library bundled with the confluent_kafka wheel through ctypes, creates a
private ``rd_kafka_t`` (a producer that never produces) to own the cluster, and wraps the calls the
tests need::

    with MockCluster(brokers=3) as cluster:
        cluster.create_topic("orders", partitions=3)
        cluster.push_request_errors(ApiKey.OFFSET_COMMIT, [Err.REQUEST_TIMED_OUT, Err.NOT_COORDINATOR])
        cluster.set_coordinator("my-group", broker_id=2)
        Producer({"bootstrap.servers": cluster.bootstrap})...

The cluster (its broker threads and listeners) lives as long as its ``rd_kafka_t``: keep the
``MockCluster`` referenced while clients use it, and close it (or leave the ``with`` block) after
they are gone.

**Which library.** The wheel bundles librdkafka as ``confluent_kafka.libs/librdkafka-<hash>.so.1``
(auditwheel), next to the package, and ``cimpl*.so`` links against it. We use that very file,
found in that order: (1) the ``librdkafka`` line of ``ldd`` on ``confluent_kafka/cimpl*.so``
(exactly what cimpl loads), (2) ``confluent_kafka.libs/librdkafka*`` next to the package (no
``ldd``), (3) ``ctypes.util.find_library("rdkafka")`` (a confluent_kafka built from source
against a system librdkafka). Loading the same path as cimpl does
gives the copy already mapped into the process. The environment variable
``STREAMER_TEST_LIBRDKAFKA`` overrides the search with an explicit path.

**Caveats.** The mock API is experimental in librdkafka: not covered by its API/ABI stability
promise, so a new librdkafka may change a signature below (they were taken from ``rdkafka_mock.h``
of librdkafka 2.15/2.16 and checked against the exports of the 2.16.0 the wheel bundles). The
error stacks are cluster-wide (or per broker) per ApiKey: *every* client's next matching requests
fail, not only the worker's. The mock does not implement every API: notably not DescribeConfigs
or CreateTopics (see ``run_streamer`` for how a worker copes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ApiKey",
    "Err",
    "MockCluster",
    "MockClusterError",
    "MockRequest",
    "librdkafka_path",
    "run_streamer",
    "streamer_on_mock_command",
]

LIBRDKAFKA_ENV = "STREAMER_TEST_LIBRDKAFKA"
_ERRSTR_SIZE = 512
_RD_KAFKA_PRODUCER = 0
_RD_KAFKA_CONF_OK = 0


class ApiKey(enum.IntEnum):
    """Kafka protocol request types (the subset tests inject errors into)."""

    PRODUCE = 0
    FETCH = 1
    LIST_OFFSETS = 2
    METADATA = 3
    OFFSET_COMMIT = 8
    OFFSET_FETCH = 9
    FIND_COORDINATOR = 10
    JOIN_GROUP = 11
    HEARTBEAT = 12
    LEAVE_GROUP = 13
    SYNC_GROUP = 14


class Err(enum.IntEnum):
    """Kafka protocol error codes (``rd_kafka_resp_err_t``) useful for injection."""

    NO_ERROR = 0
    #: librdkafka-specific: the mock broker closes the client's connection on this request.
    TRANSPORT = -195
    OFFSET_OUT_OF_RANGE = 1
    UNKNOWN_TOPIC_OR_PART = 3
    NOT_LEADER_FOR_PARTITION = 6
    REQUEST_TIMED_OUT = 7
    #: Not retried by librdkafka's OffsetCommit handling: fails a commit at once.
    OFFSET_METADATA_TOO_LARGE = 12
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    ILLEGAL_GENERATION = 22
    UNKNOWN_MEMBER_ID = 25
    REBALANCE_IN_PROGRESS = 27


@dataclass(frozen=True, slots=True)
class MockRequest:
    """A request a mock broker received (while request tracking is on)."""

    broker_id: int
    api_key: int
    #: librdkafka's monotonic clock (rd_clock), in microseconds.
    timestamp_us: int


class MockClusterError(RuntimeError):
    """A mock API call failed (carries librdkafka's error code and name)."""


# -- finding and binding librdkafka ----------------------------------------------------------------


def _confluent_kafka_dir() -> Path:
    import confluent_kafka

    return Path(confluent_kafka.__file__).resolve().parent


def _from_ldd(extension: Path) -> Path | None:
    try:
        out = subprocess.run(
            ["ldd", str(extension)], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        match = re.search(r"(librdkafka[^\s]*)\s+=>\s+(\S+)", line)
        if match and match.group(2) != "not":
            return Path(match.group(2)).resolve()
    return None


def librdkafka_path() -> Path | str:
    """The librdkafka shared library confluent_kafka's ``cimpl`` uses (see the module docstring)."""
    override = os.environ.get(LIBRDKAFKA_ENV)
    if override:
        return Path(override)
    package = _confluent_kafka_dir()
    for extension in sorted(package.glob("cimpl*.so")):
        found = _from_ldd(extension)
        if found is not None:
            return found
    bundled = sorted((package.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    if bundled:
        return bundled[0]
    system = ctypes.util.find_library("rdkafka")
    if system is not None:
        return system
    raise MockClusterError(
        f"no librdkafka found: not linked by {package}/cimpl*.so (ldd), not in "
        f"{package.parent / 'confluent_kafka.libs'}, not on the system; set {LIBRDKAFKA_ENV} to its path"
    )


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the signatures used here (from librdkafka's rdkafka.h and rdkafka_mock.h)."""
    c = ctypes
    p = c.c_void_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "rd_kafka_version_str": (c.c_char_p, []),
        "rd_kafka_err2name": (c.c_char_p, [c.c_int]),
        "rd_kafka_conf_new": (p, []),
        "rd_kafka_conf_set": (c.c_int, [p, c.c_char_p, c.c_char_p, c.c_char_p, c.c_size_t]),
        "rd_kafka_conf_destroy": (None, [p]),
        "rd_kafka_new": (p, [c.c_int, p, c.c_char_p, c.c_size_t]),
        "rd_kafka_destroy": (None, [p]),
        "rd_kafka_mock_cluster_new": (p, [p, c.c_int]),
        "rd_kafka_mock_cluster_destroy": (None, [p]),
        "rd_kafka_mock_cluster_bootstraps": (c.c_char_p, [p]),
        "rd_kafka_mock_topic_create": (c.c_int, [p, c.c_char_p, c.c_int, c.c_int]),
        "rd_kafka_mock_push_request_errors_array": (
            None,
            [p, c.c_int16, c.c_size_t, c.POINTER(c.c_int)],
        ),
        "rd_kafka_mock_clear_request_errors": (None, [p, c.c_int16]),
        "rd_kafka_mock_broker_error_stack_cnt": (
            c.c_int,
            [p, c.c_int32, c.c_int16, c.POINTER(c.c_size_t)],
        ),
        "rd_kafka_mock_coordinator_set": (c.c_int, [p, c.c_char_p, c.c_char_p, c.c_int32]),
        "rd_kafka_mock_partition_set_leader": (c.c_int, [p, c.c_char_p, c.c_int32, c.c_int32]),
        "rd_kafka_mock_broker_set_down": (c.c_int, [p, c.c_int32]),
        "rd_kafka_mock_broker_set_up": (c.c_int, [p, c.c_int32]),
        "rd_kafka_mock_broker_set_rtt": (c.c_int, [p, c.c_int32, c.c_int]),
        "rd_kafka_mock_group_initial_rebalance_delay_ms": (None, [p, c.c_int32]),
        "rd_kafka_mock_start_request_tracking": (None, [p]),
        "rd_kafka_mock_stop_request_tracking": (None, [p]),
        "rd_kafka_mock_clear_requests": (None, [p]),
        "rd_kafka_mock_get_requests": (c.POINTER(p), [p, c.POINTER(c.c_size_t)]),
        "rd_kafka_mock_request_destroy_array": (None, [c.POINTER(p), c.c_size_t]),
        "rd_kafka_mock_request_id": (c.c_int32, [p]),
        "rd_kafka_mock_request_api_key": (c.c_int16, [p]),
        "rd_kafka_mock_request_timestamp": (c.c_int64, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib  # noqa: PLW0603 - one binding per process, made on first use
    if _lib is None:
        _lib = _bind(ctypes.CDLL(str(librdkafka_path())))
    return _lib


# -- the cluster -----------------------------------------------------------------------------------


class MockCluster:
    """A librdkafka mock cluster of ``brokers`` brokers (ids 1..brokers) on loopback ports.

    ``log_level`` is the syslog level of the owning handle's log (3: errors only; 7 with
    ``debug="mock"`` shows what the mock brokers do).
    """

    def __init__(self, brokers: int = 3, *, log_level: int = 3, debug: str | None = None) -> None:
        if brokers < 1:
            raise ValueError("a mock cluster needs at least one broker")
        self.brokers = brokers
        self._lib = _library()
        errstr = ctypes.create_string_buffer(_ERRSTR_SIZE)
        conf = self._lib.rd_kafka_conf_new()
        settings = {"client.id": "streamer-test-mockcluster", "log_level": str(log_level)}
        if debug:
            settings["debug"] = debug
        for name, value in settings.items():
            if (
                self._lib.rd_kafka_conf_set(conf, name.encode(), value.encode(), errstr, _ERRSTR_SIZE)
                != _RD_KAFKA_CONF_OK
            ):
                self._lib.rd_kafka_conf_destroy(conf)
                raise MockClusterError(f"conf {name}={value}: {errstr.value.decode()}")
        # rd_kafka_new takes ownership of conf on success only.
        rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_SIZE)
        if not rk:
            self._lib.rd_kafka_conf_destroy(conf)
            raise MockClusterError(f"rd_kafka_new: {errstr.value.decode()}")
        self._rk: int | None = rk
        mcluster = self._lib.rd_kafka_mock_cluster_new(rk, brokers)
        if not mcluster:
            self._lib.rd_kafka_destroy(rk)
            self._rk = None
            raise MockClusterError("rd_kafka_mock_cluster_new returned NULL")
        self._mcluster: int | None = mcluster
        self._bootstrap: str = self._lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()
        self._requests: list[MockRequest] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten cluster is torn down with its object, not leaked with its threads.
        if getattr(self, "_mcluster", None) is not None:
            self.close()

    def close(self) -> None:
        """Destroy the cluster (its listeners close) and the handle that owns it. Idempotent."""
        if self._mcluster is not None:
            self._lib.rd_kafka_mock_cluster_destroy(self._mcluster)
            self._mcluster = None
        if self._rk is not None:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    @property
    def closed(self) -> bool:
        """Whether ``close`` ran."""
        return self._mcluster is None

    def _cluster(self) -> int:
        if self._mcluster is None:
            raise MockClusterError("the mock cluster is closed")
        return self._mcluster

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            name = self._lib.rd_kafka_err2name(err).decode()
            raise MockClusterError(f"{what}: {name} ({err})")

    # -- queries -----------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The cluster's ``bootstrap.servers`` (``127.0.0.1:<port>,...``)."""
        self._cluster()
        return self._bootstrap

    @property
    def broker_ids(self) -> list[int]:
        """The brokers' ids: 1 to ``brokers``."""
        return list(range(1, self.brokers + 1))

    @property
    def librdkafka_version(self) -> str:
        """The version of the librdkafka the cluster runs in."""
        return str(self._lib.rd_kafka_version_str().decode())

    def broker_error_stack_count(self, broker_id: int, api_key: int) -> int:
        """Errors still stacked on ``broker_id`` for ``api_key`` (per-broker stack only)."""
        count = ctypes.c_size_t(0)
        err = self._lib.rd_kafka_mock_broker_error_stack_cnt(
            self._cluster(), broker_id, api_key, ctypes.byref(count)
        )
        self._check(err, f"error stack count of broker {broker_id}")
        return count.value

    # -- request tracking --------------------------------------------------------------------------

    def start_request_tracking(self) -> None:
        """Record every request the brokers receive from now on (forgetting any recorded before)."""
        self._lib.rd_kafka_mock_start_request_tracking(self._cluster())
        self._requests = []

    def stop_request_tracking(self) -> None:
        """Stop recording requests and forget those recorded."""
        self._lib.rd_kafka_mock_stop_request_tracking(self._cluster())
        self._requests = []

    def clear_requests(self) -> None:
        """Forget the requests recorded so far (tracking stays on)."""
        self._lib.rd_kafka_mock_clear_requests(self._cluster())
        self._requests = []

    def requests(self) -> list[MockRequest]:
        """The requests recorded since tracking started (or the last clear), in the order received.

        A request is recorded as a broker reads it, just before its handler runs (and pops an
        injected error): once it is listed here, it took its error from the stack, if any. The
        mock's list only grows, so the entries already converted are kept and only new ones read.
        """
        count = ctypes.c_size_t(0)
        array = self._lib.rd_kafka_mock_get_requests(self._cluster(), ctypes.byref(count))
        if not array:
            return list(self._requests)
        try:
            lib = self._lib
            self._requests.extend(
                MockRequest(
                    int(lib.rd_kafka_mock_request_id(array[i])),
                    int(lib.rd_kafka_mock_request_api_key(array[i])),
                    int(lib.rd_kafka_mock_request_timestamp(array[i])),
                )
                for i in range(len(self._requests), count.value)
            )
        finally:
            self._lib.rd_kafka_mock_request_destroy_array(array, count.value)
        return list(self._requests)

    def request_count(self, api_key: int) -> int:
        """How many requests of ``api_key`` were recorded since tracking started."""
        return sum(request.api_key == api_key for request in self.requests())

    # -- topics and leaders ------------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int = 3, replication: int = 1) -> str:
        """Create ``topic`` (leaders spread over the brokers); return its name."""
        err = self._lib.rd_kafka_mock_topic_create(self._cluster(), topic.encode(), partitions, replication)
        self._check(err, f"create topic {topic}")
        return topic

    def set_partition_leader(self, topic: str, partition: int, broker_id: int) -> None:
        """Move the leadership of ``topic[partition]`` to ``broker_id``."""
        err = self._lib.rd_kafka_mock_partition_set_leader(
            self._cluster(), topic.encode(), partition, broker_id
        )
        self._check(err, f"leader of {topic}[{partition}] to broker {broker_id}")

    # -- fault injection ---------------------------------------------------------------------------

    def push_request_errors(self, api_key: int, errors: Sequence[int]) -> None:
        """Fail the next ``len(errors)`` requests of ``api_key`` (to any broker, from any client).

        The errors are used in order, one per request, and removed from the cluster's stack; a
        request that finds the stack empty is served normally. ``Err.TRANSPORT`` makes the
        broker close the connection instead of answering.
        """
        if not errors:
            return
        array = (ctypes.c_int * len(errors))(*(int(e) for e in errors))
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster(), api_key, len(errors), array)

    def clear_request_errors(self, api_key: int) -> None:
        """Drop the errors still stacked (cluster-wide) for ``api_key``."""
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster(), api_key)

    def push_broker_request_errors(
        self, broker_id: int, api_key: int, errors_rtts: Iterable[tuple[int, int]]
    ) -> None:
        """Answer the next requests of ``api_key`` to ``broker_id`` with ``(error, delay_ms)`` each.

        ``error`` may be 0 (``Err.NO_ERROR``): a successful answer, delayed. Per-broker stacks
        take precedence over the cluster-wide one. The mock applies a request's effect (e.g. the
        commit) when it reads it; only the answer is delayed.
        """
        pairs = list(errors_rtts)
        if not pairs:
            return
        # The C function is variadic (cnt pairs of int err, int rtt_ms); ctypes calls variadic
        # functions through a prototype with the actual argument list spelled out.
        prototype = ctypes.CFUNCTYPE(
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int16,
            ctypes.c_size_t,
            *([ctypes.c_int] * (2 * len(pairs))),
        )
        function = prototype(("rd_kafka_mock_broker_push_request_error_rtts", self._lib))
        flat = [int(value) for pair in pairs for value in pair]
        err = function(self._cluster(), broker_id, api_key, len(pairs), *flat)
        self._check(err, f"push errors to broker {broker_id}")

    def set_coordinator(self, group: str, broker_id: int, key_type: str = "group") -> None:
        """Make ``broker_id`` the coordinator of ``group`` (``key_type`` "group" or "transaction").

        Requests that check the coordinator (JoinGroup, SyncGroup, Heartbeat, LeaveGroup) sent to
        the old one then fail with NOT_COORDINATOR, so clients look it up again. The group's state
        and committed offsets are cluster-wide in the mock: they move with it.
        """
        err = self._lib.rd_kafka_mock_coordinator_set(
            self._cluster(), key_type.encode(), group.encode(), broker_id
        )
        self._check(err, f"coordinator of {key_type} {group} to broker {broker_id}")

    def set_group_initial_rebalance_delay(self, delay_ms: int) -> None:
        """The brokers' ``group.initial.rebalance.delay.ms`` (the mock's default: 3000 ms)."""
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._cluster(), delay_ms)

    def set_broker_down(self, broker_id: int) -> None:
        """Close ``broker_id``'s connections and refuse new ones until ``set_broker_up``."""
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._cluster(), broker_id), "broker down")

    def set_broker_up(self, broker_id: int) -> None:
        """Let ``broker_id`` accept connections again."""
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._cluster(), broker_id), "broker up")

    def set_broker_rtt(self, broker_id: int, rtt_ms: int) -> None:
        """Delay every answer of ``broker_id`` by ``rtt_ms``."""
        self._check(self._lib.rd_kafka_mock_broker_set_rtt(self._cluster(), broker_id, rtt_ms), "rtt")


# -- running streamer against the mock ----------------------------------------------------------


def run_streamer(argv: Sequence[str]) -> int:
    """``streamer <argv>``, able to start against a mock cluster (``python -m tests.support.mockcluster``).

    streamer's preflight reads the subscribed topics' ``retention.ms`` with DescribeConfigs,
    which the mock cluster does not implement: it never answers, the admin future times out
    and the worker stops before its first poll. Here ``describe_topics`` asks the metadata only
    and reports every retention as unknown (-1, "forever"), which is all preflight needs with
    dedup off (the retention only feeds the dedup-window check). Nothing else of the worker is
    touched: the poll loop, the commits and the rebalance handling under test are streamer's own.
    """
    from confluent_kafka.admin import AdminClient

    from streamer import source
    from streamer.cli import main

    def describe_topics(
        self: source.KafkaSource, topics: Sequence[str], timeout: float = 10.0
    ) -> dict[str, source.TopicInfo | None]:
        admin = AdminClient(self._admin_config())
        metadata = admin.list_topics(timeout=timeout)
        result: dict[str, source.TopicInfo | None] = {}
        for topic in topics:
            meta = metadata.topics.get(topic)
            exists = meta is not None and meta.error is None
            result[topic] = source.TopicInfo(len(meta.partitions), -1) if exists and meta else None
        return result

    source.KafkaSource.describe_topics = describe_topics  # type: ignore[method-assign]
    return main(list(argv))


def streamer_on_mock_command(*args: str) -> list[str]:
    """The command line of ``streamer <args>`` through ``run_streamer``, with this interpreter."""
    return [sys.executable, "-m", "tests.support.mockcluster", *args]


if __name__ == "__main__":
    sys.exit(run_streamer(sys.argv[1:]))
