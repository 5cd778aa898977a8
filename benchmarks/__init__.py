"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (plain ``pytest`` does not collect it).

A package so that ``benchmarks/test_models.py`` never clashes with ``tests/test_models.py`` when
both directories are collected in one run.
"""
