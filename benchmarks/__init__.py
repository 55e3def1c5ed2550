"""Benchmark suite for ``proma_accum``: cost of PROMA accumulation against plain accumulation.

Run ``python -m benchmarks.run`` from the repository root (``--help`` lists the options).
What is measured, and how, is described in :mod:`benchmarks.run`.
"""
