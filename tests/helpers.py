"""Array helpers shared by the tests: move host data to a backend and back, check namespaces."""

from __future__ import annotations

import numpy as np


def to_xp(xp, a, dtype=None):
    """A host NumPy array as an array of ``xp`` (same values, optionally cast)."""
    from peftmath.backends import backend_for

    out = backend_for(xp).from_host(np.asarray(a), xp)
    return out if dtype is None else xp.astype(out, dtype)


def to_np(x) -> np.ndarray:
    """Any array as NumPy float64 (through the backend's host transfer)."""
    from peftmath._array import namespace
    from peftmath.backends import backend_for

    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return np.asarray(backend_for(namespace(x)).to_host(x)).astype(np.float64)


def assert_same_namespace(xp, *arrays):
    """Every array is of namespace ``xp`` (the 'arrays in, same arrays out' contract)."""
    import array_api_compat

    for a in arrays:
        got = array_api_compat.array_namespace(a)
        assert got.__name__ == xp.__name__ or got is xp, f"{type(a)} is not of {xp.__name__}"


def skip_if_immutable(xp) -> None:
    """Skip a ``copy=False`` check on a library whose arrays cannot be written (JAX): peftmath refuses
    ``copy=False`` there with an UnsupportedError, which tests/methods/test_lora.py checks."""
    import array_api_compat
    import pytest

    if array_api_compat.is_jax_namespace(xp):
        pytest.skip("JAX arrays are immutable: copy=False is refused by design")
