"""Settings: one frozen, validated object built at start-up from a TOML file plus the environment.

Precedence, highest first: environment variables ``STREAMER_<SECTION>__<KEY>`` (for example
``STREAMER_KAFKA__BOOTSTRAP_SERVERS``), the TOML file given with ``--config``, the defaults below.
``[kafka.client]`` is passed through to librdkafka; values of keys that look secret are kept as
``SecretStr`` and never appear in a repr, a log line or ``Settings.redacted()``.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from streamer.errors import ConfigError

ClientValue = str | int | float | bool | SecretStr

#: librdkafka keys whose values are secrets (matched as substrings of the key).
_SECRET_MARKERS = ("password", "secret", "token", "sasl.oauthbearer.config", "ssl.key.pem", "jaas")

#: librdkafka keys streamer owns: letting users set them would break the delivery contract.
_RESERVED_CLIENT_KEYS = {
    "enable.auto.commit": "streamer alone decides what is committed",
    "enable.auto.offset.store": "streamer alone decides what is committed",
    "group.id": "set [kafka] group_id instead",
    "bootstrap.servers": "set [kafka] bootstrap_servers instead",
    "on_commit": "streamer installs its own commit callback",
    "group.protocol": "set [kafka] group_protocol instead",
    "group.remote.assignor": "set [kafka] remote_assignor instead",
}

#: What the KIP-848 consumer protocol moved to the broker: librdkafka refuses these with it.
_CLASSIC_ONLY_CLIENT_KEYS = {
    "partition.assignment.strategy": "the broker assigns partitions; set [kafka] remote_assignor",
    "session.timeout.ms": "the session timeout is the broker's group.consumer.session.timeout.ms",
    "heartbeat.interval.ms": "the heartbeat interval is the broker's group.consumer.heartbeat.interval.ms",
    "group.protocol.type": "it belongs to the classic protocol",
}


def is_secret_key(key: str) -> bool:
    """Say whether a librdkafka configuration key holds a secret."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Where to consume from and as which group."""

    bootstrap_servers: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    #: The group protocol: "classic" (members assign, join/sync rounds) or "consumer" (KIP-848,
    #: Kafka 4.0+: the broker assigns, incrementally, and owns the session timeout).
    group_protocol: Literal["classic", "consumer"] = "classic"
    #: Classic protocol: cooperative-sticky moves only the partitions that must move.
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    #: Consumer protocol: the broker-side assignor; unset lets the broker choose (uniform).
    remote_assignor: Literal["uniform", "range"] | None = None
    auto_offset_reset: Literal["earliest", "latest", "error"] = "earliest"
    #: Records fetched per poll; the loop checks the commit policy after every record regardless.
    poll_batch_size: int = Field(default=500, ge=1, le=100_000)
    #: Longest a poll waits for records, in seconds; also bounds how fast a signal is noticed.
    poll_timeout: float = Field(default=0.5, gt=0, le=30)
    #: Extra librdkafka settings (security.protocol, sasl.*, ssl.*, session.timeout.ms, ...).
    client: dict[str, ClientValue] = Field(default_factory=dict)

    @field_validator("assignment_strategy", mode="after")
    @classmethod
    def _check_strategy(cls, strategy: str, info: ValidationInfo) -> str:
        # Runs only when the key is set: the default is simply not passed on with "consumer".
        if info.data.get("group_protocol") == "consumer":
            raise ValueError(
                'does not apply with group_protocol = "consumer": the broker assigns partitions '
                '(set remote_assignor = "uniform" or "range", or leave both unset)'
            )
        return strategy

    @field_validator("remote_assignor", mode="after")
    @classmethod
    def _check_assignor(cls, assignor: str | None, info: ValidationInfo) -> str | None:
        if assignor is not None and info.data.get("group_protocol") != "consumer":
            raise ValueError(
                'applies only with group_protocol = "consumer" '
                "(the classic protocol uses assignment_strategy)"
            )
        return assignor

    @field_validator("client", mode="after")
    @classmethod
    def _check_client(cls, client: dict[str, ClientValue], info: ValidationInfo) -> dict[str, ClientValue]:
        for key in client:
            if key in _RESERVED_CLIENT_KEYS:
                raise ValueError(f"{key!r} cannot be set here: {_RESERVED_CLIENT_KEYS[key]}")
            if key in _CLASSIC_ONLY_CLIENT_KEYS and info.data.get("group_protocol") == "consumer":
                raise ValueError(
                    f'{key!r} does not apply with group_protocol = "consumer": '
                    f"{_CLASSIC_ONLY_CLIENT_KEYS[key]}"
                )
        return {
            key: SecretStr(str(value)) if is_secret_key(key) and not isinstance(value, SecretStr) else value
            for key, value in client.items()
        }

    def librdkafka_client(self) -> dict[str, str | int | float | bool]:
        """The ``[kafka.client]`` pass-through with secrets revealed, for librdkafka only."""
        return {
            key: value.get_secret_value() if isinstance(value, SecretStr) else value
            for key, value in self.client.items()
        }


