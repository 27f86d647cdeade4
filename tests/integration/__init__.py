"""Integration tests against the real Kafka broker and Redis started by dev/services."""
