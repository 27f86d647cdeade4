"""Before the first poll: wait for the cluster, check the subscribed topics exist, create missing
dead-letter topics, and check that the dedup window covers the topics' retention."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import structlog
from confluent_kafka import KafkaException

from streamer.errors import ConfigError
from streamer.settings import Settings
from streamer.source import Source, TopicInfo

log = structlog.get_logger("streamer.preflight")


def preflight(
    source: Source,
    settings: Settings,
    topics_wanted: list[str],
    stop: threading.Event,
    *,
    dedup: bool,
    dead_letter: bool,
) -> None:
    """Wait for the cluster, check the topics exist and the dedup window covers their retention."""
    log.info("connecting", bootstrap_servers=settings.kafka.bootstrap_servers)
    delay = 0.5
    while True:
        try:
            # A short first timeout, so that an unreachable cluster is reported at once.
            topics = source.describe_topics(topics_wanted, timeout=min(2.0 + delay, 10.0))
            break
        except KafkaException as exc:
            log.warning(
                "kafka unreachable; retrying",
                error=str(exc),
                retry_in=delay,
                bootstrap_servers=settings.kafka.bootstrap_servers,
            )
            if stop.wait(delay):
                return
            delay = min(delay * 2, 30.0)
    missing = sorted(t for t, info in topics.items() if info is None)
    if missing:
        raise ConfigError(
            f"subscribed topic(s) {missing} do not exist on {settings.kafka.bootstrap_servers}: "
            "create them, or fix the topic given to @app.handler"
        )
    if dedup:
        _check_dedup_window(settings, topics)
    if dead_letter:
        _ensure_dead_letter_topics(source, settings, topics)


def _ensure_dead_letter_topics(
    source: Source, settings: Settings, topics: Mapping[str, TopicInfo | None]
) -> None:
    """Create missing dead-letter topics (as many partitions as their source) before consuming."""
    wanted = {settings.dead_letter_topic(t): info.partitions for t, info in topics.items() if info}
    existing = source.describe_topics(list(wanted))
    missing = {t: n for t, n in wanted.items() if existing.get(t) is None}
    if not missing:
        return
    if not settings.dead_letter.create_topics:
        raise ConfigError(
            f"dead-letter topic(s) {sorted(missing)} do not exist: create them, "
            "set dead_letter.create_topics = true, or dead_letter.enabled = false"
        )
    try:
        source.create_topics(missing)
    except KafkaException as exc:
        raise ConfigError(f"cannot create dead-letter topic(s) {sorted(missing)}: {exc}") from None
    log.info("created dead-letter topics", topics=sorted(missing))


def _check_dedup_window(settings: Settings, topics: Mapping[str, TopicInfo | None]) -> None:
    """A done key must outlive every record that could be replayed: warn (or refuse) if not."""
    cfg = settings.dedup
    window_ms = cfg.window_seconds * 1000
    for topic, info in sorted(topics.items()):
        if info is None or (0 <= info.retention_ms <= window_ms):
            continue
        retention = "forever" if info.retention_ms < 0 else f"{info.retention_ms / 1000:.0f} s"
        problem = (
            f"dedup.window_seconds ({cfg.window_seconds:.0f} s) is shorter than the retention of "
            f"topic {topic!r} ({retention}): replaying records older than the window would re-run "
            "their side effects"
        )
        if cfg.strict_window:
            raise ConfigError(problem + "; raise window_seconds or set dedup.strict_window = false")
        log.warning(problem)
