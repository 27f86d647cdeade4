"""The ``streamer`` command: run a worker, run the crash/resume demo."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from streamer.app import App
from streamer.errors import ConfigError
from streamer.exitcodes import EXIT_NOT_FOUND, EXIT_USAGE

#: ``streamer lag``: the group does not exist (or has never committed).

EXIT_CODES = """exit codes:
  0    stopped cleanly (signal, or --until-end reached the end offsets): everything finished is committed
  1    a record failed and nothing parked it (committed up to it), a fatal Kafka error,
       or the final commit failed
  2    bad usage or settings: nothing was consumed
  3    SIGTERM/SIGINT drain timeout ran out: what finished was committed, in-flight records were abandoned
  128+N  a second signal N (e.g. 130 for SIGINT, 143 for SIGTERM): exited at once without a final commit
"""


def load_app(target: str) -> App:
    """Import ``MODULE:APP`` (``APP`` defaults to ``app``) and return the App it names."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    if not module_name:
        raise ConfigError(f"expected MODULE:APP (for example myservice.consumer:app), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} named in {target!r}: {exc}. "
            "Is it installed, or is its folder on PYTHONPATH?"
        ) from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r} (from {target!r})") from None
    if not isinstance(app, App):
        raise ConfigError(f"{target!r} is a {type(app).__name__}, expected a streamer.App")
    return app


def _cmd_run(args: argparse.Namespace) -> int:
    from streamer.plugins import app_from_settings
    from streamer.runner import run_worker
    from streamer.settings import load_settings

    if args.workers > 1:
        from streamer.supervisor import supervise

        settings = (
            load_settings(args.config)
            if args.target is None
            else load_app(args.target).resolve_settings(args.config)
        )
        child = [*([args.target] if args.target else []), *(["--config", args.config] if args.config else [])]
        child += [*(["--until-end"] if args.until_end else []), "--no-progress"]
        return supervise(child, args.workers, settings.metrics.port)
    if args.target is not None:
        app = load_app(args.target)
        settings = app.resolve_settings(args.config)
    else:
        app, settings = None, load_settings(args.config)
    app = app_from_settings(settings, app)
    if not app.topics:
        raise ConfigError(
            "no topic has a handler: give MODULE:APP, "
            "or assemble chains in the settings ([topics.NAME] chain)"
        )
    return run_worker(app, settings, until_end=args.until_end, progress=args.progress)


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamer.demo import run_demo

    return run_demo(
        bootstrap=args.bootstrap,
        records=args.records,
        kill_at=args.kill_at,
        every_records=args.every_records,
        work_us=args.work_us,
    )


def _cmd_lag(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from streamer.lag import GroupNotFoundError, group_lag, render
    from streamer.settings import KafkaSettings, load_settings
    from streamer.source import admin_config

    if args.config:
        kafka = load_settings(args.config).kafka
    else:
        kafka = KafkaSettings(bootstrap_servers=args.bootstrap, group_id=args.group)
    try:
        rows = group_lag(admin_config(kafka), args.group)
    except GroupNotFoundError as exc:
        print(f"streamer lag: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(json.dumps([asdict(r) for r in rows]) if args.json else render(rows))
    return 0


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from confluent_kafka import KafkaException

    from streamer import replay
    from streamer.settings import KafkaSettings, load_settings
    from streamer.source import admin_config

    if args.config:
        kafka = load_settings(args.config).kafka
    else:
        kafka = KafkaSettings(bootstrap_servers=args.bootstrap, group_id="streamer-dlq-replay")
    where = replay.ReplayFilter(
        error_type=args.error_type,
        partition=args.partition,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        limit=args.limit,
    )

    def show(record: replay.ReplayedRecord) -> None:
        where_to = "(no destination)" if record.destination is None else record.destination
        if record.partition is not None:
            where_to += f"[{record.partition}]"
        print(f"{record.source} -> {where_to}  {record.error_type or '?'}")

    try:
        summary = replay.replay(
            admin_config(kafka),
            args.topic,
            to=args.to,
            where=where,
            dry_run=args.dry_run,
            on_record=show if args.dry_run else None,
        )
    except (replay.DeadLetterTopicNotFoundError, replay.DestinationNotFoundError) as exc:
        print(f"streamer dlq replay: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except replay.ReplayError as exc:
        if exc.summary is not None:
            print("\n".join(exc.summary.lines()))
        print(f"streamer dlq replay: {exc}", file=sys.stderr)
        return 1
    except KafkaException as exc:
        print(f"streamer dlq replay: cannot reach Kafka at {kafka.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``streamer`` command."""
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Checkpointed Kafka consumers.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a worker for MODULE:APP",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "target",
        metavar="MODULE:APP",
        nargs="?",
        help="where the App lives, e.g. orders.consumer:app (optional when the settings assemble chains)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes in the group under a supervisor (metrics on port+i)",
    )
    run.add_argument("--config", metavar="FILE", help="TOML settings file (environment overrides it)")
    run.add_argument(
        "--until-end",
        action="store_true",
        help="bounded run: stop once the end offsets seen at assignment are reached",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress line (default: on for --until-end in a terminal)",
    )
    run.set_defaults(func=_cmd_run)

    lag = sub.add_parser("lag", help="lag of a consumer group per partition (records and seconds)")
    lag.add_argument("--group", required=True, help="the consumer group")
    lag.add_argument("--config", metavar="FILE", help="TOML settings file for the connection settings")
    lag.add_argument(
        "--bootstrap",
        default=os.environ.get("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers when no --config is given",
    )
    lag.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lag.set_defaults(func=_cmd_lag)

    dlq = sub.add_parser("dlq", help="dead-letter topics: replay parked records")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    rep = dlq_sub.add_parser(
        "replay",
        help="re-publish parked records to the topic they came from",
        description="Read a dead-letter topic up to its end offsets at start (no consumer group) and "
        "re-publish each matching record to its original topic (or --to) with its key, value and "
        "headers, minus streamer's failure headers, plus streamer.replayed_from. Exit 4 if a topic "
        "does not exist, 1 if a record could not be re-published.",
    )
    rep.add_argument("--topic", required=True, help="the dead-letter topic, e.g. orders.dlq")
    rep.add_argument("--to", metavar="TOPIC", help="replay into TOPIC, not each record's original topic")
    rep.add_argument("--error-type", metavar="SUBSTR", help="only records whose error type contains SUBSTR")
    rep.add_argument("--partition", type=int, metavar="P", help="only partition P of the dead-letter topic")
    rep.add_argument("--from-offset", type=int, metavar="N", help="first dead-letter offset to read")
    rep.add_argument("--to-offset", type=int, metavar="N", help="last dead-letter offset to read (inclusive)")
    rep.add_argument("--limit", type=int, metavar="N", help="replay at most N records")
    rep.add_argument("--dry-run", action="store_true", help="list what would be replayed; publish nothing")
    conn = rep.add_mutually_exclusive_group()
    conn.add_argument("--config", metavar="FILE", help="TOML settings file for the connection settings")
    conn.add_argument(
        "--bootstrap",
        default=os.environ.get("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers when no --config is given",
    )
    rep.set_defaults(func=_cmd_dlq_replay)

    demo = sub.add_parser("demo", help="the crash/resume story on the local services")
    demo.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    demo.add_argument("--records", type=int, default=100_000, help="records to produce")
    demo.add_argument("--kill-at", type=int, default=87_000, help="SIGKILL the worker near this record")
    demo.add_argument("--every-records", type=int, default=1000, help="checkpoint interval (records)")
    demo.add_argument("--work-us", type=int, default=50, help="simulated work per record, microseconds")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamer`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
