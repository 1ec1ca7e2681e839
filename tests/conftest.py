"""Shared fixtures: the backend matrix (``xp``), hypothesis profiles, seeded data helpers.

Select backends with ``PEFTMATH_TEST_BACKENDS`` (comma-separated: numpy, array_api_strict, torch, jax,
dask, cupy). By default the module tests run on numpy, array_api_strict and torch, and the cross-backend
suite (``tests/test_cross_backend.py``, fixture ``xp_all``) on every installed library, JAX, dask (lazy
``dask.array``) and CuPy (with a GPU) included. Unknown names fail loudly.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Full float32 products everywhere (the tolerances are error bounds for float32, not for TF32's 10-bit
# mantissa): cuBLAS/cuDNN through the driver's override, CuPy's own switch; torch and JAX below. Set
# before any GPU library initialises.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
os.environ.setdefault("CUPY_TF32", "0")

# The xp fixture is a stateless namespace, so reusing it across hypothesis examples is safe.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=_SUPPRESS)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, max_examples=40,
                          suppress_health_check=_SUPPRESS)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask")
#: the module tests' default matrix; JAX and CuPy join it when named in PEFTMATH_TEST_BACKENDS, and the
#: cross-backend parity suite (the ``xp_all`` fixture) always takes every installed library
DEFAULT_BACKENDS = ("numpy", "array_api_strict", "torch")


def _selected(default: tuple[str, ...] = DEFAULT_BACKENDS) -> list[str]:
    raw = os.environ.get("PEFTMATH_TEST_BACKENDS")
    if not raw:
        return list(default)
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_BACKENDS) - {"cupy"})
    if unknown:
        raise pytest.UsageError(f"PEFTMATH_TEST_BACKENDS: unknown backends {unknown}; known: {ALL_BACKENDS + ('cupy',)}")
    return names


def _namespace(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
    elif name == "torch":
        torch = pytest.importorskip("torch")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        import array_api_compat.torch as xp
    elif name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 / bf16 passes on GPUs
        import jax.numpy as xp
    elif name == "dask":
        pytest.importorskip("dask.array")
        import array_api_compat.dask.array as xp
    elif name == "cupy":
        cupy = pytest.importorskip("cupy")
        if not cupy.cuda.is_available():
            pytest.skip("no CUDA device")
        import array_api_compat.cupy as xp

        _register_cupy_plugin()
    else:  # pragma: no cover
        raise ValueError(name)
    return xp


def _register_cupy_plugin() -> None:
    """Use the CuPy backend plugin even when backends/cupy is not pip-installed (a source checkout)."""
    import sys
    from pathlib import Path

    from peftmath import backends

    try:
        backends.get_backend("cupy")
    except Exception:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends" / "cupy"))
        from peftmath_cupy import CupyBackend

        backends.register_backend(CupyBackend())


@pytest.fixture(params=_selected())
def xp(request):
    """An array namespace from the backend matrix."""
    return _namespace(request.param)


@pytest.fixture(params=_selected(ALL_BACKENDS + ("cupy",)))
def xp_all(request):
    """Every installed array library (JAX CPU and CuPy with a GPU included), for the cross-backend suite."""
    return _namespace(request.param)

