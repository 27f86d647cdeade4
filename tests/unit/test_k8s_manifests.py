"""deploy/k8s, checked offline: both overlays are rendered and validated without a cluster.

Rendering uses ``kustomize build`` or ``kubectl kustomize`` when one is installed, and always a
minimal kustomize of this module (the features these manifests use: resources, labels, patches
that delete a resource or are JSON 6902 operations); when a binary is there both must agree, so
the fallback stays honest. Core objects are validated against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles; custom resources (Prometheus Operator, KEDA) are checked field by
field against what they point at. Then the invariants the workers depend on: the grace period
outlasts the drain, the probes hit /healthz and /readyz on the metrics port, the pods run as the
image's non-root user, static membership only in the StatefulSet, secrets only by reference, and
the ConfigMap's streamer.toml plus the pod's environment are valid streamer settings.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from streamer.settings import Settings, is_secret_key
from tests.unit.deploy_helpers import (
    REPO,
    dockerfile_user,
    load_settings_with_env,
    load_yaml,
    load_yaml_all,
    order_dependent_variables,
    setting_name_problem,
)

K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"deployment": K8S / "overlays" / "deployment", "statefulset": K8S / "overlays" / "statefulset"}
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
SECRET_NAME = "streamer-credentials"  # noqa: S105 - the name of a Secret, not a password

#: Kubernetes versions whose schemas the core objects must pass: an old supported one and the newest.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
#: Kinds without a bundled schema, checked by the tests below instead.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
#: What the kubelet puts in metadata.name / metadata.namespace for the tests' pod.
POD_NAME = "streamer-0"

# --- a minimal kustomize --------------------------------------------------------------------------


class UnsupportedKustomizeFeature(AssertionError):
    """The manifests use a kustomize feature the minimal renderer does not implement."""


def object_id(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    unknown = set(target) - set(wanted)
    if unknown:
        raise UnsupportedKustomizeFeature(f"patch target fields {sorted(unknown)}")
    return all(wanted[key] == value for key, value in target.items())


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json6902(doc: Any, operations: list[dict[str, Any]]) -> None:
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                if last == "-":
                    node.append(copy.deepcopy(op["value"]))
                elif op["op"] == "add":
                    node.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    node[int(last)] = copy.deepcopy(op["value"])
            else:
                if op["op"] == "replace" and last not in node:
                    raise AssertionError(f"JSON 6902 replace of missing {op['path']}")
                node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            raise UnsupportedKustomizeFeature(f"JSON 6902 op {op['op']!r}")


def mini_kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render ``directory``'s kustomization with the features these manifests use."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "labels", "patches"}
    if unknown:
        raise UnsupportedKustomizeFeature(f"{directory}: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += mini_kustomize(path) if path.is_dir() else load_yaml_all(path)

    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "target"}:
            raise UnsupportedKustomizeFeature(f"patch fields {sorted(patch)}")
        body = load_yaml(directory / patch["path"])
        if isinstance(body, list):  # JSON 6902
            targets = [o for o in objects if _matches(o, patch["target"])]
            assert targets, f"patch {patch['path']} matches no resource"
            for obj in targets:
                _apply_json6902(obj, body)
        elif body.get("$patch") == "delete":
            doomed = (body["apiVersion"], body["kind"], body["metadata"]["name"])
            assert doomed in {object_id(o) for o in objects}, f"{patch['path']} deletes nothing"
            objects = [o for o in objects if object_id(o) != doomed]
        else:
            raise UnsupportedKustomizeFeature(f"strategic merge patch {patch['path']} (only $patch: delete)")

    for labels in kustomization.get("labels", []):
        if (
            labels.get("includeSelectors")
            or labels.get("includeTemplates")
            or set(labels)
            - {
                "pairs",
                "includeSelectors",
                "includeTemplates",
            }
        ):
            raise UnsupportedKustomizeFeature(f"labels {labels}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
    return objects


def kustomize_binary() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The overlay's objects (treat as read-only: shared between tests)."""
    objects = mini_kustomize(OVERLAYS[overlay])
    command = kustomize_binary()
    if command is not None:
        result = subprocess.run(
            [*command, str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{' '.join(command)} failed: {result.stderr}"
        real = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        by_id = {object_id(o): o for o in real}
        assert by_id == {object_id(o): o for o in objects}, (
            f"the tests' minimal kustomize disagrees with `{' '.join(command)}` on {overlay}"
        )
        objects = real
    return tuple(objects)


def the(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in rendered(overlay) if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(overlay: str) -> dict[str, Any]:
    return the(overlay, {"deployment": "Deployment", "statefulset": "StatefulSet"}[overlay])


def pod_spec(overlay: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(overlay)["spec"]["template"]["spec"]
    return spec


def worker_container(overlay: str) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(overlay)["containers"] if c["name"] == "worker"]
    return container


def pod_labels(overlay: str) -> dict[str, str]:
    labels: dict[str, str] = workload(overlay)["spec"]["template"]["metadata"]["labels"]
    return labels


def config_toml(overlay: str) -> str:
    (volume,) = [v for v in pod_spec(overlay)["volumes"] if "configMap" in v]
    text: str = the(overlay, "ConfigMap", volume["configMap"]["name"])["data"]["streamer.toml"]
    return text


def secret_example() -> dict[str, str]:
    (secret,) = load_yaml_all(SECRET_EXAMPLE)
    data: dict[str, str] = secret["stringData"]
    return data


def container_environment(overlay: str) -> dict[str, str]:
    """The worker's environment as the kubelet builds it, with the example Secret's values.

    Dependent variables ``$(NAME)`` expand to variables defined earlier in the list, as in
    Kubernetes; a reference to a later or unknown variable stays as it is.
    """
    env: dict[str, str] = {}
    fields = {"metadata.name": POD_NAME, "metadata.namespace": "streamer"}
    for item in worker_container(overlay).get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\(([^)]+)\)", lambda m: env.get(m[1], m[0]), str(item["value"]))
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME
            env[item["name"]] = secret_example()[ref["key"]]
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unexpected valueFrom in {item}")
    return env


def effective_settings(overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings: the ConfigMap's file at the path it is given, plus the environment."""
    args = worker_container(overlay)["args"]
    config = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in worker_container(overlay)["volumeMounts"] if m["name"] == "config"]
    assert config.parent == Path(mount["mountPath"]), "--config is not in the ConfigMap's mount"
    local = tmp_path / config.name
    local.write_text(config_toml(overlay), encoding="utf-8")
    return load_settings_with_env(monkeypatch, container_environment(overlay), local)


def rule_groups_from_files() -> list[dict[str, Any]]:
    files = sorted([*RULES_DIR.glob("*.yml"), *RULES_DIR.glob("*.yaml")], key=lambda p: p.name)
    assert files, (
        f"no Prometheus rule files in {RULES_DIR.relative_to(REPO)}: the PrometheusRule is generated "
        "from them (deploy/k8s/render_prometheusrule.py)"
    )
    return [group for path in files for group in load_yaml(path)["groups"]]


overlays = pytest.mark.parametrize("overlay", list(OVERLAYS))

# --- files ------------------------------------------------------------------------------------


def test_every_yaml_file_parses_and_every_object_is_named() -> None:
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    assert len(files) >= 12
    for path in files:
        docs = load_yaml_all(path)
        assert docs, f"{path} is empty"
        if path.name == "kustomization.yaml" or isinstance(docs[0], list):
            continue  # kustomizations and JSON 6902 patches
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: {sorted(doc)}"
            assert doc["metadata"].get("name"), f"{path}: an object without a name"


def test_kustomizations_reference_existing_files_and_never_the_secret_example() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        data = load_yaml(kustomization)
        paths = [*data.get("resources", []), *(p["path"] for p in data.get("patches", []))]
        for ref in paths:
            target = (kustomization.parent / ref).resolve()
            assert target.exists(), f"{kustomization}: {ref} does not exist"
            assert target != SECRET_EXAMPLE, f"{kustomization} would apply the example Secret"


@overlays
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    kinds = sorted(o["kind"] for o in rendered(overlay))
    expected = {
        "deployment": ["ConfigMap", "Deployment"],
        "statefulset": ["ConfigMap", "Service", "StatefulSet"],
    }[overlay]
    assert kinds == sorted([*expected, "PodDisruptionBudget", *CUSTOM_KINDS])
    for obj in rendered(overlay):
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "streamer"


# --- schemas ----------------------------------------------------------------------------------


def schema_checked(objects: list[dict[str, Any]], version: str) -> int:
    """Validate every core object (strict: unknown fields fail); return how many were checked."""
    checked, errors = 0, []
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(str(p) for p in exc.path)}"
            errors.append(f"{where}: {exc.message}")
        checked += 1
    assert not errors, f"invalid in Kubernetes {version}:\n" + "\n".join(errors)
    return checked


@overlays
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schema(overlay: str, version: str) -> None:
    assert schema_checked(list(rendered(overlay)), version) >= 3


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_secret_example_validates_and_holds_only_placeholders(version: str) -> None:
    docs = load_yaml_all(SECRET_EXAMPLE)
    assert [d["kind"] for d in docs] == ["Secret"]
    assert docs[0]["metadata"]["name"] == SECRET_NAME
    assert schema_checked(docs, version) == 1
    for key, value in secret_example().items():
        assert "CHANGE-ME" in value, f"secret.example.yaml: {key} looks like a real value"


@overlays
def test_environment_variable_names_are_valid_for_kubernetes(overlay: str) -> None:
    for item in worker_container(overlay)["env"]:
        assert re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", item["name"]), item["name"]


# --- the worker's settings ----------------------------------------------------------------------


@overlays
def test_configmap_and_environment_are_valid_streamer_settings(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = [p for p in map(setting_name_problem, container_environment(overlay)) if p]
    assert not problems, "\n".join(problems)
    settings = effective_settings(overlay, tmp_path, monkeypatch)  # raises ConfigError if invalid
    assert settings.kafka.assignment_strategy == "cooperative-sticky"
    client = settings.kafka.librdkafka_client()
    # The file's non-secret [kafka.client] and the Secret's sasl.* variables both arrive.
    assert client["security.protocol"] == "SASL_SSL"
    assert client["sasl.username"] == secret_example()["kafka-sasl-username"]
    assert client["sasl.password"] == secret_example()["kafka-sasl-password"]
    assert settings.dedup.enabled
    assert settings.dedup.redis_url.get_secret_value() == secret_example()["redis-url"]
    assert settings.metrics.enabled
    assert settings.metrics.host == "0.0.0.0"  # noqa: S104 - the kubelet and Prometheus use the pod IP


@overlays
def test_settings_do_not_depend_on_the_order_of_the_variables(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_environment(overlay)
    assert not order_dependent_variables(env)
    forward = effective_settings(overlay, tmp_path, monkeypatch)
    config = tmp_path / "streamer.toml"
    backward = load_settings_with_env(monkeypatch, dict(reversed(env.items())), config)
    assert backward.redacted() == forward.redacted()
    assert backward.kafka.librdkafka_client() == forward.kafka.librdkafka_client()


@overlays
def test_no_variable_is_left_unexpanded(overlay: str) -> None:
    for name, value in container_environment(overlay).items():
        assert "$(" not in value, f"{name}={value!r}: a reference to a variable not defined before it"


# --- termination, probes, ports -----------------------------------------------------------------


@overlays
def test_termination_grace_period_outlasts_the_drain_timeout(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain = effective_settings(overlay, tmp_path, monkeypatch).shutdown.drain_timeout
    grace = pod_spec(overlay)["terminationGracePeriodSeconds"]
    # After the drain, the final commit and the consumer's close need time before SIGKILL.
    assert grace > drain
    assert grace >= drain + 10, f"terminationGracePeriodSeconds {grace} leaves < 10 s after a {drain} s drain"


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


@overlays
def test_probes_hit_healthz_and_readyz_on_the_metrics_port(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = effective_settings(overlay, tmp_path, monkeypatch).metrics.port
    assert port == 9400
    container = worker_container(overlay)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert resolve_port(container, get["port"]) == port
        assert get.get("scheme", "HTTP") == "HTTP"
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]


@overlays
def test_podmonitor_scrapes_metrics_on_the_metrics_port_as_job_streamer(overlay: str) -> None:
    monitor = the(overlay, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels(overlay).items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert resolve_port(worker_container(overlay), endpoint["port"]) == 9400
    # The alerts read up{job="streamer"}: the job name comes from a pod label.
    job = pod_labels(overlay)[monitor["spec"]["jobLabel"]]
    for path in RULES_DIR.glob("*.yml"):
        for wanted in re.findall(r'job\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8")):
            assert wanted == job, f"{path.name} expects job={wanted!r}, the PodMonitor gives {job!r}"


# --- security ---------------------------------------------------------------------------------


@overlays
def test_pods_run_as_the_images_non_root_user_with_a_read_only_root(overlay: str) -> None:
    uid, gid = dockerfile_user(REPO / "Dockerfile")
    pod = pod_spec(overlay)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert context.get("privileged", False) is False
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])


@overlays
def test_writable_paths_are_volumes(overlay: str) -> None:
    container = worker_container(overlay)
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"], "a read-only root needs a writable /tmp"  # noqa: S108
    log = container_environment(overlay)["STREAMER_DEMO_LOG"]
    assert log == "/dev/null" or any(
        log.startswith(path + "/") and "emptyDir" in volume for path, volume in mounts.items()
    ), f"STREAMER_DEMO_LOG={log} is not writable"


def secret_looking(name: str) -> bool:
    lowered = name.lower()
    return is_secret_key(lowered) or any(w in lowered for w in ("sasl", "redis_url", "credential", "api_key"))


@overlays
def test_secrets_come_only_from_secret_references(overlay: str) -> None:
    assert not [o for o in rendered(overlay) if o["kind"] == "Secret"], "no Secret may be committed"
    used_keys = set()
    for item in worker_container(overlay)["env"]:
        if "value" in item:
            assert not secret_looking(item["name"]), f"{item['name']} must come from a secretKeyRef"
            assert not re.search(r"://[^/@\s]*:[^@\s]+@", str(item["value"])), (
                f"{item['name']} holds a password"
            )
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME
            assert ref.get("optional", False) is False, "a missing Secret must stop the pod, not start it"
            used_keys.add(ref["key"])
    for ref in the(overlay, "TriggerAuthentication")["spec"]["secretTargetRef"]:
        assert ref["name"] == SECRET_NAME
        used_keys.add(ref["key"])
    assert used_keys == set(secret_example()), "secret.example.yaml and the references disagree"


@overlays
def test_configmap_holds_no_secret(overlay: str) -> None:
    text = config_toml(overlay)
    parsed = tomllib.loads(text)
    assert not [k for k in parsed["kafka"].get("client", {}) if is_secret_key(k)]
    assert "redis_url" not in parsed.get("dedup", {})
    assert not re.search(r"://[^/@\s]*:[^@\s]+@", text)
    for trigger in the(overlay, "ScaledObject")["spec"]["triggers"]:
        assert not [k for k in trigger["metadata"] if secret_looking(k) and k != "sasl"], trigger["metadata"]


# --- static membership ------------------------------------------------------------------------


def test_deployment_has_no_static_membership() -> None:
    text = yaml.safe_dump(list(rendered("deployment")))
    assert "group.instance.id" not in text, "pods of a Deployment have no stable name to be a static member"


def test_statefulset_members_are_static_with_the_pod_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_list = worker_container("statefulset")["env"]
    names = [item["name"] for item in env_list]
    (pod_name,) = [item for item in env_list if item["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    instance = "STREAMER_KAFKA__CLIENT__group.instance.id"
    (client,) = [item for item in env_list if item["name"] == instance]
    assert names.index("POD_NAME") < names.index(instance), "$(POD_NAME) expands only if defined before"
    assert client["value"] == "$(POD_NAME)"
    settings = effective_settings("statefulset", tmp_path, monkeypatch)
    assert settings.kafka.librdkafka_client()["group.instance.id"] == POD_NAME
    # Static members keep their partitions over a restart only within the session timeout.
    assert "session.timeout.ms" in settings.kafka.librdkafka_client()


def test_statefulset_pod_template_is_the_deployments_plus_static_membership() -> None:
    deployment = copy.deepcopy(the("deployment", "Deployment")["spec"]["template"])
    statefulset = copy.deepcopy(the("statefulset", "StatefulSet")["spec"]["template"])
    for container in statefulset["spec"]["containers"]:
        container["env"] = [
            e
            for e in container["env"]
            if e["name"] not in ("POD_NAME", "STREAMER_KAFKA__CLIENT__group.instance.id")
        ]
    assert statefulset == deployment, "statefulset.yaml's pod template drifted from base/deployment.yaml"


def test_statefulset_has_a_headless_governing_service() -> None:
    statefulset = the("statefulset", "StatefulSet")
    service = the("statefulset", "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels("statefulset").items()
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"


# --- selectors, disruption budget, autoscaling ------------------------------------------------------


@overlays
def test_selectors_match_the_pods(overlay: str) -> None:
    labels = pod_labels(overlay)
    assert workload(overlay)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in workload(overlay)["spec"], "KEDA owns the replica count"
    pdb = the(overlay, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@overlays
def test_scaledobject_targets_the_workload_and_watches_the_workers_group(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scaled = the(overlay, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == object_id(workload(overlay))
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]

    settings = effective_settings(overlay, tmp_path, monkeypatch)
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    kafka = triggers["kafka"]["metadata"]
    assert kafka["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert kafka["consumerGroup"] == settings.kafka.group_id
    assert kafka["topic"] == container_environment(overlay)["STREAMER_DEMO_TOPIC"]
    assert int(kafka["lagThreshold"]) > 0
    auth = the(overlay, "TriggerAuthentication", triggers["kafka"]["authenticationRef"]["name"])
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"username", "password"}

    query = triggers["prometheus"]["metadata"]["query"]
    assert f'group="{settings.kafka.group_id}"' in query
    recorded = {
        rule["record"] for group in rule_groups_from_files() for rule in group["rules"] if "record" in rule
    }
    for name in re.findall(r"[a-zA-Z_]+:[a-zA-Z0-9_:]+", query):
        assert name in recorded, f"the prometheus trigger reads {name}, which no recording rule defines"
    assert float(triggers["prometheus"]["metadata"]["threshold"]) > 0


# --- PrometheusRule ---------------------------------------------------------------------------


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    committed = load_yaml(BASE / "prometheusrule.yaml")
    assert committed["apiVersion"] == "monitoring.coreos.com/v1"
    assert committed["kind"] == "PrometheusRule"
    assert committed["spec"]["groups"] == rule_groups_from_files(), (
        "deploy/k8s/base/prometheusrule.yaml is out of date with deploy/prometheus/rules: "
        "run .venv/bin/python deploy/k8s/render_prometheusrule.py"
    )
    assert (BASE / "prometheusrule.yaml").read_text(encoding="utf-8").startswith("# GENERATED")


def test_render_script_builds_the_committed_prometheusrule() -> None:
    spec = importlib.util.spec_from_file_location("render_prometheusrule", K8S / "render_prometheusrule.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = yaml.safe_load(module.render(module.rule_files()))
    assert built == load_yaml(BASE / "prometheusrule.yaml")
    names = [group["name"] for group in built["spec"]["groups"]]
    assert len(names) == len(set(names)), "rule group names must be unique in one PrometheusRule"
