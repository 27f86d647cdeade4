"""The chaos suite: real workers, real signals, real outages, and a Jepsen-style history checker.

See ``tests/chaos/README.md`` for the scenarios, how to run them and how to read the summary table.
"""
