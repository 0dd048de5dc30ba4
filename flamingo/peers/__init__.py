"""Peer implementations imported (never copied) for equality tests and side-by-side benchmarks."""