class CommitSettings(_Section):
    """When offsets are committed: every N records, every T seconds, whichever comes first."""

    #: Commit after this many records finished since the last commit; 0 turns the count off.
    every_records: int = Field(default=10_000, ge=0)
    #: Commit when this many seconds passed since the last commit; 0 turns the timer off.
    every_seconds: float = Field(default=5.0, ge=0)
    #: "interval" uses the two settings above; "adaptive" picks every_seconds by Young's rule.
    policy: Literal["interval", "adaptive"] = "interval"
    #: Adaptive: bounds of the chosen interval, in seconds.
    adaptive_min_seconds: float = Field(default=1.0, gt=0)
    adaptive_max_seconds: float = Field(default=60.0, gt=0)
    #: Adaptive: mean time between failures assumed until restarts are observed, in seconds.
    mtbf_seconds: float = Field(default=86_400.0, gt=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> CommitSettings:
        if self.adaptive_min_seconds > self.adaptive_max_seconds:
            raise ValueError(
                "adaptive_min_seconds must not exceed adaptive_max_seconds "
                f"(got {self.adaptive_min_seconds} > {self.adaptive_max_seconds})"
            )
        if not math.isfinite(self.every_seconds):
            raise ValueError("every_seconds must be a finite number of seconds")
        return self


class ShutdownSettings(_Section):
    """How a SIGTERM or SIGINT stops a worker."""

    #: Seconds to let in-flight records finish before abandoning them (exit code 3).
    drain_timeout: float = Field(default=20.0, gt=0)


Ordering = Literal["partition", "key", "none"]


class ProcessingSettings(_Section):
    """How many records run at once, and which of them must not overlap."""

    #: Records in flight per worker. 1 is the serial fast path; more run ``async def`` handlers
    #: as tasks on the worker's event loop and ``def`` handlers on a thread pool of this size.
    concurrency: int = Field(default=1, ge=1, le=100_000)
    #: "partition": one record at a time per partition, partitions in parallel; "key": records
    #: with the same Kafka key never overlap and run in offset order (keyless ones are ordered by
    #: partition); "none": any order.
    ordering: Ordering = "partition"
    #: Characters of commit metadata the map of offsets finished out of order may use (the
    #: broker's offset.metadata.max.bytes is 4096 by default). A partition whose map would not
    #: fit takes no more records until it shrinks.
    offset_map_chars: int = Field(default=3000, ge=64, le=1_000_000)
    #: "at_least_once": outputs go through an idempotent producer and an input's offset is
    #: committed only after all its outputs were acknowledged. "exactly_once": outputs,
    #: dead-letter writes and the input offsets commit in one Kafka transaction per checkpoint
    #: (a read_committed reader sees each output once); needs concurrency 1.
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    #: Outputs the producer may hold unacknowledged; a handler emitting more waits (backpressure).
    output_buffer: int = Field(default=100_000, ge=1, le=10_000_000)
    #: Seconds an output may take to be acknowledged before its input counts as failed (parked).
    output_timeout_seconds: float = Field(default=120.0, gt=0)
    #: Exactly-once: the broker aborts a transaction open longer than this (a killed worker's
    #: open transaction holds back read_committed readers of its outputs until then). It must
    #: outlast [commit] every_seconds plus a commit.
    transaction_timeout_seconds: float = Field(default=10.0, gt=0, le=900)


class DedupSettings(_Section):
    """Idempotency: skip records whose key is already done (Redis)."""

    enabled: bool = False
    #: ``redis://[user:password@]host:port/db`` or ``rediss://`` for TLS; never logged.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    #: Header holding the idempotency key; records without it use the app's key function,
    #: else ``topic/partition/offset``. Empty: do not read a header.
    key_header: str = "message-id"
    #: How long a done key is remembered; must outlast the longest replay (see strict_window).
    window_seconds: float = Field(default=7 * 86_400.0, gt=0)
    #: How long a partition's lease keeps a second worker off its records; renewed while a
    #: chain runs, released on a clean hand-over. A worker replacing a killed one (without static
    #: membership) waits at most this long for the partitions the killed one held.
    lease_seconds: float = Field(default=15.0, gt=0)
    #: "pipelined": each finished record's mark is sent without waiting for the reply, every
    #: ``mark_every`` records; the replies are awaited before the offsets are committed (a
    #: SIGKILL repeats at most ``mark_every`` records). "per_record": wait for each mark before
    #: the next record (one record even when the host or the network fails, one round trip per
    #: record). "batch": one call per poll batch (a crash repeats up to the batch in progress).
    mark_mode: Literal["pipelined", "batch", "per_record"] = "pipelined"
    #: Finished records per pipelined send (mark_mode = "pipelined").
    mark_every: int = Field(default=8, ge=1, le=10_000)
    #: Records the group marks per window (an estimate): sizes the shards of the id-keyed marks
    #: so that Redis keeps them in its compact encoding. Fixed per namespace by its first worker.
    expected_keys: int = Field(default=1_000_000, ge=1)
    #: Your idempotency key always maps to one partition (it is the Kafka key, or decides it):
    #: records need no claim of their own, their partition's lease keeps a second worker off
    #: (one Redis write per poll batch instead of one per record). Records keyed by position
    #: always work this way.
    partition_local_ids: bool = False
    #: Also read done marks of the previous format (streamer 0.4 and before) — for one window
    #: after an upgrade; costs one more Redis read per record.
    legacy_marks: bool = False
    #: What to do when Redis could silently lose marks (an eviction policy that evicts them):
    #: "refuse" to start or "warn". No persistence is always a warning.
    redis_checks: Literal["refuse", "warn"] = "refuse"
    #: "block": fail closed while Redis is unreachable; "proceed": process without dedup (counted).
    on_unavailable: Literal["block", "proceed"] = "block"
    #: Prefix of every Redis key streamer writes.
    namespace: str = Field(default="streamer", min_length=1)
    #: Refuse to start (instead of warning) when the window is shorter than a topic's retention.
    strict_window: bool = False
    #: Seconds before a Redis call counts as failed.
    timeout: float = Field(default=2.0, gt=0)
    #: Redis Cluster: redis_url names any node; keys are hash-tagged by group.
    cluster: bool = False
    #: Sentinel: "host:port" of each sentinel, and the name of the monitored master.
    sentinels: list[str] = Field(default_factory=list)
    sentinel_master: str = ""

    @field_validator("sentinels")
    @classmethod
    def _check_sentinels(cls, sentinels: list[str]) -> list[str]:
        for entry in sentinels:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected 'host:port' for each sentinel, got {entry!r}")
        return sentinels

    @model_validator(mode="after")
    def _check_lease(self) -> DedupSettings:
        if self.sentinels and not self.sentinel_master:
            raise ValueError("sentinels need sentinel_master: the name of the master they monitor")
        if self.sentinels and self.cluster:
            raise ValueError("choose sentinels or cluster, not both")
        if self.lease_seconds >= self.window_seconds:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be shorter than window_seconds "
                f"({self.window_seconds})"
            )
        return self


