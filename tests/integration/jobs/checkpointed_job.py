"""A batch job over a range of numbers, checkpointed with streamer.checkpoint.JobCheckpoint.

argv: REDIS_URL JOB_ID TOTAL EVERY_RECORDS EFFECTS_FILE [WORK_US]. Appends "n\n" to EFFECTS_FILE per
record (the side effect a crash may repeat) after WORK_US microseconds of busy work (so that a
test can kill it mid-run), and prints "resumed N" first.
"""

import os
import sys
import time

from streamer.checkpoint import JobCheckpoint


def main() -> None:
    """Process records from the saved position to the end, then complete the checkpoint."""
    url, job_id, total, every, effects = sys.argv[1:6]
    work_s = int(sys.argv[6]) / 1e6 if len(sys.argv) > 6 else 0.0
    checkpoint = JobCheckpoint.from_url(url, job_id, every_records=int(every), every_seconds=0)
    start = checkpoint.position() or 0
    print(f"resumed {start}", flush=True)
    fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with checkpoint:
        for n in range(start, int(total)):
            deadline = time.perf_counter() + work_s
            while time.perf_counter() < deadline:
                pass
            os.write(fd, b"%d\n" % n)
            checkpoint.advance(n + 1)


if __name__ == "__main__":
    main()
