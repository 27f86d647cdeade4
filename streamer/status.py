"""The status page: what one worker owns and where it stands, as JSON and as HTML.

``snapshot`` reads only what the loop and the processing thread already keep (partition states,
counters, the recent errors, dead-lettered records and commit times in ``WorkerStats``): no broker
round trip, no lock the hot path takes. ``render_json`` and ``render_html`` turn the one snapshot
into ``/status.json`` and ``/`` on the metrics port.

The page never shows a record's key, value or headers, nor a secret: errors name exception types
for records (an application's message may quote the value; the log line has it), and every text
is scrubbed of the settings' secret values besides. The HTML needs no network and no framework:
inline CSS, and a short inline script that fetches the page every 2 s and swaps its content
(``<meta http-equiv=refresh>`` without JavaScript), so that the rendering and its escaping live here
alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Protocol

from streamer.commit import AdaptivePolicy, CommitPolicy, IntervalPolicy
from streamer.stats import DeadLettered, Incident, WorkerStats

if TYPE_CHECKING:
    from streamer.engine.partition import TP, PartitionState
    from streamer.settings import Settings

#: The paths the metrics server answers with the status page.
STATUS_PATHS = ("/", "/status.json")
#: Seconds the commit rate is averaged over.
RATE_WINDOW_S = 60.0
#: How often the page fetches itself again (milliseconds), and the no-JavaScript fallback (seconds).
REFRESH_MS = 2000
FALLBACK_REFRESH_S = 5
_REDACTED = "**********"


class StatusView(Protocol):
    """What the snapshot reads of a worker (``streamer.engine.loop.Worker`` is one)."""

    @property
    def settings(self) -> Settings:
        """The worker's settings."""
        ...

    @property
    def stats(self) -> WorkerStats:
        """The worker's counters and recent events."""
        ...

    @property
    def worker_id(self) -> str:
        """host-pid-random, as in the logs."""
        ...

    @property
    def joined(self) -> bool:
        """Whether the worker has joined its group."""
        ...

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested."""
        ...

    @property
    def policy(self) -> CommitPolicy:
        """The commit policy in effect."""
        ...

    @property
    def outage(self) -> str | None:
        """The store processing waits for, or None."""
        ...

    @property
    def running_partition(self) -> PartitionState | None:
        """Serial dispatch: the partition whose record is in the chain now."""
        ...

    @property
    def records_in_flight(self) -> int:
        """Records running now."""
        ...

    @property
    def records_waiting(self) -> int:
        """Records handed over and not started."""
        ...

    def partitions(self) -> list[tuple[TP, PartitionState]]:
        """The assigned partitions and their state."""
        ...

    def member_id(self) -> str | None:
        """The consumer's member id, or None."""
        ...


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One assigned partition."""

    topic: str
    partition: int
    #: The offset the broker acknowledged last (the next to read after a restart), and when.
    committed: int | None
    committed_at: float | None
    #: The next offset to process.
    position: int | None
    #: The high watermark: one past the last record in the partition.
    end: int | None
    lag: int | None
    lag_seconds: float | None
    #: Records finished since the last acknowledged commit: what a crash now would re-read.
    at_risk: int
    #: Records running (or retrying, or publishing their offset), and waiting to start.
    in_flight: int
    waiting: int
    #: Why the partition is not fetched: "retry", "backpressure", "checkpoint", "busy",
    #: "offset-map", "done", "stopping".
    paused_for: tuple[str, ...]
    #: Seconds until the held record's next attempt ("retry"), or None.
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """The checkpoint: the interval in effect, what it learned, how often commits land."""

    #: "interval" (fixed), "adaptive" (Young's rule), or the class name of another policy.
    policy: str
    every_records: int
    every_seconds: float
    commits: int
    errors: int
    #: Commits per second over the last minute.
    per_second: float
    #: When the last commit landed (epoch seconds), or None.
    last_at: float | None
    #: Adaptive: the measured commit cost (ms), the MTBF in use, the failed runs learned from.
    cost_ms: float | None
    mtbf_seconds: float | None
    failures: int
    #: True while work at risk is at its bound and no records are taken (commits not landing).
    blocked: bool


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """Everything the status page shows of one worker."""

    group: str
    member_id: str | None
    worker_id: str
    #: "starting" (not in the group yet), "running" or "stopping".
    state: str
    topics: tuple[str, ...]
    version: str
    started_at: float
    uptime_seconds: float
    generated_at: float
    #: Seconds since the loop last polled Kafka.
    polled_ago: float
    #: The store processing waits for ("dedup", "dead-letter"), or None.
    outage: str | None
    #: Records finished over the run, by outcome, and attempts scheduled for a retry.
    records: dict[str, int]
    retries: int
    in_flight: int
    waiting: int
    partitions: tuple[PartitionStatus, ...]
    commit: CommitStatus
    #: Newest first; the totals count those no longer kept too.
    errors: tuple[Incident, ...]
    errors_total: int
    dead_letters: tuple[DeadLettered, ...]
    dead_letters_total: int


def snapshot(
    worker: StatusView, *, version: str, now: float | None = None, monotonic: float | None = None
) -> WorkerStatus:
    """The status of ``worker`` now (epoch ``now``, ``monotonic`` on time.monotonic's clock)."""
    now = time.time() if now is None else now
    mono = time.monotonic() if monotonic is None else monotonic
    stats = worker.stats
    secrets = [s for s in worker.settings.secret_values() if s]
    uptime = max(mono - stats.started_at, 0.0)
    running = worker.running_partition
    state = "stopping" if worker.stop_requested else "running" if worker.joined else "starting"
    topics = list(stats.topics.items())
    return WorkerStatus(
        group=worker.settings.kafka.group_id,
        member_id=worker.member_id(),
        worker_id=worker.worker_id,
        state=state,
        topics=tuple(sorted(t for t, _ in topics)),
        version=version,
        started_at=now - uptime,
        uptime_seconds=uptime,
        generated_at=now,
        polled_ago=max(mono - stats.last_poll, 0.0),
        outage=worker.outage,
        records={
            outcome: sum(getattr(ts, outcome) for _, ts in topics)
            for outcome in ("ok", "dropped", "deduplicated", "skipped", "dead_lettered", "failed")
        },
        retries=stats.retries,
        in_flight=worker.records_in_flight,
        waiting=worker.records_waiting,
        partitions=tuple(
            _partition(tp, s, running, now, mono) for tp, s in sorted(worker.partitions(), key=lambda e: e[0])
        ),
        commit=_commit(worker.policy, stats, now, mono, uptime),
        errors=tuple(
            dataclasses.replace(i, text=redact(i.text, secrets)) for i in reversed(stats.errors.items())
        ),
        errors_total=stats.errors.total,
        dead_letters=tuple(
            dataclasses.replace(d, reason=redact(d.reason, secrets))
            for d in reversed(stats.dead_letters.items())
        ),
        dead_letters_total=stats.dead_letters.total,
    )


def _partition(
    tp: TP, state: PartitionState, running: PartitionState | None, now: float, mono: float
) -> PartitionStatus:
    due = state.retry_due
    return PartitionStatus(
        topic=tp[0],
        partition=tp[1],
        committed=state.acked_offset,
        committed_at=state.acked_at,
        position=state.position(),
        end=state.high_watermark,
        lag=state.lag(),
        lag_seconds=state.lag_seconds(now),
        at_risk=state.at_risk(),
        # Concurrent dispatch counts per partition; serial dispatch runs one record at a time.
        in_flight=state.in_flight if state.tracker is not None else int(running is state),
        waiting=state.waiting,
        paused_for=tuple(sorted(state.paused_for)),
        retry_in=None if due is None else max(due - mono, 0.0),
    )


def _commit(policy: CommitPolicy, stats: WorkerStats, now: float, mono: float, uptime: float) -> CommitStatus:
    times = stats.commit_times.items()
    adaptive = policy if isinstance(policy, AdaptivePolicy) else None
    if adaptive is not None:
        name = "adaptive"
    elif type(policy) is IntervalPolicy:
        name = "interval"
    else:
        name = type(policy).__name__
    cost = adaptive.cost_seconds if adaptive is not None else None
    return CommitStatus(
        policy=name,
        every_records=policy.every_records,
        every_seconds=policy.every_seconds,
        commits=stats.commits,
        errors=stats.commit_errors,
        per_second=commit_rate(
            times, forgotten=stats.commit_times.total > len(times), now=mono, uptime=uptime
        ),
        last_at=now - (mono - times[-1]) if times else None,
        cost_ms=None if cost is None else cost * 1000,
        mtbf_seconds=adaptive.mtbf_seconds if adaptive is not None else None,
        failures=policy.learned[1],
        blocked=stats.checkpoint_blocked,
    )


def commit_rate(times: Sequence[float], *, forgotten: bool, now: float, uptime: float) -> float:
    """Commits per second over the last ``RATE_WINDOW_S`` (``times``: when each landed, oldest first).

    When older commits of the window were already forgotten (``forgotten``: the buffer is full),
    the rate is over the span the buffer still covers. A worker up for less than a second counts
    a second, so that its first commits do not read as hundreds per second.
    """
    recent = [t for t in times if now - t <= RATE_WINDOW_S]
    if not recent:
        return 0.0
    span = now - recent[0] if forgotten and len(recent) == len(times) else min(RATE_WINDOW_S, uptime)
    return len(recent) / max(span, 1.0)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` replaced (longest first, so none leaks in part)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    return text


# -- JSON -----------------------------------------------------------------------------------------


def render_json(status: WorkerStatus) -> str:
    """``/status.json``: the snapshot as a JSON object (epoch seconds, durations in seconds)."""
    return json.dumps(dataclasses.asdict(status), indent=2) + "\n"


# -- HTML -----------------------------------------------------------------------------------------

#: What a cell shows for a value not known (yet).
_NONE = "&ndash;"

_CSS = """
:root { color-scheme: light dark; --muted: #6b7280; --line: #d1d5db; --bad: #b91c1c; --warn: #b45309;
  --ok: #15803d; --chip: #e5e7eb; }
@media (prefers-color-scheme: dark) { :root { --line: #374151; --chip: #374151; --muted: #9ca3af; } }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; } h2 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
.meta, .note { color: var(--muted); } .meta span { margin-right: 1.2rem; } code { font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: .6rem; margin-top: 1rem; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .5rem .8rem; min-width: 8rem; }
.card b { display: block; font-size: 1.25rem; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .7rem; text-align: right; }
th { font-weight: 600; } .l { text-align: left; }
.chip { background: var(--chip); border-radius: 9px; padding: 0 .45rem; margin-right: .25rem; }
.banner { border-left: 4px solid var(--warn); padding: .4rem .8rem; margin-top: 1rem; }
.bad { color: var(--bad); } .warn { color: var(--warn); } .ok { color: var(--ok); }
"""

# Fetches the page again and swaps its <main>: no framework, nothing loaded but the worker's page.
_SCRIPT = """
(function () {
  var live = function (text) { var el = document.getElementById("live");
    if (el) { el.textContent = text; el.className = "bad"; } };
  setInterval(function () {
    fetch(location.pathname, {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text();
    }).then(function (text) {
      var page = new DOMParser().parseFromString(text, "text/html");
      var main = page.querySelector("main");
      if (main) { document.querySelector("main").replaceWith(main); document.title = page.title; }
    }).catch(function (err) {
      var at = new Date().toISOString().slice(11, 19);
      live("not answering (" + err.message + ") since " + at + " UTC");
    });
  }, %d);
})();
"""


def render_html(status: WorkerStatus) -> str:
    """``/``: the snapshot as a page that refreshes itself."""
    s = status
    title = f"{s.group} · {s.member_id or s.worker_id} · streamer"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<noscript><meta http-equiv="refresh" content="{FALLBACK_REFRESH_S}"></noscript>
<style>{_CSS}</style>
</head>
<body>
<main>
{_header(s)}
{_banners(s)}
{_cards(s)}
<h2>Partitions</h2>
{_partitions(s)}
<h2>Commits</h2>
{_commits(s.commit)}
<h2>Last errors <span class="note">({s.errors_total} in this run)</span></h2>
{_errors(s.errors)}
<h2>Last dead-lettered records <span class="note">({s.dead_letters_total} in this run)</span></h2>
{_dead_letters(s.dead_letters)}
<p class="note">Also <a href="/status.json">/status.json</a>, <a href="/metrics">/metrics</a>,
<a href="/healthz">/healthz</a>, <a href="/readyz">/readyz</a>. This page never shows record keys,
values or headers, nor secrets: record errors name exception types only (the log has the message).</p>
</main>
<script>{_SCRIPT % REFRESH_MS}</script>
</body>
</html>
"""


def _header(s: WorkerStatus) -> str:
    state = {"running": "ok", "starting": "warn", "stopping": "warn"}.get(s.state, "")
    return f"""<h1>{_e(s.group)}</h1>
<div class="meta"><span>member <code id="member">{_e(s.member_id or "(not in the group)")}</code></span>
<span>worker <code>{_e(s.worker_id)}</code></span>
<span>state <b id="state" class="{state}">{_e(s.state)}</b></span>
<span>topics {_e(", ".join(s.topics))}</span></div>
<div class="meta"><span>streamer {_e(s.version)}</span>
<span>up {_duration(s.uptime_seconds)} (since {_clock(s.started_at)})</span>
<span>polled {_duration(s.polled_ago)} ago</span>
<span id="live" class="ok">as of {_clock(s.generated_at)}</span></div>"""


def _banners(s: WorkerStatus) -> str:
    lines = []
    if s.outage is not None:
        lines.append(
            f"Processing waits for the {_e(s.outage)} store (fail closed): no records are taken "
            "and nothing past them is committed until it is back."
        )
    if s.commit.blocked:
        lines.append("Commits are not landing: work at risk reached its bound, no records are taken.")
    if s.state == "stopping":
        lines.append("Stopping: finishing the records in hand, then the final commit.")
    return "\n".join(f'<div class="banner">{line}</div>' for line in lines)


def _cards(s: WorkerStatus) -> str:
    lags = [p.lag for p in s.partitions if p.lag is not None]
    ages = [p.lag_seconds for p in s.partitions if p.lag_seconds is not None]
    cards = [
        ("partitions", _num(len(s.partitions))),
        ("lag (records)", _num(sum(lags)) if lags else _NONE),
        ("oldest waiting", _duration(max(ages)) if ages else _NONE),
        ("work at risk", _num(sum(p.at_risk for p in s.partitions))),
        ("in flight / waiting", f"{_num(s.in_flight)} / {_num(s.waiting)}"),
        ("handled", _num(s.records["ok"])),
        ("dead-lettered", _num(s.records["dead_lettered"])),
        ("commits / s", f"{s.commit.per_second:.2f}"),
    ]
    body = "".join(f'<div class="card">{_e(label)}<b>{value}</b></div>' for label, value in cards)
    return f'<div class="cards" id="cards">{body}</div>'


def _partitions(s: WorkerStatus) -> str:
    if not s.partitions:
        return '<p class="note" id="partitions">No partitions assigned.</p>'
    head = _head(
        "l:partition", "committed", "position", "end", "lag", "lag (time)", "at risk", "in flight",
        "waiting", "l:paused for", "l:last commit",
    )  # fmt: skip
    rows = []
    for p in s.partitions:
        reasons = "".join(f'<span class="chip">{_e(r)}</span>' for r in p.paused_for)
        if p.retry_in is not None:
            reasons += f' <span class="note">next attempt in {_duration(p.retry_in)}</span>'
        cells = (
            _td(_e(f"{p.topic}[{p.partition}]"), "l"),
            _td(_opt(p.committed), "committed"),
            _td(_opt(p.position), "position"),
            _td(_opt(p.end), "end"),
            _td(_opt(p.lag), "lag"),
            _td(_NONE if p.lag_seconds is None else _duration(p.lag_seconds)),
            _td(_num(p.at_risk), "at-risk"),
            _td(_num(p.in_flight)),
            _td(_num(p.waiting)),
            _td(reasons or _NONE, "l paused"),
            _td(_NONE if p.committed_at is None else _clock(p.committed_at), "l"),
        )
        rows.append(f'<tr data-tp="{_e(p.topic)}/{p.partition}">{"".join(cells)}</tr>')
    return f'<table id="partitions">{head}{"".join(rows)}</table>'


def _commits(c: CommitStatus) -> str:
    every = [f"{_num(c.every_records)} records"] if c.every_records else []
    every += [f"{c.every_seconds:.3g} s"] if c.every_seconds else []
    learned = ""
    if c.policy == "adaptive":
        cost = "not measured yet" if c.cost_ms is None else f"{c.cost_ms:.3f} ms"
        mtbf = _NONE if c.mtbf_seconds is None else _duration(c.mtbf_seconds)
        learned = (
            f"<br>learned: every {c.every_seconds:.3g} s = &radic;(2 &times; commit cost {cost} "
            f"&times; MTBF {mtbf}); {c.failures} failed runs observed"
        )
    last = "none yet" if c.last_at is None else _clock(c.last_at)
    errors = f'<span class="bad">{_num(c.errors)} failed</span>' if c.errors else "0 failed"
    return (
        f'<p id="commits">Policy <b>{_e(c.policy)}</b>: commit every '
        f"{_e(' or '.join(every) or 'revoke / stop only')}{learned}<br>"
        f"{_num(c.commits)} commits landed, {errors}; {c.per_second:.2f} per second over the last "
        f"minute; last at {last}</p>"
    )


def _errors(errors: Sequence[Incident]) -> str:
    if not errors:
        return '<p class="note" id="errors">None.</p>'
    rows = "".join(
        "<tr>"
        + _td(_clock(i.at), "l")
        + _td(_e(i.kind), "l")
        + _td(_e(_where(i.topic, i.partition, i.offset)), "l")
        + _td(_e(i.text), "l")
        + "</tr>"
        for i in errors
    )
    return f'<table id="errors">{_head("l:time", "l:kind", "l:where", "l:error")}{rows}</table>'


def _dead_letters(parked: Sequence[DeadLettered]) -> str:
    if not parked:
        return '<p class="note" id="dead-letters">None.</p>'
    rows = "".join(
        "<tr>"
        + _td(_clock(d.at), "l")
        + _td(_e(_where(d.topic, d.partition, d.offset)), "l")
        + _td(_e(d.dead_letter_topic), "l")
        + _td(_num(d.attempts))
        + _td(_e(d.reason), "l")
        + "</tr>"
        for d in parked
    )
    head = _head("l:time", "l:record", "l:parked in", "attempts", "l:reason")
    return f'<table id="dead-letters">{head}{rows}</table>'


def _head(*names: str) -> str:
    """A header row; a name ``l:text`` is left-aligned."""
    cells = "".join(
        f'<th class="l">{_e(n[2:])}</th>' if n.startswith("l:") else f"<th>{_e(n)}</th>" for n in names
    )
    return f"<tr>{cells}</tr>"


def _td(html: str, cls: str = "") -> str:
    """A cell of ``html`` (escaped by the caller)."""
    return f'<td class="{cls}">{html}</td>' if cls else f"<td>{html}</td>"


def _e(text: str) -> str:
    return escape(text, quote=True)


def _where(topic: str | None, partition: int | None, offset: int | None) -> str:
    if topic is None:
        return ""
    return f"{topic}[{partition}]" + ("" if offset is None else f"@{offset}")


def _num(value: int) -> str:
    return f"{value:,}"


def _opt(value: int | None) -> str:
    return _NONE if value is None else _num(value)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