class RetrySettings(_Section):
    """Retries of failed records (the retry middleware); per topic in [topics.NAME]."""

    #: Attempts in all, the first included; 1 turns retries off.
    max_attempts: int = Field(default=3, ge=1)
    initial_backoff: float = Field(default=0.2, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)
    #: Exception types worth retrying, as import paths; RetryableError always is.
    retry_on: tuple[str, ...] = ("builtins.TimeoutError", "builtins.ConnectionError")


class DeadLetterSettings(_Section):
    """Where records that cannot be processed are parked."""

    #: Off: a record that fails for good stops the worker (exit 1) before its offset is committed.
    enabled: bool = True
    #: The dead-letter topic of topic T is T + suffix, unless [topics.T] dead_letter_topic says.
    suffix: str = Field(default=".dlq", min_length=1)
    #: Seconds to wait for the broker to acknowledge a dead-letter write before retrying it.
    timeout: float = Field(default=10.0, gt=0)
    #: Create missing dead-letter topics at start-up (as many partitions as their source topic).
    create_topics: bool = True


class ChainStep(_Section):
    """One step of a chain assembled from plugins: an entry-point name or import path, and options."""

    use: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"use": value} if isinstance(value, str) else value


class TopicSettings(_Section):
    """Overrides for one topic."""

    #: Assemble this topic's chain from plugins: middlewares (outermost first), then the handler.
    chain: list[ChainStep] = Field(default_factory=list)

    #: "json", "raw", or "module:function"; unset: no decode step.
    decoder: str | None = None
    dead_letter_topic: str | None = None
    #: Per-attempt timeout in seconds (0: none).
    timeout_seconds: float = Field(default=0.0, ge=0)
    retry: RetrySettings | None = None
    #: This topic's records in flight at most (within [processing] concurrency); unset: that.
    concurrency: int | None = Field(default=None, ge=1, le=100_000)
    #: This topic's ordering; unset: [processing] ordering.
    ordering: Ordering | None = None


