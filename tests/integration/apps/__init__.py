"""Apps that integration tests run in worker subprocesses (``streamer run tests.integration.apps.X:app``)."""
