"""A Jepsen-style checker of one chaos run: what was produced, what the workers did, what was committed.

A run's history has five parts, gathered by the scenario while the nemesis (kills, pauses, outages)
does its work:

- the ids the producer had **acknowledged** (acks=all), and where (partition, offset): each of them
  must end up effected or parked; ids whose delivery failed or was never confirmed are
  *indeterminate* (they may or may not be in the topic) and are only reported;
- the **effects** the workers wrote, one per handled record: partition, offset, id, which worker
  incarnation handled it and when (``time.monotonic_ns()``, one clock for every process on Linux:
  when the effect was written and, in the worker app's newer lines, when the handler was entered),
  and the record's Kafka key;
- the ids **parked** in the dead-letter topic;
- the group's **committed offsets**, sampled every ~100 ms;
- the **kills**: which worker incarnation was SIGKILLed, and when.

``check`` turns it into figures and a list of violations of the scenario's ``Promise``:

- **lost**: acknowledged, neither effected nor parked, and the group committed past it: no run will
  ever handle it. Always a violation. An id not handled that the group has *not* committed past
  is **unfinished** instead (the next run handles it): a violation too, as the runs are meant to
  finish, but not a loss.
- **duplicate effects**: effects of an id beyond its first. Each is explained by the worker that
  wrote the id's previous effect: if that incarnation was SIGKILLed before this effect, it is a
  re-read caused by that kill (counted per kill and per partition the victim owned); otherwise it
  is *unexplained* (a clean stop, a revoke, a pause or an outage caused it).
- **committed offsets going backwards** in a partition between two samples. Always a violation.
- with ``Promise.key_order`` (``ordering = "key"``): each key's records (per partition) must be
  handled one at a time in offset order. Only an id's *first* handling counts (a re-read after a
  SIGKILL runs again what was handled before, out of order by design): sorted by offset, each
  record's first handling must start after the previous one's effect was written.
- with the end offsets and the committed offsets after the last stop: partitions not committed to
  their end.

The module is plain logic (no Kafka, no processes), so its own tests run in milliseconds.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Effect",
    "History",
    "KillFigures",
    "Parked",
    "Promise",
    "Result",
    "Sample",
    "check",
    "parse_effects",
]

#: Ids shown in a failure message, at most, per kind of violation.
SHOWN_IDS = 20
#: Samples of the committed offsets a run must have taken for "never backwards" to mean something.
MIN_SAMPLES = 10


@dataclass(frozen=True, slots=True)
class Effect:
    """One handled record: ``partition offset id worker monotonic_ns [started_ns key]`` in an
    effects file (``key`` ``-``: the record had none)."""

    partition: int
    offset: int
    id: int
    worker: str
    #: when the effect was written (the handler's work was done)
    at_ns: int
    #: when the handler was entered; None in lines without it
    started_ns: int | None = None
    #: the record's Kafka key (ASCII); None if it had none or the line does not say
    key: str | None = None


def parse_effects(data: bytes) -> list[Effect]:
    """The effects of an effects file's bytes; a last line without its newline is not complete yet."""
    effects = []
    for line in data.split(b"\n")[:-1]:
        fields = line.split()
        partition, offset, record, worker, at_ns = fields[:5]
        started_ns, key = (int(fields[5]), fields[6].decode()) if len(fields) == 7 else (None, "-")
        effects.append(
            Effect(
                int(partition),
                int(offset),
                int(record),
                worker.decode(),
                int(at_ns),
                started_ns,
                None if key == "-" else key,
            )
        )
    return effects


@dataclass(frozen=True, slots=True)
class Parked:
    """One record of the dead-letter topic: the ``message-id`` it carries and its value."""

    id: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Sample:
    """The committed offsets of the group's partitions at one moment (partitions without one left out)."""

    at_ns: int
    offsets: Mapping[int, int]


@dataclass
class History:
    """Everything a chaos run observed; see the module docstring."""

    acked: set[int]
    effects: list[Effect]
    #: id -> (partition, offset) where the broker acknowledged it
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    indeterminate: set[int] = field(default_factory=set)
    parked: list[Parked] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    sample_errors: int = 0
    #: worker incarnation -> monotonic ns of its SIGKILL
    kills: dict[str, int] = field(default_factory=dict)
    #: high watermarks of the topic once the producer stopped
    end_offsets: dict[int, int] | None = None
    #: committed offsets once every worker stopped
    final_committed: dict[int, int] | None = None