class MetricsSettings(_Section):
    """The HTTP endpoint with /metrics, /healthz and /readyz."""

    enabled: bool = True
    #: 127.0.0.1 keeps the endpoint private; use 0.0.0.0 in a container so Prometheus can scrape.
    host: str = "127.0.0.1"
    #: 0 picks a free port (logged). If the port is busy the worker runs on without the endpoint.
    port: int = Field(default=9400, ge=0, le=65535)
    #: Count re-read records with per-partition high-water marks in the dedup Redis:
    #: "auto" does when dedup is enabled.
    track_reprocessed: Literal["auto", "on", "off"] = "auto"
    #: How often high watermarks of paused partitions are asked of the broker (librdkafka's
    #: statistics freeze them while a partition is paused).
    watermark_refresh_seconds: float = Field(default=5.0, gt=0)
    #: Serve the status page at / and /status.json (partitions, offsets, lag, recent errors and
    #: dead-lettered records; never payloads or secrets).
    status_page: bool = True


class TracingSettings(_Section):
    """OpenTelemetry tracing: a consumer span per record (``pip install 'streamer[otel]'``)."""

    #: "auto": on when opentelemetry is installed and the app set a TracerProvider before the
    #: worker starts; true: on (refuses to start without the otel extra); false: off.
    enabled: Literal["auto"] | bool = "auto"


class Settings(BaseSettings):
    """Every setting of a streamer worker, frozen once built."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="STREAMER_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    kafka: KafkaSettings
    commit: CommitSettings = Field(default_factory=CommitSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    topics: dict[str, TopicSettings] = Field(default_factory=dict)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    def topic(self, name: str) -> TopicSettings:
        """The overrides of topic ``name`` (defaults when it has none)."""
        return self.topics.get(name) or TopicSettings()

    def dead_letter_topic(self, name: str) -> str:
        """Where records of topic ``name`` are parked."""
        return self.topic(name).dead_letter_topic or name + self.dead_letter.suffix

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file: that is how a deployment overrides one key.
        return (env_settings, init_settings)

    def secret_values(self) -> list[str]:
        """The literal secrets in these settings, for the log redactor."""
        values = [v.get_secret_value() for v in self.kafka.client.values() if isinstance(v, SecretStr)]
        url = urlsplit(self.dedup.redis_url.get_secret_value())
        if url.password:
            values.append(url.password)
        return values

    def redacted(self) -> dict[str, Any]:
        """A plain dict of every setting, safe to log: secrets are replaced by '**********'."""
        redacted: dict[str, Any] = _redact(self.model_dump())
        return redacted


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    return value


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from a TOML file (optional), the environment and ``overrides``.

    ``overrides`` are nested dicts by section, e.g. ``kafka={"group_id": "g"}``; they sit at the
    file's level of precedence. Raises ConfigError naming each bad key and its expected form.
    """
    mixed = "STREAMER_KAFKA__CLIENT" in os.environ and any(
        k.startswith("STREAMER_KAFKA__CLIENT__") for k in os.environ
    )
    if mixed:
        # pydantic-settings would merge them in environment order: which keys survive would be luck.
        raise ConfigError(
            "kafka.client: set STREAMER_KAFKA__CLIENT (a JSON object) or STREAMER_KAFKA__CLIENT__<key> "
            "variables, not both"
        )
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source=str(path) if path else None)) from None
    except SettingsError as exc:
        # A complex value (a section, [kafka.client]) in the environment that is not valid JSON.
        # Name the variable, never echo its value: it may hold a password.
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        raise ConfigError(
            f"environment variable STREAMER_{field.upper()}(__...) holds a value that is not valid JSON "
            f"({type(exc.__cause__).__name__ if exc.__cause__ else 'parse error'})"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError, source: str | None) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            lines.append(f"{key}: unknown setting")
        elif kind == "missing":
            required = _REQUIRED_IN_SECTION.get(key, (key,))
            lines.extend(
                f"{name}: required, but not set (in the file or {_env_name(name)})" for name in required
            )
        else:
            shown = (
                ""
                if is_secret_key(key) or key.endswith("redis_url")
                else f" (got {_redact_input(error.get('input'))!r})"
            )
            lines.append(f"{key}: {error['msg']}{shown}")
    where = f" in {source}" if source else ""
    return f"invalid settings{where}:\n  " + "\n  ".join(lines)


_REQUIRED_IN_SECTION = {"kafka": ("kafka.bootstrap_servers", "kafka.group_id")}


def _redact_input(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "**********" if is_secret_key(str(k)) else _redact_input(v) for k, v in value.items()}
    return value


def _env_name(key: str) -> str:
    return "STREAMER_" + "__".join(part.upper() for part in key.split("."))
