"""Benchmarks: every kernel against its baselines, and end-to-end training throughput."""
