"""Helpers shared by the offline checks of the deployment files (compose, Dockerfile, Kubernetes)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_origin

import pytest
import yaml
from pydantic import BaseModel

from streamer.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]

#: STREAMER_* variables that are read by something other than Settings.
NON_SETTINGS_VARIABLES = frozenset(
    {
        "STREAMER_LOG_LEVEL",  # streamer.logs
        "STREAMER_LOG_FORMAT",  # streamer.logs
        "STREAMER_DEMO_TOPIC",  # streamer.demo:app
        "STREAMER_DEMO_LOG",  # streamer.demo:app
        "STREAMER_DEMO_WORK_US",  # streamer.demo:app
    }
)


def load_yaml(path: Path) -> Any:
    """The single YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    """Every non-empty YAML document in ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def setting_name_problem(name: str) -> str | None:
    """Why the environment variable ``name`` is not a streamer setting, or None if it is one.

    ``STREAMER_<SECTION>__<KEY>`` must name a section of Settings and a key of that section
    (a dict-valued key such as ``[kafka.client]`` takes any sub-key); other ``STREAMER_*``
    variables must be among the few read elsewhere. Variables without the prefix are not ours.
    """
    if not name.startswith("STREAMER_") or name in NON_SETTINGS_VARIABLES:
        return None
    parts = name.removeprefix("STREAMER_").lower().split("__")
    sections = Settings.model_fields
    if len(parts) < 2:
        return f"{name}: neither STREAMER_<SECTION>__<KEY> nor a known non-settings variable"
    section, key, *rest = parts
    if section not in sections:
        return f"{name}: no settings section [{section}] (sections: {sorted(sections)})"
    model = sections[section].annotation
    assert isinstance(model, type)
    assert issubclass(model, BaseModel)
    fields = model.model_fields
    if key not in fields:
        return f"{name}: [{section}] has no key {key!r} (keys: {sorted(fields)})"
    if rest and get_origin(fields[key].annotation) is not dict:
        return f"{name}: [{section}] {key} is not a table, it takes no sub-key {'__'.join(rest)!r}"
    return None


def order_dependent_variables(names: Iterable[str]) -> list[str]:
    """Pairs like STREAMER_KAFKA__CLIENT (a JSON object) and STREAMER_KAFKA__CLIENT__<key>.

    pydantic-settings assigns the variables of one field in the order of the environment: the JSON
    object replaces the sub-keys set before it and is extended by those set after it, so which keys
    survive depends on the order the container runtime passes them in. Set one form or the other.
    """
    upper = {name.upper() for name in names if name.startswith("STREAMER_")}
    return sorted(f"{whole} and {part}" for whole in upper for part in upper if part.startswith(whole + "__"))


def load_settings_with_env(
    monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str], config: Path | None = None
) -> Settings:
    """load_settings(config) with exactly ``env`` as the STREAMER_* environment."""
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_json_array(arguments: str) -> list[str]:
    """The exec form ``["a", "b"]`` of an instruction's arguments."""
    value = json.loads(arguments)
    assert isinstance(value, list), f"expected the exec form [...], got {arguments!r}"
    return [str(v) for v in value]


def dockerfile_user(path: Path) -> tuple[int, int]:
    """The numeric uid and gid of the last USER instruction."""
    users = [args for word, args in dockerfile_instructions(path) if word == "USER"]
    assert users, f"{path} has no USER instruction: the image would run as root"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]!r} must be numeric uid:gid so runAsNonRoot can verify it"
    return int(match[1]), int(match[2])
