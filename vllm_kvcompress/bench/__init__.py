"""Benchmarks: each writes a table to stdout and JSON, CSV and a PNG to its output folder."""
