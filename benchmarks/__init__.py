"""pytest-benchmark suites of the kernels (see conftest.py and shapes.py)."""