@dataclass(frozen=True)
class Promise:
    """What a scenario's delivery contract allows; None: no limit of that kind."""

    #: Effects one SIGKILL may repeat, per partition the victim owned (dedup off: the re-read bound).
    per_kill_per_partition: int | None = None
    #: Effects one SIGKILL may repeat in all (dedup on: the duplicate window).
    per_kill_total: int | None = None
    #: Effects repeated without a kill to explain them, per partition (clean stops, revokes: 0).
    unexplained_per_partition: int = 0
    #: The ids that must be parked, each once; None: whatever is parked is not checked.
    parked: frozenset[int] | None = frozenset()
    #: ``ordering = "key"``: each key's first handlings one at a time, in offset order.
    key_order: bool = False


@dataclass(frozen=True)
class KillFigures:
    """What one SIGKILL cost: effects repeated because of it, per partition."""

    worker: str
    at_ns: int
    repeated: Mapping[int, int]

    @property
    def total(self) -> int:
        """Effects repeated because of this kill, over all partitions."""
        return sum(self.repeated.values())

    @property
    def worst_partition(self) -> int:
        """The most effects repeated in one partition because of this kill."""
        return max(self.repeated.values(), default=0)


@dataclass(frozen=True)
class Result:
    """The figures of a run and the violations of its promise."""

    acked: int
    indeterminate: int
    effects: int
    effected: int
    parked: int
    lost: tuple[int, ...]
    unfinished: tuple[int, ...]
    duplicates: int
    duplicated: Mapping[int, int]
    kills: tuple[KillFigures, ...]
    unexplained: Mapping[int, tuple[int, ...]]
    backwards: tuple[str, ...]
    samples: int
    sample_errors: int
    violations: tuple[str, ...]
    #: With ``Promise.key_order``: (partition, key) lanes checked, and records whose first
    #: handling broke their key's order (overlapped or preceded an earlier offset's); else None.
    key_order: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        """Whether the run kept its promise."""
        return not self.violations

    def row(self) -> dict[str, str]:
        """The run's figures as the columns of the chaos summary table."""
        worst = max(self.kills, key=lambda k: k.worst_partition, default=None)
        return {
            "acked": f"{self.acked:,}",
            "effects": f"{self.effects:,}",
            "lost": str(len(self.lost))
            + (f" (+{len(self.unfinished):,} unfinished)" if self.unfinished else ""),
            "dup effects": f"{self.duplicates:,}",
            "kills": str(len(self.kills)),
            "worst kill (part/total)": f"{worst.worst_partition}/{worst.total}" if worst else "-",
            "unexplained dups": str(sum(len(ids) for ids in self.unexplained.values())),
            "backwards": str(len(self.backwards)),
            "samples (err)": f"{self.samples} ({self.sample_errors})",
            "parked": str(self.parked),
            "key order (keys/breaks)": (
                "-" if self.key_order is None else f"{self.key_order[0]}/{self.key_order[1]}"
            ),
        }

    def describe(self, seed: int) -> str:
        """A failure message: the seed, the figures, each violation with the ids involved."""
        figures = ", ".join(f"{k} {v}" for k, v in self.row().items())
        lines = [f"seed {seed} (rerun with CHAOS_SEED={seed}): {figures}"]
        if self.kills:
            repeats = ", ".join(f"{k.worker} {dict(sorted(k.repeated.items()))}" for k in self.kills)
            lines.append(f"  effects repeated per kill (partition: records): {repeats}")
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


