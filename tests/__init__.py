"""Test suite for streamer (unit tests, integration tests against dev/services, shared harness)."""
