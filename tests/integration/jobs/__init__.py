"""Batch jobs run as subprocesses by the integration tests."""
