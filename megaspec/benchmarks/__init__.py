"""Benchmarks behind `python launch/bench.py <subcommand>`: each prints measurements, asserts nothing."""
