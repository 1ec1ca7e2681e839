"""The specs' examples run as doctests; an example may set NumPy's print options for readability, and
this restores them afterwards so that no other doctest depends on the order of collection."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _restore_numpy_print_options():
    saved = np.get_printoptions()
    yield
    np.set_printoptions(**saved)
