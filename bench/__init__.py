"""Benchmarks (pytest-benchmark, marker ``benchmark``); see README.md."""
