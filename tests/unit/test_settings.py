"""load_settings: TOML file + environment, validation errors that name the key, secrets kept secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from streamer.errors import ConfigError
from streamer.settings import Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_environment")

KAFKA = {"bootstrap_servers": "broker:9092", "group_id": "orders"}
SECRETS = {"sasl.password": "hunter2-sasl", "ssl.key.password": "hunter2-key"}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamer.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**sections: Any) -> str:
    """The message of the ConfigError that loading ``sections`` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(**sections)
    return str(info.value)


def assert_no_secret_in(text: str) -> None:
    for secret in SECRETS.values():
        assert secret not in text


# --- required, typed, known keys ------------------------------------------------------------------


def test_missing_kafka_section_names_both_required_keys() -> None:
    message = config_error()
    assert "kafka.bootstrap_servers" in message
    assert "kafka.group_id" in message
    assert "STREAMER_KAFKA__GROUP_ID" in message  # says where it could have been set


def test_missing_group_id_names_only_that_key() -> None:
    message = config_error(kafka={"bootstrap_servers": "broker:9092"})
    assert "kafka.group_id" in message
    assert "kafka.bootstrap_servers" not in message


def test_defaults_fill_everything_but_the_required_keys() -> None:
    settings = load_settings(kafka=KAFKA)
    assert settings.kafka.group_id == "orders"
    assert settings.kafka.assignment_strategy == "cooperative-sticky"
    assert settings.commit.every_records == 10_000
    assert settings.commit.every_seconds == 5.0
    assert settings.commit.policy == "interval"
    assert settings.shutdown.drain_timeout == 20.0


def test_wrong_type_names_the_key_and_the_bad_value() -> None:
    message = config_error(kafka=KAFKA, commit={"every_records": "abc"})
    assert "commit.every_records" in message
    assert "'abc'" in message


def test_value_out_of_range_names_the_key() -> None:
    message = config_error(kafka={**KAFKA, "poll_batch_size": 0})
    assert "kafka.poll_batch_size" in message


def test_adaptive_min_above_max_is_rejected() -> None:
    message = config_error(kafka=KAFKA, commit={"adaptive_min_seconds": 10, "adaptive_max_seconds": 5})
    assert "adaptive_min_seconds must not exceed adaptive_max_seconds" in message


def test_unknown_key_is_named_as_unknown() -> None:
    message = config_error(kafka={**KAFKA, "group": "typo"})
    assert "kafka.group: unknown setting" in message


def test_unknown_section_is_named_as_unknown() -> None:
    assert "comit: unknown setting" in config_error(kafka=KAFKA, comit={"every_records": 1})


# --- the file -------------------------------------------------------------------------------------


def test_toml_file_is_loaded(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [kafka]
        bootstrap_servers = "broker:9092"
        group_id = "orders"
        poll_timeout = 0.25

        [commit]
        every_records = 50
        every_seconds = 0
        """,
    )
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers == "broker:9092"
    assert settings.kafka.poll_timeout == 0.25
    assert settings.commit.every_records == 50
    assert settings.commit.every_seconds == 0


def test_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[kafka]\nbootstrap_servers = "b:9092"\n')
    with pytest.raises(ConfigError, match=r"kafka\.group_id") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_invalid_toml_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[kafka\nbootstrap_servers = ")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_overrides_merge_into_the_file_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[kafka]\nbootstrap_servers = "b:9092"\ngroup_id = "from-file"\n')
    settings = load_settings(path, kafka={"group_id": "from-override"})
    assert settings.kafka.bootstrap_servers == "b:9092"
    assert settings.kafka.group_id == "from-override"


# --- the environment ------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(
        tmp_path,
        """
        [kafka]
        bootstrap_servers = "broker:9092"
        group_id = "from-file"

        [commit]
        every_records = 50
        every_seconds = 2.0
        """,
    )
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("STREAMER_COMMIT__EVERY_RECORDS", "7")
    settings = load_settings(path)
    assert settings.kafka.group_id == "from-env"
    assert settings.commit.every_records == 7
    assert settings.kafka.bootstrap_servers == "broker:9092"  # the rest of the file still counts
    assert settings.commit.every_seconds == 2.0


def test_environment_alone_can_supply_the_required_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "env-broker:9092")
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "env-group")
    settings = load_settings()
    assert (settings.kafka.bootstrap_servers, settings.kafka.group_id) == ("env-broker:9092", "env-group")


def test_bad_environment_value_names_the_key_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_COMMIT__EVERY_RECORDS", "abc")
    message = config_error(kafka=KAFKA)
    assert "commit.every_records" in message
    assert "'abc'" in message


def test_unrelated_streamer_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_LOG_LEVEL", "DEBUG")  # read by streamer.logs
    monkeypatch.setenv("STREAMER_DEV_KAFKA_PORT", "9092")  # read by dev/services and tests
    assert load_settings(kafka=KAFKA).kafka.group_id == "orders"


def test_client_settings_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT", '{"session.timeout.ms": 10000}')
    assert load_settings(kafka=KAFKA).kafka.librdkafka_client() == {"session.timeout.ms": 10000}


def test_invalid_json_in_client_environment_variable_raises_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bad value must surface as ConfigError (exit code 2 from `streamer run`), not as
    # pydantic_settings.SettingsError with a traceback.
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT", "{not json")
    with pytest.raises(ConfigError, match="STREAMER_KAFKA"):
        load_settings(kafka=KAFKA)


# --- [kafka.client] pass-through ------------------------------------------------------------------


def test_kafka_client_table_is_passed_through(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [kafka]
        bootstrap_servers = "broker:9092"
        group_id = "orders"

        [kafka.client]
        "security.protocol" = "SASL_SSL"
        "session.timeout.ms" = 45000
        "enable.partition.eof" = false
        """,
    )
    assert load_settings(path).kafka.librdkafka_client() == {
        "security.protocol": "SASL_SSL",
        "session.timeout.ms": 45000,
        "enable.partition.eof": False,
    }


