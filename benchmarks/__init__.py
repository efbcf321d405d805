"""Benchmark scripts (one command each, see docs/benchmarks.md) and the measuring pieces they share."""
