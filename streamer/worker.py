"""The worker: ``streamer.engine`` runs it; this module keeps the import path of earlier releases."""

from streamer.engine.loop import Worker
from streamer.exitcodes import EXIT_DRAIN_TIMEOUT, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from streamer.stats import WorkerStats

__all__ = ["EXIT_DRAIN_TIMEOUT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Worker", "WorkerStats"]
