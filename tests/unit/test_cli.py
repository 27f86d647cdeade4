"""The ``streamer`` command: finding the App (load_app) and turning bad input into exit code 2."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamer import App, ConfigError
from streamer.cli import load_app, main

APP_SOURCE = """
from streamer import App

app = App()
other = App()
not_an_app = 42


@app.handler("orders")
def handle(msg):
    pass
"""

pytestmark = pytest.mark.usefixtures("clean_environment")

ModuleFactory = Callable[[str], str]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleFactory]:
    """Write an importable module with the given source; return its (unique) name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def factory(source: str) -> str:
        name = f"streamer_cli_test_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
        created.append(name)
        return name

    yield factory
    for name in created:
        sys.modules.pop(name, None)


# --- load_app -------------------------------------------------------------------------------------


def test_load_app_returns_the_named_app(make_module: ModuleFactory) -> None:
    module = make_module(APP_SOURCE)
    app = load_app(f"{module}:other")
    assert isinstance(app, App)
    assert app is sys.modules[module].other


def test_load_app_defaults_to_the_attribute_app(make_module: ModuleFactory) -> None:
    module = make_module(APP_SOURCE)
    app = load_app(module)
    assert app is sys.modules[module].app
    assert app.topics == ["orders"]
    assert load_app(f"{module}:") is app


def test_load_app_of_a_missing_module_names_the_module() -> None:
    with pytest.raises(ConfigError, match="cannot import module 'nonexistent_mod_xyz'"):
        load_app("nonexistent_mod_xyz:app")


def test_load_app_of_a_missing_attribute_names_module_and_attribute(make_module: ModuleFactory) -> None:
    module = make_module(APP_SOURCE)
    with pytest.raises(ConfigError, match=f"module '{module}' has no attribute 'missing'"):
        load_app(f"{module}:missing")


def test_load_app_of_something_that_is_not_an_app_names_its_type(make_module: ModuleFactory) -> None:
    module = make_module(APP_SOURCE)
    with pytest.raises(ConfigError, match=r"is a int, expected a streamer\.App"):
        load_app(f"{module}:not_an_app")


def test_load_app_without_a_module_name_explains_the_form() -> None:
    with pytest.raises(ConfigError, match="expected MODULE:APP"):
        load_app(":app")


def test_load_app_reports_a_failing_import_inside_the_module(make_module: ModuleFactory) -> None:
    module = make_module("import nonexistent_dependency_xyz\n")
    with pytest.raises(ConfigError, match=f"cannot import module '{module}'") as info:
        load_app(f"{module}:app")
    assert "nonexistent_dependency_xyz" in str(info.value)


# --- main -----------------------------------------------------------------------------------------


def test_run_with_a_missing_module_exits_2_naming_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nonexistent_mod_xyz:app"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamer: ")
    assert "nonexistent_mod_xyz" in err


def test_run_with_bad_settings_exits_2_naming_the_key(
    make_module: ModuleFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(APP_SOURCE)
    bad_toml = tmp_path / "streamer.toml"
    bad_toml.write_text(
        '[kafka]\nbootstrap_servers = "b:9092"\ngroup_id = "g"\n\n[commit]\nevery_records = "abc"\n',
        encoding="utf-8",
    )
    assert main(["run", f"{module}:app", "--config", str(bad_toml)]) == 2
    err = capsys.readouterr().err
    assert "commit.every_records" in err
    assert str(bad_toml) in err


def test_run_with_a_missing_config_file_exits_2(
    make_module: ModuleFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = make_module(APP_SOURCE)
    assert main(["run", f"{module}:app", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
