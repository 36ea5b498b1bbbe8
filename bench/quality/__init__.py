"""The quality harness: measures what a technique does to images from the reference model.

``python -m bench.quality --help``. Metrics are in ``metrics.py`` (plain functions, unit-tested), the digit
oracle in ``oracle.py``, the runner in ``__main__.py``.
"""
