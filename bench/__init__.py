"""Benchmarks (not tests): the project's pipeline against the course notebook's, on the real data."""
