"""Worker apps for the chaos suite (run by ``streamer run`` in their own processes)."""
