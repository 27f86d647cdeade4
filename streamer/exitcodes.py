"""Exit codes of ``streamer`` commands, in one home (documented in the README and in ``--help``)."""

#: Stopped cleanly: drained, committed, left the group (or a bounded run reached its end).
EXIT_OK = 0
#: A record failed with nothing to park it, or the final commit did not land.
EXIT_FAILED = 1
#: Bad settings or command line: restarting cannot help.
EXIT_USAGE = 2
#: The drain timeout ran out: what finished was committed, in-flight records were abandoned.
EXIT_DRAIN_TIMEOUT = 3
#: ``streamer lag``: the consumer group does not exist.
EXIT_NOT_FOUND = 4

__all__ = ["EXIT_DRAIN_TIMEOUT", "EXIT_FAILED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE"]
