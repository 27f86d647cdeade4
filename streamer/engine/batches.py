"""Batch handlers: a topic whose handler takes a list of records, in fetch order.

Records of a batch topic collect in a buffer until it holds ``max_records`` or its oldest record
waited ``max_wait`` seconds; then the handler gets them in one call, on the processing thread
(an ``async def`` batch handler runs on an event loop of the processing thread's own).

A batch succeeds as a whole, or the handler raises ``BatchFailed`` naming the records that
failed (their indexes in the list): the others are done, the named ones are tried again as a
smaller batch. Any other exception fails the whole batch. Failed records are retried with the
topic's retry policy (the processing thread waits out the backoff; the loop keeps the group),
then parked in the dead-letter topic one by one. No offset of a batch is published before every
record of it finished or was parked, and marks (dedup) land first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, cast

import structlog

from streamer.chain import BatchHandler, is_async
from streamer.dedup import ClaimStatus, DedupKey, DedupStage
from streamer.engine.partition import PartitionState
from streamer.engine.processor import Batch, Processor, Retry
from streamer.errors import DropRecord, PermanentError, RetryableError, StreamerError
from streamer.message import Message
from streamer.middleware.decode import Decoder
from streamer.middleware.retry import RetryPolicy
from streamer.stats import error_types

log = structlog.get_logger("streamer.batches")


class BatchFailed(StreamerError):
    """Raised by a batch handler: the records at ``indexes`` failed, the others are done.

    ``cause`` decides whether they are retried, as for one record (the ``[retry] retry_on``
    types); without a cause they are.
    """

    def __init__(self, indexes: Iterable[int], cause: BaseException | None = None) -> None:
        self.indexes = sorted(set(indexes))
        self.cause = cause
        super().__init__(
            f"{len(self.indexes)} record(s) of the batch failed"
            + (f": {type(cause).__name__}: {cause}" if cause else "")
        )


class BatchChain:
    """A topic's batch handler and how its batches are cut, decoded and retried."""

    __slots__ = ("decoder", "func", "is_async", "max_records", "max_wait", "policy")

    def __init__(
        self,
        func: BatchHandler,
        *,
        max_records: int,
        max_wait: float,
        decoder: Decoder | None,
        policy: RetryPolicy,
    ) -> None:
        self.func = func
        self.is_async = is_async(func)
        self.max_records = max_records
        self.max_wait = max_wait
        self.decoder = decoder
        self.policy = policy

    def __call__(self, msg: Message) -> None:
        raise TypeError("a batch chain takes a list of records, not one")  # never called per record


Item = tuple[Message, PartitionState]


