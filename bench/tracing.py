"""What tracing costs per record, without a broker: the Worker with tracing off, and on.

    .venv/bin/python -m bench.tracing [--records 200000] [--repeat 3]

Every row runs the Worker over the same pre-built batches of real confluent-kafka Message objects
(bench.hotpath's fake source, one partition, shipped commit settings), each carrying a sampled W3C
``traceparent`` and a ``message-id`` header, through the chain ``App.chains(settings)`` composes
for a no-op handler (so the default retry middleware is in every row). Rows:

- ``off``: ``[tracing] enabled = false`` (the baseline: the trace middleware is not composed);
- ``no otel``: opentelemetry not importable (``sys.modules["opentelemetry"] = None``), ``auto``;
- ``on, API only``: ``enabled = true`` with no SDK provider set: the API's no-op tracer, which
  still extracts the parent and keeps it current;
- ``on, SDK, sampler off``: an SDK TracerProvider with the ALWAYS_OFF sampler (spans not recorded);
- ``on, SDK``: an SDK TracerProvider recording every span, a BatchSpanProcessor and an exporter
  that drops what it is given (the export thread's CPU is counted).

Each row runs in a process of its own (a process sets its global TracerProvider once), ``--repeat``
times, rotating the order between passes; the table shows the best pass. CPU µs per record is
``time.process_time`` (every thread of the child: the loop, the processing thread, the span
processor's); "over off" is a row's best minus the ``off`` row's best. The last column is the CPU
per call of the chain alone for a handler returning one ``Record`` (the span's context written into
its headers when tracing is on), over the same records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

ROWS = {
    "off": "off",
    "no-otel": "no otel",
    "api": "on, API only",
    "sdk-unsampled": "on, SDK, sampler off",
    "sdk": "on, SDK",
}
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def headers(i: int) -> list[tuple[str, bytes]]:
    """A traced record's headers: a sampled traceparent and its message id."""
    return [("traceparent", TRACEPARENT), ("message-id", str(i).encode())]


def _set_provider(row: str) -> None:
    if not row.startswith("sdk"):
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_OFF if row == "sdk-unsampled" else ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)


def child(row: str, records: int, size: int) -> None:
    """Run one row in this process and print its figures as JSON."""
    from bench.hotpath import FakeSource, batches
    from streamer import App, Message, Record
    from streamer.logs import configure_logging
    from streamer.message import message_from_kafka
    from streamer.settings import load_settings
    from streamer.worker import Worker

    configure_logging("WARNING")
    _set_provider(row)
    settings = load_settings(
        kafka={"bootstrap_servers": "fake", "group_id": "bench"},
        dead_letter={"enabled": False},
        metrics={"enabled": False},
        tracing={"enabled": {"off": False, "api": True}.get(row, "auto")},
    )
    app = App()
    app.handler("t")(lambda msg: None)
    chains = app.chains(settings)
    traced = len(chains) == 1 and chains["t"].__qualname__.startswith("trace")
    source = FakeSource(batches(records, size, headers))
    worker = Worker(settings, chains, source=source)  # type: ignore[arg-type]  # FakeSource quacks like Source
    source.worker = worker
    started, cpu = time.perf_counter(), time.process_time()
    worker.run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu

    emitting = App()

    @emitting.handler("t")
    def emit(msg: Message) -> Record:
        return Record("out", b"v")

    chain = emitting.chains(settings)["t"]
    msgs = [message_from_kafka(raw) for batch in batches(records // 4, size, headers) for raw in batch]
    chain_cpu = time.process_time()
    for msg in msgs:
        chain(msg)
    chain_cpu = time.process_time() - chain_cpu
    print(
        json.dumps(
            {
                "traced": traced,
                "wall": wall / records * 1e6,
                "cpu": cpu / records * 1e6,
                "chain": chain_cpu / len(msgs) * 1e6,
            }
        )
    )


def run_row(row: str, records: int, size: int) -> dict[str, Any]:
    """One pass of ``row`` in a fresh interpreter."""
    block = 'sys.modules["opentelemetry"] = None; ' if row == "no-otel" else ""
    code = f"import sys; {block}from bench.tracing import child; child({row!r}, {records}, {size})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    """Print CPU µs per record per row."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = list(ROWS)
    best: dict[str, dict[str, Any]] = {}
    for i in range(args.repeat):
        for row in rows[i % len(rows) :] + rows[: i % len(rows)]:
            figures = run_row(row, args.records, args.batch)
            if row not in best or figures["cpu"] < best[row]["cpu"]:
                best[row] = {**figures, "chain": min(figures["chain"], best.get(row, figures)["chain"])}
    base = best["off"]["cpu"]
    print(f"{args.records:,} records, best of {args.repeat}, CPU of every thread")
    header = f"{'tracing':24} {'traced':>6} {'wall µs/rec':>12} {'CPU µs/rec':>11} {'over off':>9}"
    print(header + f" {'chain + 1 output, CPU µs':>25}")
    for row in rows:
        f = best[row]
        print(
            f"{ROWS[row]:24} {'yes' if f['traced'] else 'no':>6} {f['wall']:12.2f} {f['cpu']:11.2f} "
            f"{f['cpu'] - base:+9.2f} {f['chain']:25.2f}"
        )


if __name__ == "__main__":
    main()
