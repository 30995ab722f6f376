"""Benchmarks: class-aware against class-agnostic pruning on the same work (``python -m benchmarks run``)."""
