"""[kafka] group_protocol: the classic protocol and KIP-848's consumer protocol, each configured as
librdkafka accepts it, and the settings that do not apply with one named at start-up."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Consumer

from streamer.errors import ConfigError
from streamer.settings import load_settings
from streamer.source import admin_config, consumer_config

pytestmark = pytest.mark.usefixtures("clean_environment")

#: Nothing listens on port 1: building a consumer validates its configuration without a broker.
KAFKA = {"bootstrap_servers": "127.0.0.1:1", "group_id": "orders"}


def config_for(**kafka: Any) -> dict[str, Any]:
    return consumer_config(load_settings(kafka={**KAFKA, **kafka}).kafka)


def config_error(**kafka: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka={**KAFKA, **kafka})
    return str(info.value)


def test_the_classic_protocol_is_the_default_with_a_cooperative_assignment_and_a_short_session() -> None:
    config = config_for()
    assert config["group.protocol"] == "classic"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["session.timeout.ms"] == 8_000


def test_the_consumer_protocol_sets_none_of_the_settings_librdkafka_refuses_with_it() -> None:
    config = config_for(group_protocol="consumer")
    assert config["group.protocol"] == "consumer"
    for key in ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"):
        assert key not in config
    assert "group.remote.assignor" not in config  # the broker chooses


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_librdkafka_accepts_the_configuration_of_each_protocol(protocol: str) -> None:
    config = {k: v for k, v in config_for(group_protocol=protocol).items() if k != "logger"}
    Consumer(config).close()


def test_a_remote_assignor_is_passed_on_with_the_consumer_protocol() -> None:
    assert config_for(group_protocol="consumer", remote_assignor="range")["group.remote.assignor"] == "range"


def test_an_assignment_strategy_with_the_consumer_protocol_is_refused_naming_the_way_out() -> None:
    message = config_error(group_protocol="consumer", assignment_strategy="range")
    assert "kafka.assignment_strategy" in message
    assert 'does not apply with group_protocol = "consumer"' in message
    assert "remote_assignor" in message


def test_a_remote_assignor_with_the_classic_protocol_is_refused() -> None:
    message = config_error(remote_assignor="uniform")
    assert "kafka.remote_assignor" in message
    assert 'applies only with group_protocol = "consumer"' in message


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("session.timeout.ms", "group.consumer.session.timeout.ms"),
        ("heartbeat.interval.ms", "group.consumer.heartbeat.interval.ms"),
        ("partition.assignment.strategy", "remote_assignor"),
        ("group.protocol.type", "classic protocol"),
    ],
)
def test_classic_client_keys_with_the_consumer_protocol_are_refused_saying_what_replaces_them(
    key: str, where: str
) -> None:
    message = config_error(group_protocol="consumer", client={key: "1"})
    assert "kafka.client" in message
    assert f"'{key}' does not apply with group_protocol = \"consumer\"" in message
    assert where in message


def test_classic_client_keys_still_override_the_defaults_with_the_classic_protocol() -> None:
    config = config_for(client={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    assert config["session.timeout.ms"] == 6000
    assert config["heartbeat.interval.ms"] == 500


@pytest.mark.parametrize("key", ["group.protocol", "group.remote.assignor"])
def test_the_protocol_keys_point_to_their_kafka_settings(key: str) -> None:
    assert "cannot be set here: set [kafka]" in config_error(client={key: "consumer"})


def test_an_unknown_protocol_names_the_key_and_the_choices() -> None:
    message = config_error(group_protocol="next")
    assert "kafka.group_protocol" in message
    assert "'classic' or 'consumer'" in message


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_admin_clients_get_no_group_protocol_settings(protocol: str) -> None:
    config = admin_config(load_settings(kafka={**KAFKA, "group_protocol": protocol}).kafka)
    assert not [k for k in config if k.startswith(("group.", "partition.", "session."))]
