"""Benchmarks: quality (held-out phantoms) and performance, with their shared helpers."""