@pytest.mark.parametrize("key", ["enable.auto.commit", "enable.auto.offset.store"])
def test_reserved_client_key_is_rejected(key: str) -> None:
    message = config_error(kafka={**KAFKA, "client": {key: True}})
    assert "kafka.client" in message
    assert f"'{key}' cannot be set here" in message


@pytest.mark.parametrize("key", ["group.id", "bootstrap.servers"])
def test_client_keys_with_a_kafka_setting_point_to_it(key: str) -> None:
    assert "set [kafka]" in config_error(kafka={**KAFKA, "client": {key: "x"}})


# --- secrets --------------------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_str_or_redacted() -> None:
    settings = load_settings(kafka={**KAFKA, "client": {**SECRETS, "sasl.username": "alice"}})
    redacted = settings.redacted()
    for shown in (repr(settings), str(settings), repr(settings.kafka), repr(redacted), str(redacted)):
        assert_no_secret_in(shown)
    assert redacted["kafka"]["client"] == {
        "sasl.password": "**********",
        "ssl.key.password": "**********",
        "sasl.username": "alice",
    }


def test_secrets_from_a_file_never_appear_in_repr(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [kafka]
        bootstrap_servers = "broker:9092"
        group_id = "orders"

        [kafka.client]
        "sasl.password" = "hunter2-sasl"
        "ssl.key.password" = "hunter2-key"
        """,
    )
    settings = load_settings(path)
    assert_no_secret_in(repr(settings))
    assert settings.kafka.librdkafka_client() == SECRETS


def test_librdkafka_client_reveals_secrets() -> None:
    settings = load_settings(kafka={**KAFKA, "client": SECRETS})
    assert settings.kafka.librdkafka_client() == SECRETS


def test_non_string_secret_is_kept_secret_and_revealed_as_a_string() -> None:
    settings = load_settings(kafka={**KAFKA, "client": {"sasl.password": 123456789}})
    assert "123456789" not in repr(settings)
    assert settings.kafka.librdkafka_client() == {"sasl.password": "123456789"}


@pytest.mark.parametrize(
    "kafka",
    [
        pytest.param({**KAFKA, "poll_timeout": "soon"}, id="bad-value-beside"),
        pytest.param({**KAFKA, "colour": "blue"}, id="unknown-key-beside"),
        pytest.param({"bootstrap_servers": "broker:9092"}, id="missing-key-beside"),
        pytest.param({**KAFKA, "extra_client": {"enable.auto.commit": False}}, id="unknown-table-beside"),
    ],
)
def test_secrets_never_appear_in_errors_about_other_keys_of_their_section(kafka: dict[str, Any]) -> None:
    message = config_error(kafka={**kafka, "client": SECRETS})
    assert message.startswith("invalid settings")
    assert_no_secret_in(message)


def test_secrets_never_appear_in_errors_about_their_own_client_table() -> None:
    message = config_error(kafka={**KAFKA, "client": {**SECRETS, "enable.auto.commit": False}})
    assert "enable.auto.commit" in message
    assert_no_secret_in(message)


def test_secret_with_a_bad_value_type_is_not_shown() -> None:
    message = config_error(kafka={**KAFKA, "client": {"sasl.password": ["hunter2-sasl"]}})
    assert "kafka.client.sasl.password" in message
    assert_no_secret_in(message)


def test_secrets_never_appear_in_errors_when_set_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT", '{"sasl.password": "hunter2-sasl", "on_commit": "x"}')
    message = config_error(kafka=KAFKA)
    assert "on_commit" in message
    assert_no_secret_in(message)


# --- frozen ---------------------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = load_settings(kafka=KAFKA)
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka = settings.kafka  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka.group_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.commit.every_records = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


def test_json_and_per_key_client_variables_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT", '{"session.timeout.ms": 6000}')
    monkeypatch.setenv("STREAMER_KAFKA__CLIENT__sasl.password", "hunter2hunter2")
    with pytest.raises(ConfigError, match="not both") as info:
        load_settings(kafka={"bootstrap_servers": "b:9092", "group_id": "g"})
    assert "hunter2" not in str(info.value)
