"""Benchmarks for the TrainFree pack (run with `python -m bench.<name>` from the pack root)."""
