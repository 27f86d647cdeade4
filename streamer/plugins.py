"""Handler plugins: chains assembled from settings, by entry-point name or import path.

An app team ships a package whose ``pyproject.toml`` declares entry points::

    [project.entry-points."streamer.handlers"]
    orders = "orders_plugin:handler"          # a factory: (**options) -> Handler
    [project.entry-points."streamer.middlewares"]
    audit = "orders_plugin:audit"             # a factory: (**options) -> Middleware

and the service team wires it in without code::

    [topics.orders]
    chain = [
      { use = "audit", options = { level = "info" } },   # middlewares first, outermost first
      { use = "orders", options = { currency = "EUR" } }, # the last step is the handler
    ]

``use`` is an entry-point name or an import path ``package.module:factory``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, cast

from streamer.app import App
from streamer.chain import Handler, Middleware
from streamer.errors import ConfigError
from streamer.settings import ChainStep, Settings

HANDLER_GROUP = "streamer.handlers"
MIDDLEWARE_GROUP = "streamer.middlewares"


def available(group: str) -> dict[str, str]:
    """Installed entry points of ``group``: name -> ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_factory(use: str, group: str) -> Callable[..., Any]:
    """The factory named ``use``: an entry point of ``group``, else an import path."""
    for ep in entry_points(group=group):
        if ep.name == use:
            try:
                return cast(Callable[..., Any], ep.load())
            except Exception as exc:
                raise ConfigError(f"plugin {use!r} ({ep.value}) failed to load: {exc}") from exc
    module_name, _, attr = use.partition(":")
    if not attr:
        names = sorted(available(group))
        raise ConfigError(
            f"no plugin {use!r} in entry-point group {group!r} (installed: {names}); "
            "use an entry-point name or 'package.module:factory'"
        )
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import plugin {use!r}: {exc}") from None
    if not callable(found):
        raise ConfigError(f"plugin {use!r} is not callable")
    return cast(Callable[..., Any], found)


def build_step(step: ChainStep, group: str) -> Any:
    """Call the step's factory with its options."""
    factory = load_factory(step.use, group)
    try:
        return factory(**step.options)
    except TypeError as exc:
        raise ConfigError(f"plugin {step.use!r} rejected its options {sorted(step.options)}: {exc}") from None


def app_from_settings(settings: Settings, app: App | None = None) -> App:
    """Add to ``app`` (or a new App) every topic whose chain is assembled in ``[topics.NAME] chain``."""
    app = app or App(settings=settings)
    for topic, cfg in settings.topics.items():
        if not cfg.chain:
            continue
        if topic in app.topics:
            raise ConfigError(f"topics.{topic}.chain: topic {topic!r} already has a handler in the app")
        *middleware_steps, handler_step = cfg.chain
        handler = cast(Handler, build_step(handler_step, HANDLER_GROUP))
        middlewares = [cast(Middleware, build_step(s, MIDDLEWARE_GROUP)) for s in middleware_steps]
        app.handler(topic, middlewares=middlewares)(handler)
    return app
