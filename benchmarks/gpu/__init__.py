"""The GPU runs: two commands of at most 8 minutes each, for a borrowed GPU machine.

    PYTHONPATH=src python3 -m benchmarks.gpu first  [--out DIR] [--data PATH] [--dry-run]
    PYTHONPATH=src python3 -m benchmarks.gpu second [--out DIR] [--data PATH] [--dry-run]

`first` is the evidence to get before anything else (benchmarks/gpu/plans.py lists its steps,
each with its time limit); `second` the rest. See docs/performance.md for the procedure.
"""
