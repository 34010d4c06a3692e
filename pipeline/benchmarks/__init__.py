"""Benchmarks run by `python jobs/benchmark.py NAME`: each module here has `main(argv) -> dict`.

Every benchmark times ours side by side with the named baseline in one run, interleaved, and prints one
JSON line of ratios (ours over baseline) plus the raw figures.
"""