class BatchProcessor(Processor):
    """Serial dispatch with batch topics: their records are buffered and handed over as lists."""

    def __init__(self, chains: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(chains, *args, **kwargs)
        self._batch_chains = {t: c for t, c in chains.items() if isinstance(c, BatchChain)}
        self._buffers: dict[str, list[Item]] = {t: [] for t in self._batch_chains}
        self._since: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def idle(self) -> bool:
        """Nothing running, queued or buffered."""
        return super().idle and not self._since

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until nothing runs, is queued or buffered."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._busy and not self._inbox and not self._since, timeout)

    # -- the processing thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(
                    lambda: bool(self._inbox) or self._closed or self._flush_wanted or self._due(),
                    self._wait(),
                )
                work = self._inbox.popleft() if self._inbox and not self._stop.is_set() else None
                if work is not None:
                    self._backlog = max(self._backlog - (1 if isinstance(work, Retry) else len(work)), 0)
                self._busy = True
                self._cv.notify_all()
            try:
                if work is not None:
                    self._work(work)
                # A stop or a revoke runs what is buffered: accepted records are not re-read.
                self._flush_buffers(everything=self._closed or self._flush_wanted)
            except BaseException as exc:  # noqa: BLE001 - a bug: stop the worker with it
                if self.failure is None:
                    self.failure = exc
                self._stop.set()
            finally:
                self.current = self.current_key = None
                with self._cv:
                    self._busy = False
                    self._flush_wanted = False
                    self._cv.notify_all()
            if self.failure is not None:
                self.stop()
            with self._cv:
                if self._closed and not self._inbox and not self._since:
                    self._backlog = 0
                    self._cv.notify_all()
                    if self._loop is not None:
                        self._loop.close()
                    return

    def _wait(self) -> float | None:
        if not self._since:
            return None
        return max(
            min(self._since[t] + self._batch_chains[t].max_wait for t in self._since) - time.monotonic(), 0
        )

    def _due(self) -> bool:
        now = time.monotonic()
        return any(now >= since + self._batch_chains[t].max_wait for t, since in self._since.items())

    def _work(self, work: Batch | Retry) -> None:
        if isinstance(work, Retry):
            self._retry(work)
            return
        others = []
        batch_chains, buffers = self._batch_chains, self._buffers
        now = time.monotonic()
        for raw in work:
            topic = raw.topic()
            if topic not in batch_chains:
                others.append(raw)
                continue
            admitted = self._admit(raw, work.states)
            if admitted is None:
                continue
            msg, state = admitted
            if state.skip and msg[2] in state.skip:
                self._topic_stats[topic].skipped += 1
                buffers[topic].append((msg, state))  # published in order with its batch
                continue
            buffers[topic].append(admitted)
            self._since.setdefault(topic, now)
        if others:
            rest = Batch(others, work.states)
            if self.dedup is None:
                self._batch(rest)
            else:
                self._batch_dedup(rest, self.dedup)

    def _flush_buffers(self, *, everything: bool) -> None:
        now = time.monotonic()
        for topic, chain in self._batch_chains.items():
            buffer = self._buffers[topic]
            while len(buffer) >= chain.max_records:
                self._run_batch(chain, buffer[: chain.max_records])
                del buffer[: chain.max_records]
            since = self._since.get(topic)
            if buffer and (everything or (since is not None and now >= since + chain.max_wait)):
                self._run_batch(chain, buffer[:])
                buffer.clear()
            if buffer:
                self._since[topic] = self._since.get(topic, now)
            else:
                self._since.pop(topic, None)

    def _run_batch(self, chain: BatchChain, items: list[Item]) -> None:
        """Run one batch to its end (done, retried, parked), then publish its partitions' offsets."""
        if self._stop.is_set() and not self._closed:
            return
        items = [(m, s) for m, s in items if not s.revoked]
        dedup = self.dedup
        keys = [dedup.key(m) for m, _ in items] if dedup is not None else []
        todo = [i for i, (m, s) in enumerate(items) if not (s.skip and m[2] in s.skip)]
        if dedup is not None and todo:
            todo = self._claimed(dedup, [keys[i] for i in todo], todo, items)
        msgs = [m for m, _ in items]
        if chain.decoder is not None:
            decoded = self._decoded(chain.decoder, msgs, items, todo, keys)
            if decoded is None:
                return
            todo = decoded
        if todo and not self._attempts(chain, msgs, items, todo, keys):
            return
        if dedup is not None:
            finished = [keys[i] for i in todo]
            if finished:
                dedup.mark_done(finished)
        last = {state: msg for msg, state in items}  # each partition's records are in offset order
        for state, msg in last.items():
            self._finished(state, msg)
        self._save_highwater(msgs)

    def _claimed(
        self, dedup: DedupStage, keys: list[DedupKey], todo: list[int], items: list[Item]
    ) -> list[int]:
        statuses = self._claim(dedup, keys)
        run = []
        for i, key, claimed in zip(todo, keys, statuses, strict=True):
            status = dedup.resolve_contested(key) if claimed is ClaimStatus.CONTESTED else claimed
            if status is ClaimStatus.DONE:
                self._topic_stats[items[i][0][0]].deduplicated += 1
            else:
                run.append(i)
        return run

    def _decoded(
        self, decoder: Decoder, msgs: list[Message], items: list[Item], todo: list[int], keys: list[DedupKey]
    ) -> list[int] | None:
        """Decode each record to run; one that cannot be decoded is parked at once."""
        run = []
        for i in todo:
            try:
                msgs[i] = msgs[i]._replace(decoded=decoder(msgs[i][4]))
            except Exception as exc:  # noqa: BLE001 - a record that cannot be decoded is parked
                error = PermanentError(f"cannot decode value: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                if not self._park(
                    msgs[i], items[i][1], keys[i] if keys else None, error, self._stats_of(msgs[i])
                ):
                    return None
                continue
            run.append(i)
        return run

    def _attempts(
        self, chain: BatchChain, msgs: list[Message], items: list[Item], todo: list[int], keys: list[DedupKey]
    ) -> bool:
        """Call the handler until every record of ``todo`` is done or parked; False if one failed."""
        pending, attempt, policy = list(todo), 1, chain.policy
        topic_stats = self._stats_of(msgs[pending[0]])
        while pending:
            batch = [msgs[i] if attempt == 1 else msgs[i]._replace(attempt=attempt) for i in pending]
            failed, cause = self._call(chain, batch, pending, items)
            topic_stats.ok += len(pending) - len(failed)
            if not failed:
                return True
            if (
                policy.retryable(cause)
                and attempt < policy.max_attempts
                and not isinstance(cause, PermanentError)
            ):
                delay = policy.backoff(attempt)
                self._stats.retries += len(failed)
                first = msgs[failed[0]]
                self._stats.error(
                    "record",
                    f"batch attempt {attempt} failed for {len(failed)} records, retry in {delay:.3g} s: "
                    + error_types(cause),
                    first[0],
                    first[1],
                    first[2],
                )
                log.info(
                    "batch records will be retried",
                    topic=msgs[failed[0]][0],
                    records=len(failed),
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    error=f"{type(cause).__name__}: {cause}",
                )
                if self._stop.wait(delay) and not self._closed:
                    return False
                attempt, pending = attempt + 1, failed
                continue
            reason = (
                cause
                if isinstance(cause, PermanentError)
                else PermanentError(f"gave up after {attempt} attempts: {type(cause).__name__}: {cause}")
            )
            reason.__cause__ = cause
            for i in failed:
                msg = msgs[i]._replace(attempt=attempt)
                if not self._park(msg, items[i][1], keys[i] if keys else None, reason, topic_stats):
                    return False
            return True
        return True

    def _call(
        self, chain: BatchChain, batch: list[Message], pending: list[int], items: list[Item]
    ) -> tuple[list[int], BaseException]:
        """One call of the handler: the indexes (into ``items``) that failed, and why."""
        self.current = items[pending[0]][1]
        self.chain_started = time.perf_counter()
        try:
            if chain.is_async:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(cast(Awaitable[object], chain.func(batch)))
            else:
                result = chain.func(batch)
            if result is not None:
                raise TypeError(  # noqa: TRY301 - fails the batch like any handler error
                    "a batch handler returns None: batch handlers cannot emit records (use a "
                    f"per-record handler for consume-transform-produce); got {type(result).__name__}"
                )
        except DropRecord:
            self._stats_of(batch[0]).dropped += len(batch)
            self._stats_of(batch[0]).ok -= len(batch)  # counted as dropped, not handled
            return [], DropRecord()
        except BatchFailed as failed:
            bad = [pending[j] for j in failed.indexes if 0 <= j < len(pending)]
            return bad, failed.cause or RetryableError(str(failed))
        except Exception as exc:  # noqa: BLE001 - the whole batch failed
            return list(pending), exc
        finally:
            self.chain_started = None
            self.current = None
        return [], DropRecord()

    def _stats_of(self, msg: Message) -> Any:
        return self._topic_stats[msg[0]]