def check(history: History, promise: Promise) -> Result:
    """Compare a run's history with its promise; see the module docstring for the figures."""
    effects = sorted(history.effects, key=lambda e: e.at_ns)
    counts = Counter(e.id for e in effects)
    parked_counts = Counter(p.id for p in history.parked)
    violations: list[str] = []

    lost, unfinished = _unprocessed(history, history.acked - counts.keys() - parked_counts.keys())
    if lost:
        violations.append(
            f"{len(lost)} acknowledged ids neither effected nor parked, and committed past: {_ids(lost)}"
        )
    if unfinished:
        violations.append(
            f"{len(unfinished)} acknowledged ids not handled yet (not committed past: the next run "
            f"would handle them): {_ids(unfinished)}"
        )
    unknown = sorted(counts.keys() - history.acked - history.indeterminate)
    if unknown:
        violations.append(f"{len(unknown)} effected ids were never produced: {_ids(unknown)}")
    kills, unexplained = _explain_duplicates(effects, history.kills)
    violations += _duplicate_violations(kills, unexplained, promise)
    backwards = tuple(_backwards(history.samples))
    violations += _commit_violations(history, backwards, promise)
    if promise.parked is not None:
        violations += _parked_violations(parked_counts, promise.parked)
    key_order = None
    if promise.key_order:
        lanes, breaks = _key_order_breaks(effects)
        key_order = (lanes, len(breaks))
        if breaks:
            violations.append(
                f'{len(breaks)} records broke their key\'s order (ordering "key": one at a time, in '
                f"offset order; first handlings only): {'; '.join(breaks[: SHOWN_IDS // 2])}"
                + ("; ..." if len(breaks) > SHOWN_IDS // 2 else "")
            )
        if not lanes:
            violations.append("no keyed records were handled: the key order proves nothing")

    return Result(
        acked=len(history.acked),
        indeterminate=len(history.indeterminate),
        effects=len(effects),
        effected=len(counts),
        parked=len(parked_counts),
        lost=lost,
        unfinished=unfinished,
        duplicates=len(effects) - len(counts),
        duplicated={record: n for record, n in counts.items() if n > 1},
        kills=kills,
        unexplained={p: tuple(ids) for p, ids in unexplained.items()},
        backwards=backwards,
        samples=len(history.samples),
        sample_errors=history.sample_errors,
        violations=tuple(violations),
        key_order=key_order,
    )


def _unprocessed(history: History, ids: set[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split acknowledged ids nobody handled into lost (committed past) and unfinished (not yet)."""
    final = history.final_committed
    lost, unfinished = [], []
    for record in sorted(ids):
        position = history.positions.get(record)
        if final is not None and position is not None and position[1] >= final.get(position[0], 0):
            unfinished.append(record)
        else:
            lost.append(record)
    return tuple(lost), tuple(unfinished)


def _duplicate_violations(
    kills: Sequence[KillFigures], unexplained: Mapping[int, Sequence[int]], promise: Promise
) -> list[str]:
    """Repeated effects beyond what the promise allows, per kill and without a kill."""
    violations = []
    for kill in kills:
        bound = promise.per_kill_per_partition
        over = {p: n for p, n in sorted(kill.repeated.items()) if bound is not None and n > bound}
        if over:
            violations.append(
                f"the SIGKILL of {kill.worker} made partitions re-run more than {bound} records each: "
                f"{over} (partition: records)"
            )
        if promise.per_kill_total is not None and kill.total > promise.per_kill_total:
            violations.append(
                f"the SIGKILL of {kill.worker} repeated {kill.total} effects, more than the window of "
                f"{promise.per_kill_total}: per partition {dict(sorted(kill.repeated.items()))}"
            )
    for partition, ids in sorted(unexplained.items()):
        if len(ids) > promise.unexplained_per_partition:
            violations.append(
                f"partition {partition}: {len(ids)} effects repeated without a SIGKILL to explain "
                f"them (allowed {promise.unexplained_per_partition}): ids {_ids(ids)}"
            )
    return violations


def _commit_violations(history: History, backwards: Sequence[str], promise: Promise) -> list[str]:
    """Committed offsets that went backwards, too few samples, partitions not committed to the end."""
    violations = []
    if backwards:
        violations.append(f"committed offsets went backwards: {'; '.join(backwards[:10])}")
    if len(history.samples) < MIN_SAMPLES:
        violations.append(
            f"only {len(history.samples)} samples of the committed offsets ({history.sample_errors} "
            f"failed): 'never backwards' proves nothing"
        )
    if history.final_committed is not None:
        violations += _uncommitted(history, history.final_committed, promise.unexplained_per_partition)
    if history.end_offsets is not None and history.final_committed is not None:
        final = history.final_committed
        behind = {p: (final.get(p), end) for p, end in history.end_offsets.items() if final.get(p, 0) != end}
        if behind:
            violations.append(
                f"committed offsets after the last stop differ from the end offsets: {behind} "
                f"(partition: (committed, end))"
            )
    return violations


def _uncommitted(history: History, final: Mapping[int, int], allowed: int) -> list[str]:
    """Partitions whose records were handled past the offset committed after the last stop.

    A clean stop commits everything finished: the first offset nobody handled (effected or parked)
    is where a restart must resume. Committed lower, the restart re-runs finished records: no more
    than ``allowed`` (the repeats the promise allows without a kill).
    """
    handled: dict[int, set[int]] = defaultdict(set)
    for effect in history.effects:
        handled[effect.partition].add(effect.offset)
    for parked in history.parked:
        if (position := history.positions.get(parked.id)) is not None:
            handled[position[0]].add(position[1])
    violations = []
    for partition, offsets in sorted(handled.items()):
        committed = final.get(partition, 0)
        gap = committed
        while gap in offsets:
            gap += 1
        if gap - committed > allowed:
            violations.append(
                f"partition {partition}: handled without a gap up to offset {gap}, committed {committed} "
                f"after the last stop: a restart would re-run {gap - committed} finished records"
            )
    return violations


def _parked_violations(parked: Counter[int], expected: frozenset[int]) -> list[str]:
    """Ids parked that should not be, not parked that should be, or parked twice."""
    violations = []
    unexpected = sorted(parked.keys() - expected)
    missing = sorted(expected - parked.keys())
    twice = sorted(record for record, n in parked.items() if n > 1)
    if unexpected:
        violations.append(f"{len(unexpected)} ids parked that should not be: {_ids(unexpected)}")
    if missing:
        violations.append(f"{len(missing)} ids not parked that should be: {_ids(missing)}")
    if twice:
        violations.append(f"{len(twice)} ids parked more than once: {_ids(twice)}")
    return violations


def _explain_duplicates(
    effects: Sequence[Effect], killed: Mapping[str, int]
) -> tuple[tuple[KillFigures, ...], dict[int, list[int]]]:
    """Attribute each repeated effect to the kill of the worker that wrote the id's previous effect.

    ``effects`` are in time order. Returns the figures of every kill (also those that repeated
    nothing) and, per partition, the ids repeated with no kill to explain them.
    """
    last_writer: dict[int, str] = {}
    per_kill: dict[str, Counter[int]] = {worker: Counter() for worker in killed}
    unexplained: dict[int, list[int]] = defaultdict(list)
    for effect in effects:
        previous = last_writer.get(effect.id)
        last_writer[effect.id] = effect.worker
        if previous is None:
            continue
        killed_at = killed.get(previous)
        if killed_at is not None and killed_at <= effect.at_ns and previous != effect.worker:
            per_kill[previous][effect.partition] += 1
        else:
            unexplained[effect.partition].append(effect.id)
    kills = tuple(
        KillFigures(worker, at_ns, dict(per_kill[worker]))
        for worker, at_ns in sorted(killed.items(), key=lambda item: item[1])
    )
    return kills, dict(unexplained)


def _key_order_breaks(effects: Sequence[Effect]) -> tuple[int, list[str]]:
    """The (partition, key) lanes of the first handlings in ``effects`` (in time order), and every
    record whose first handling did not come after the one of the previous offset of its key.

    After the previous offset's effect was written means: its own effect written later and, when
    the line says when the handler was entered, entered after it (the two never overlapped).
    Keyless records form one lane per partition (they are ordered by partition).
    """
    first: dict[int, Effect] = {}
    for effect in effects:
        first.setdefault(effect.id, effect)
    lanes: dict[tuple[int, str | None], list[Effect]] = defaultdict(list)
    for effect in first.values():
        lanes[effect.partition, effect.key].append(effect)
    breaks = []
    for (partition, key), lane in sorted(lanes.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        lane.sort(key=lambda e: e.offset)
        for before, after in itertools.pairwise(lane):
            entered = after.at_ns if after.started_ns is None else after.started_ns
            if after.at_ns <= before.at_ns:
                how, by = "finished", before.at_ns - after.at_ns
            elif entered < before.at_ns:
                how, by = "started", before.at_ns - entered
            else:
                continue
            breaks.append(
                f"partition {partition} key {key or '-'}: offset {after.offset} (id {after.id}, "
                f"{after.worker}) {how} {by / 1e6:.1f} ms before offset {before.offset} (id "
                f"{before.id}, {before.worker}) finished"
            )
    return sum(1 for (_, key) in lanes if key is not None), breaks


def _backwards(samples: Iterable[Sample]) -> list[str]:
    """Every time a partition's committed offset was lower than in an earlier sample."""
    highest: dict[int, tuple[int, int]] = {}
    moves = []
    first: int | None = None
    for sample in samples:
        first = sample.at_ns if first is None else first
        for partition, offset in sample.offsets.items():
            seen_at, seen = highest.get(partition, (sample.at_ns, -1))
            if offset < seen:
                moves.append(
                    f"partition {partition}: {seen} at {(seen_at - first) / 1e9:.2f}s, then {offset} at "
                    f"{(sample.at_ns - first) / 1e9:.2f}s"
                )
            else:
                highest[partition] = (sample.at_ns, offset)
    return moves


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(map(str, ids[:SHOWN_IDS]))
    return f"[{shown}{', ...' if len(ids) > SHOWN_IDS else ''}]"
