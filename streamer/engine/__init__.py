"""The engine: one loop owns the consumer; a processing thread runs the handler chains.

A record's trip, module by module:

- ``loop``: the only code that touches the consumer — polls, serves rebalances (``rebalance``),
  pauses and resumes, seeks and commits (``checkpoint``). It never runs application code.
- ``processor``: the processing thread — admission (owned? finished? reset?), the dedup claim,
  the handler chain, the outcome (done, dropped, retry, parked in the dead-letter topic, failed)
  and the dedup mark. It reports back through each partition's state, never through the consumer.
- ``dispatch``: concurrent dispatch — an event loop on the processing thread runs records of
  many lanes (partitions, keys) at once; offsets finish out of order (``offsetmap``).
- ``batches``: batch handlers — records buffered and handed over as lists.
- ``partition``: what both know about one assigned partition, created and retired by the
  rebalance listener alone.
"""
