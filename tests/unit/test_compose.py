"""docker-compose.yml, the Dockerfile and deploy/compose, checked offline (no Docker engine needed).

The compose file is validated against the Compose Specification's JSON schema (vendored in
tests/schemas), then for what the schema cannot see: files it mounts exist, the services agree on
host names, ports, listeners and topics, and the worker's environment is valid streamer settings.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from streamer.app import App
from streamer.cli import load_app
from streamer.settings import MetricsSettings
from tests.unit.deploy_helpers import (
    REPO,
    dockerfile_instructions,
    dockerfile_json_array,
    dockerfile_user,
    load_settings_with_env,
    load_yaml,
    order_dependent_variables,
    setting_name_problem,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SCHEMAS = REPO / "tests" / "schemas"


@cache
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: str) -> dict[str, str]:
    """A service's environment as strings, whichever syntax (mapping or KEY=VALUE list) it uses."""
    env = services()[service].get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {
        name: "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in env.items()
    }


def dockerfile_env() -> dict[str, str]:
    """The ENV of the image (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for word, args in dockerfile_instructions(DOCKERFILE):
        if word == "ENV":
            for item in shlex.split(args):
                name, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[name] = value
    return env


def container_env(service: str) -> dict[str, str]:
    """What the service's process sees: the image's ENV (for images built here), then compose's."""
    env = dockerfile_env() if "build" in services()[service] else {}
    return {**env, **environment(service)}


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts (short and long syntax)."""
    mounts = []
    for volume in services()[service].get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/")):
                continue  # a named volume
        elif volume.get("type") == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        mounts.append(((REPO / source).resolve(), target))
    return mounts


def host_path(service: str, container_path: str) -> Path:
    """The file in the repository that ``container_path`` is inside ``service``."""
    wanted = PurePosixPath(container_path)
    for source, target in bind_mounts(service):
        if wanted == PurePosixPath(target) or PurePosixPath(target) in wanted.parents:
            return source / wanted.relative_to(target)
    raise AssertionError(f"{container_path} is not inside any bind mount of service {service!r}")


def duration_seconds(text: str) -> float:
    """A compose duration such as 30s, 1m30s or 500ms."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a compose duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def advertised_listeners() -> dict[str, tuple[str, int]]:
    """The kafka service's advertised listeners: name -> (host, port)."""
    env = environment("kafka")
    listeners = {}
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        listeners[name] = (host, int(port))
    return listeners


def command_option(args: list[str], option: str) -> str:
    assert option in args, f"{option} missing from {args}"
    return args[args.index(option) + 1]


# --- the Compose Specification -----------------------------------------------------------------


def test_vendored_schema_is_the_one_documented() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    digest = hashlib.sha256((SCHEMAS / "compose-spec.json").read_bytes()).hexdigest()
    assert f"`{digest}`" in readme, "tests/schemas/compose-spec.json changed: update tests/schemas/README.md"


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )


def test_compose_file_uses_the_compose_specification_not_a_legacy_version() -> None:
    assert "version" not in compose(), "the Compose Specification has no `version:` key"
    assert compose().get("name") == "streamer"


def test_expected_services_are_defined() -> None:
    assert {"kafka", "topic-init", "redis", "worker", "producer", "prometheus", "grafana"} <= set(services())
    # The broker the suite runs on (dev/services resolves it from dev/kafka/pom.xml).
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", (REPO / "dev/kafka/pom.xml").read_text())
    assert version is not None
    assert services()["kafka"]["image"] == f"apache/kafka:{version.group(1)}"
    assert services()["topic-init"]["image"] == services()["kafka"]["image"]
    assert services()["redis"]["image"].startswith("redis:7")
    assert services()["prometheus"]["image"].startswith("prom/prometheus:")
    assert services()["grafana"]["image"].startswith("grafana/grafana:")


# --- what the services refer to exists ------------------------------------------------------------


