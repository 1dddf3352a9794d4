"""Every docstring example in featurestore runs and passes."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["config", "keys", "codecs", "sequences", "counters", "sketches", "dwellstats",
           "reader", "store", "userrows"]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    module = importlib.import_module(f"featurestore.{name}")
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
