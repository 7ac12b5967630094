"""Helpers for tests and benchmarks: literal eager baselines (`eager`)."""
