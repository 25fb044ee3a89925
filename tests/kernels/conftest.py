"""Kernel tests run on the GPU when there is one, else under Triton's CPU interpreter (chosen in
tests/conftest.py, before any kernel module is imported)."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    # The interpreter itself trips a numpy deprecation on every scalar branch of a kernel.
    quiet = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    no_interpreter = pytest.mark.skip(reason="GPU-sized test: not under TRITON_INTERPRET=1")
    for item in items:
        if "tests/kernels/" in str(item.path).replace("\\", "/"):
            item.add_marker(quiet)
            if interpreted and "gpu" in item.keywords:
                item.add_marker(no_interpreter)
