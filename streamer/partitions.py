"""What the worker knows about each assigned partition, and the items of a poll batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from streamer.dedup import ClaimStatus
from streamer.message import Message
from streamer.offsets import PartitionOffsets


@dataclass
class PartitionState:
    """What the worker knows about one assigned partition."""

    offsets: PartitionOffsets
    #: Bounded runs: the end offset snapshotted at assignment; None in unbounded runs.
    end: int | None = None
    done: bool = False
    #: Set when the partition is revoked or lost while records of it are still in the batch.
    gone: bool = False
    #: Offsets below this were processed by this group before (a crash, a handover): re-reads.
    reprocess_below: int = -1
    #: Timestamp (ms) of the last record processed: the base of lag in seconds.
    last_ts: int | None = None
    #: High watermark from librdkafka statistics, or asked of the broker while paused.
    high_watermark: int | None = None
    #: First offset processed in this assignment: the base of work at risk before any commit.
    first_offset: int | None = None
    #: librdkafka's own lag figure (from statistics): 0 also past transaction markers.
    stats_lag: int | None = None
    assigned_at: float = field(default_factory=time.time)
    #: Offset the broker acknowledged last, and when (epoch seconds).
    acked_offset: int | None = None
    acked_at: float | None = None
    #: Why the partition is paused: "done" (bounded run), "retry", "outage", "keepalive".
    paused_for: set[str] = field(default_factory=set)
    #: A record waiting for its next attempt: (monotonic due time, the item). Blocks the partition.
    retry: tuple[float, Item] | None = None

    @property
    def paused(self) -> bool:
        """Whether the partition is paused for any reason."""
        return bool(self.paused_for)


#: One admitted record of a batch: the message, its partition, its dedup key and claim status.
Item = tuple[Message, PartitionState, bytes | None, ClaimStatus | None]