def test_build_contexts_and_dockerfiles_exist() -> None:
    built = {name: svc["build"] for name, svc in services().items() if "build" in svc}
    assert {"worker", "producer"} <= set(built)
    for name, build in built.items():
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (
            build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        )
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    # Services built from the same context share one image name, so it is built once.
    assert {services()[n]["image"] for n in built} == {"streamer:local"}


def test_bind_mounted_files_exist_in_the_repository() -> None:
    checked = 0
    for name in services():
        for source, _target in bind_mounts(name):
            assert source.is_relative_to(REPO), f"{name} mounts {source}, outside the repository"
            assert source.exists(), f"{name} mounts {source.relative_to(REPO)}, which does not exist"
            checked += 1
    assert checked >= 5


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in declared, f"{name}: volume {volume!r} is not declared"


def test_depends_on_names_existing_services_with_conditions_they_can_meet() -> None:
    for name, svc in services().items():
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for other, spec in depends.items():
            assert other in services(), f"{name} depends on {other!r}, which is not a service"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "test" in services()[other].get("healthcheck", {}), (
                    f"{name} waits for {other} to be healthy, but {other} has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services()[other].get("restart", "no") == "no", f"{other} must be a one-shot"
    worker = services()["worker"]["depends_on"]
    assert worker["kafka"]["condition"] == "service_healthy"
    assert worker["redis"]["condition"] == "service_healthy"
    assert worker["topic-init"]["condition"] == "service_completed_successfully"


# --- Kafka: listeners, bootstrap, topic ---------------------------------------------------------


def test_kafka_is_a_single_kraft_node_set_up_for_a_demo() -> None:
    env = environment("kafka")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters.startswith(f"{node_id}@"), voters
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "test" in services()["kafka"]["healthcheck"]


def test_kafka_listeners_are_declared_mapped_and_published() -> None:
    env = environment("kafka")
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    bound = {}
    for item in env["KAFKA_LISTENERS"].split(","):
        name, _, address = item.partition("://")
        bound[name] = int(address.rpartition(":")[2])
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in bound
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised_listeners()
    for name, (_host, port) in advertised_listeners().items():
        assert name in protocols, f"listener {name} has no security protocol"
        assert bound.get(name) == port, f"listener {name} advertises port {port} but binds {bound.get(name)}"
    published = {str(p).rsplit(":", 2)[-1] for p in services()["kafka"].get("ports", [])}
    host_listeners = [
        port for host, port in advertised_listeners().values() if host in ("localhost", "127.0.0.1")
    ]
    assert host_listeners, "no listener for clients on the host"
    for port in host_listeners:
        assert str(port) in published, f"the host listener's port {port} is not published"


def kafka_clients() -> dict[str, str]:
    """Every bootstrap address a container uses to reach Kafka, by who uses it."""
    clients = {
        name: environment(name)["STREAMER_KAFKA__BOOTSTRAP_SERVERS"] for name in ("worker", "producer")
    }
    init = services()["topic-init"]
    clients["topic-init"] = command_option([*init["entrypoint"], *init["command"]], "--bootstrap-server")
    health = services()["kafka"]["healthcheck"]["test"]
    clients["kafka healthcheck"] = command_option(shlex.split(" ".join(health[1:])), "--bootstrap-server")
    return clients


def test_kafka_clients_in_containers_bootstrap_from_an_advertised_listener() -> None:
    inside = {(host, port) for host, port in advertised_listeners().values() if host not in ("localhost",)}
    assert inside == {("kafka", 9092)}
    kafka = services()["kafka"]
    assert kafka.get("hostname", "kafka") == "kafka"
    for client, bootstrap in kafka_clients().items():
        for address in bootstrap.split(","):
            host, _, port = address.strip().rpartition(":")
            assert (host, int(port)) in inside, (
                f"{client} bootstraps from {address}, which kafka does not advertise inside the network "
                f"(advertised: {sorted(advertised_listeners().values())})"
            )


def test_topic_init_creates_the_topic_the_worker_and_producer_use() -> None:
    init = services()["topic-init"]
    assert init["entrypoint"] == ["/opt/kafka/bin/kafka-topics.sh"]
    args = [str(a) for a in init["command"]]
    assert "--create" in args
    assert "--if-not-exists" in args, "topic-init must succeed on the second `docker compose up`"
    topic = command_option(args, "--topic")
    assert command_option(args, "--partitions") == "3"
    assert command_option(args, "--replication-factor") == "1"
    assert environment("worker")["STREAMER_DEMO_TOPIC"] == topic
    assert environment("producer")["STREAMER_DEMO_TOPIC"] == topic


# --- the worker -------------------------------------------------------------------------------


def test_worker_environment_is_valid_streamer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = container_env("worker")
    problems = [p for p in map(setting_name_problem, env) if p]
    assert not problems, "\n".join(problems)
    assert not order_dependent_variables(env)
    settings = load_settings_with_env(monkeypatch, env)  # raises ConfigError if a value is bad
    assert settings.kafka.group_id == environment("worker")["STREAMER_KAFKA__GROUP_ID"]
    assert settings.kafka.assignment_strategy == "cooperative-sticky"
    assert settings.dedup.enabled
    redis = urlsplit(settings.dedup.redis_url.get_secret_value())
    assert (redis.hostname, redis.port or 6379) == ("redis", 6379)
    assert "redis" in services()
    assert settings.metrics.enabled
    assert settings.metrics.host == "0.0.0.0"  # noqa: S104 - reachable by Prometheus on the network
    assert environment("worker")["STREAMER_DEMO_LOG"].startswith("/tmp/")  # noqa: S108
    tmpfs = services()["worker"].get("tmpfs", [])
    assert "/tmp" in tmpfs, "the demo log needs a writable /tmp"  # noqa: S108


def test_worker_runs_the_demo_app_from_the_image() -> None:
    worker = services()["worker"]
    assert worker["command"] == ["run", "streamer.demo:app"]
    assert "entrypoint" not in worker  # the image's ENTRYPOINT ["streamer"]
    assert isinstance(load_app("streamer.demo:app"), App)


def test_prometheus_scrapes_the_worker_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings_with_env(monkeypatch, container_env("worker"))
    port = settings.metrics.port
    assert str(port) in [str(p) for p in services()["worker"].get("expose", [])]

    config = load_yaml(host_path("prometheus", "/etc/prometheus/prometheus.yml"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "streamer" in jobs, 'the rules and alerts expect job="streamer"'
    targets: set[tuple[str, int]] = set()
    for sd in jobs["streamer"].get("dns_sd_configs", []):
        targets |= {(name, int(sd["port"])) for name in sd["names"]}
    for static in jobs["streamer"].get("static_configs", []):
        for target in static["targets"]:
            host, _, target_port = target.rpartition(":")
            targets.add((host, int(target_port)))
    assert targets == {("worker", port)}
    assert jobs["streamer"].get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_loads_the_repository_rule_files() -> None:
    config = load_yaml(host_path("prometheus", "/etc/prometheus/prometheus.yml"))
    rule_files = config.get("rule_files", [])
    assert rule_files
    matched = []
    for pattern in rule_files:
        directory = host_path("prometheus", str(PurePosixPath(pattern).parent))
        matched += sorted(directory.glob(PurePosixPath(pattern).name))
    rules_dir = REPO / "deploy" / "prometheus" / "rules"
    assert matched, f"the rule_files {rule_files} match no file; expected {rules_dir.relative_to(REPO)}/*.yml"
    assert set(matched) == set(rules_dir.glob("*.yml"))
    # Every job the rules name is scraped.
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    for path in matched:
        for job in re.findall(r'job\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8")):
            assert job in jobs, f"{path.name} reads job={job!r}, which compose's Prometheus does not scrape"


def test_worker_stop_grace_period_outlasts_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings_with_env(monkeypatch, container_env("worker"))
    grace = duration_seconds(services()["worker"]["stop_grace_period"])
    # The drain, then the final commit and close, before Docker's SIGKILL.
    assert grace >= settings.shutdown.drain_timeout + 5


# --- producer ---------------------------------------------------------------------------------


def test_producer_runs_the_mounted_script_and_reads_the_variables_it_is_given() -> None:
    producer = services()["producer"]
    entrypoint = producer["entrypoint"]
    assert entrypoint[0] == "python"
    script = host_path("producer", entrypoint[1])
    assert script == REPO / "deploy" / "compose" / "producer.py"
    source = script.read_text(encoding="utf-8")
    compile(source, str(script), "exec")
    for name in environment("producer"):
        assert f'"{name}"' in source, f"the producer does not read {name}"
    assert '"message-id"' in source, "records need the message-id header the dedup reads"
    assert producer.get("healthcheck", {}).get("disable") is True, "the image's check is a worker's"


# --- Grafana ----------------------------------------------------------------------------------


def test_grafana_provisioning_finds_prometheus_and_the_dashboard() -> None:
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    assert provisioning == REPO / "deploy" / "grafana" / "provisioning"
    datasources = [
        ds
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in load_yaml(f)["datasources"]
    ]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus, "no Prometheus data source is provisioned"
    url = urlsplit(prometheus[0]["url"])
    assert url.hostname == "prometheus"
    assert url.hostname in services()
    assert url.port == 9090
    assert not any("--web.listen-address" in str(arg) for arg in services()["prometheus"].get("command", []))

    providers = [
        p for f in sorted((provisioning / "dashboards").glob("*.y*ml")) for p in load_yaml(f)["providers"]
    ]
    assert providers, "no dashboard provider is provisioned"
    for provider in providers:
        dashboards = host_path("grafana", provider["options"]["path"])
        assert (dashboards / "streamer.json").is_file()
        json.loads((dashboards / "streamer.json").read_text(encoding="utf-8"))

    env = environment("grafana")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert host_path("grafana", env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()


def test_published_ports_are_bound_to_localhost_only() -> None:
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


# --- the Dockerfile ---------------------------------------------------------------------------


def instruction(word: str) -> list[str]:
    return [args for w, args in dockerfile_instructions(DOCKERFILE) if w == word]


def test_dockerfile_runs_streamer_as_a_non_root_user() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    uid, gid = dockerfile_user(DOCKERFILE)
    assert (uid, gid) == (10001, 10001)
    assert dockerfile_json_array(instruction("ENTRYPOINT")[-1]) == ["streamer"]
    assert dockerfile_json_array(instruction("CMD")[-1]) == ["run", "streamer.demo:app"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["streamer"] == "streamer.cli:main"


def test_dockerfile_serves_metrics_on_all_interfaces_and_checks_healthz() -> None:
    default_port = MetricsSettings().port
    assert instruction("EXPOSE") == [str(default_port)]
    assert dockerfile_env()["STREAMER_METRICS__HOST"] == "0.0.0.0"  # noqa: S104
    (healthcheck,) = instruction("HEALTHCHECK")
    _options, _, command = healthcheck.partition("CMD ")
    argv = dockerfile_json_array(command)
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "urllib" in code
    assert "/healthz" in code
    assert "STREAMER_METRICS__PORT" in code
    assert str(default_port) in code


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` keep ``path`` out of the build context (last match wins)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in patterns:
        negated = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerfile_copies_what_the_package_build_needs_and_dockerignore_keeps_it() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    sources = []
    for args in instruction("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    assert {"pyproject.toml", "README.md", "streamer"} <= set(sources)
    needed = ["pyproject.toml", "README.md"] + [
        str(p.relative_to(REPO))
        for p in (REPO / "streamer").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed")
    ]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
    for path in needed:
        assert not dockerignore_excludes(path, patterns), f".dockerignore keeps {path} out of the image"
    for path in (".git/HEAD", ".venv/bin/python", ".dev/logs/kafka-1.log", "tests/conftest.py"):
        assert dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the build context"
    assert any(a.startswith("pip install") for a in instruction("RUN"))
