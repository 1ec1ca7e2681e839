"""Numerical edge cases with a clear error or a documented result (issue: reliability)."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath.errors import NonFiniteError, NotInvertibleError
from peftmath.methods import dora, lora


def _zero_norm_row_case():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 5))
    B = rng.standard_normal((4, 2))
    W = rng.standard_normal((4, 5))
    W[1] = -2.0 * (B @ A)[1]            # row 1 of W + s·BA is exactly zero (s = 2)
    m = rng.uniform(0.5, 2.0, 4)
    return W, A, B, m


def test_dora_zero_norm_row_merges_to_zero_and_unmerges_exactly():
    """A row of W + ΔW that is all zeros has no direction: peftmath keeps it zero (g = 0) and the
    recorded norm 0 lets unmerge return W₀ = −ΔW exactly; PEFT produces NaN (0 · inf)."""
    W, A, B, m = _zero_norm_row_case()
    res = dora.merge(W, A, B, m, scaling=2.0)
    assert res.record[1] == 0 and np.all(res.weight[1] == 0) and np.all(np.isfinite(res.weight))
    back = dora.unmerge(res.weight, A, B, m, scaling=2.0, weight_norm=res.record)
    np.testing.assert_allclose(back.weight, W, rtol=1e-13, atol=1e-13)
    x = np.random.default_rng(1).standard_normal((3, 5))
    np.testing.assert_allclose(dora.forward(x, W, A, B, m, scaling=2.0), x @ res.weight.T, atol=1e-12)
    compat = dora.merge(W, A, B, m, scaling=2.0, peft_compat=True)
    assert np.all(np.isnan(compat.weight[1]))
    with pytest.raises(NonFiniteError):
        dora.merge(W, A, B, m, scaling=2.0, peft_compat=True, safe=True)
    in_place = W.copy()
    dora.merge(in_place, A, B, m, scaling=2.0, copy=False)
    np.testing.assert_allclose(in_place, res.weight, atol=1e-12)


def test_dora_zero_magnitude_cannot_be_unmerged():
    W, A, B, m = _zero_norm_row_case()
    m[2] = 0.0
    res = dora.merge(W, A, B, m, scaling=2.0)
    with pytest.raises(NotInvertibleError, match="magnitude"):
        dora.unmerge(res.weight, A, B, m, scaling=2.0, weight_norm=res.record)


def test_float16_overflow_is_refused_by_a_safe_merge():
    """W + ΔW beyond float16's 65504 rounds to inf: the default returns it (the IEEE result, as PEFT);
    safe=True refuses it and leaves W untouched, also in place."""
    W = np.full((2, 3), 60000.0, dtype=np.float16)
    A = np.ones((1, 3), dtype=np.float32)
    B = np.full((2, 1), 10000.0, dtype=np.float32)
    assert np.isinf(lora.merge(W, A, B, scaling=1.0)).all()
    before = W.copy()
    with pytest.raises(NonFiniteError, match="float16"):
        lora.merge(W, A, B, scaling=1.0, safe=True, copy=False)
    np.testing.assert_array_equal(W, before)


def test_cayley_of_a_skew_matrix_is_always_invertible():
    """I + S is invertible for every real skew-symmetric S (it is normal with eigenvalues 1 ± iλ), so
    cond(I + S) = sqrt(1 + λ_max²) / sqrt(1 + λ_min²) <= sqrt(1 + ρ(S)²); even a huge S gives an
    orthogonal exact Cayley rotation."""
    rng = np.random.default_rng(2)
    Q = rng.standard_normal((8, 8)) * 1e6
    S = (Q - Q.T) / 2
    eye = np.eye(8)
    R = np.linalg.solve((eye + S).T, (eye - S).T).T          # (I − S)(I + S)^-1
    np.testing.assert_allclose(R.T @ R, eye, atol=1e-8)
    lam = np.abs(np.linalg.eigvals(S))
    expected = np.sqrt(1 + lam.max() ** 2) / np.sqrt(1 + lam.min() ** 2)
    assert np.linalg.cond(eye + S) == pytest.approx(expected, rel=1e-6)
