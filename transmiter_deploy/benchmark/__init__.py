"""The benchmark harness behind ``transmiter bench`` and ``make bench``.

Latency and throughput per runtime, MACs per component counted from the exported graphs,
and the demo world's accuracy table, written to ``benchmarks/results/<host-label>/``
(see ``docs/benchmarks.md``).
"""
