"""Helpers shared by the test modules: move host data to a backend and back, check namespaces; and, for
the method tests, dtypes, componentwise error ratios, a float64 Linear/conv reference and peak memory."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings


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


# --------------------------------------------------------------------------------------------------
# Shared by the method tests (tests/methods/): dtypes, error ratios, float64 references, peak memory
# --------------------------------------------------------------------------------------------------
#: for ``@given`` tests that take the function-scoped ``xp`` fixture (stateless, so safe to reuse)
XP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BF16 = np.dtype(ml_dtypes.bfloat16)


def np_dtype(name):
    """The NumPy dtype named ``name``; ``"bfloat16"`` is ml_dtypes' bfloat16."""
    return BF16 if name == "bfloat16" else np.dtype(name)


def f64(a):
    """Any host array (half dtypes included) as NumPy float64."""
    return np.asarray(a).astype(np.float64)


def ratio(err, unit):
    """max of err / unit where unit > 0 (the worst error in units of the bound)."""
    unit = np.broadcast_to(unit, err.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(unit > 0, err / unit, np.where(err > 0, np.inf, 0.0))
    return float(np.max(q)) if q.size else 0.0


def floor(dt):
    """The smallest subnormal: the absolute error floor of rounding to ``dt``."""
    return float(ml_dtypes.finfo(dt).smallest_subnormal)


def ref_base_forward(x, W, absW, bias, *, groups=1, **conv_kw):
    """float64 output of a Linear (2-D ``W``, ``x @ W.T + b``) or convolution layer (``conv(x, W) + b``,
    ``groups`` and stride/padding/dilation keywords), and its magnitude: the same with ``|x|``, ``absW``
    and ``|b|`` (the unit of a componentwise forward tolerance). Returns ``(y, magnitude)``."""
    from peftmath._array import conv

    if W.ndim == 2:
        return x @ W.T + bias, np.abs(x) @ absW.T + np.abs(bias)
    return (conv(x, W, bias, groups=groups, **conv_kw),
            conv(np.abs(x), absW, np.abs(bias), groups=groups, **conv_kw))


def traced_peak(fn):
    """Run ``fn()`` with ``tracemalloc`` tracing; returns ``(fn's result, peak traced bytes)``."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def skip_unless_requirements(method) -> None:
    """Skip the calling test when ``method`` (a :class:`~peftmath.methods.Method`) needs a package that is not
    installed (``Method.requires``: PSOFT needs torch, whose SVD signs define the adapter)."""
    import importlib.util

    import pytest

    missing = [r for r in method.requires if importlib.util.find_spec(r) is None]
    if missing:
        pytest.skip(f"{method.peft_type} needs {', '.join(missing)}")


def requirements_met(method) -> bool:
    """Whether every package ``method.requires`` is installed."""
    import importlib.util

    return all(importlib.util.find_spec(r) is not None for r in method.requires)

