"""Helpers that only tests (and benchmarks) use: kept out of the `olmoearth_fast` package.

Imported as `tests.helpers.<module>`; pytest puts the repository root on sys.path
(`pythonpath` in pyproject.toml), for `pytest tests` and `pytest benchmarks` alike.
"""
