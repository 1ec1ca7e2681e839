"""PSOFT's math against independent float64 computations: the Cayley transform and PEFT's Neumann series, the
principal basis (a truncated SVD of the weight), the merged weight as the rotated principal part, the exact
unmerge with the merge record and its refusal without, and the config."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # PSOFT's basis is torch's SVD (specs/psoft.md, "3. The principal basis")

from peftmath.backends import BackendError  # noqa: E402
from peftmath.errors import (ConfigError, NonFiniteError, NotInvertibleError, ShapeError,  # noqa: E402
                             UnsupportedError)
from peftmath.layers import Layer, LayerKind  # noqa: E402
from peftmath.methods import psoft  # noqa: E402
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced  # noqa: E402

LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


def _skew64(q, r):
    Q = np.zeros((r, r))
    Q[np.triu_indices(r, 1)] = q
    return Q - Q.T


@pytest.mark.parametrize("r", [1, 2, 5])
def test_rotation_is_the_cayley_transform_with_the_scalings(r):
    rng = np.random.default_rng(r)
    q = rng.normal(0, 0.4, r * (r - 1) // 2)
    a, b = rng.uniform(0.5, 2, r), rng.uniform(0.5, 2, r)
    Q = _skew64(q, r)
    C = (np.eye(r) + Q) @ np.linalg.inv(np.eye(r) - Q)
    np.testing.assert_allclose(C.T @ C, np.eye(r), atol=1e-12)
    np.testing.assert_allclose(psoft.rotation(q, r=r), C, atol=1e-12)
    np.testing.assert_allclose(psoft.rotation(q, a, b, r=r), np.diag(b) @ C @ np.diag(a), atol=1e-12)
    free = rng.standard_normal((r, r))
    np.testing.assert_array_equal(psoft.rotation(free, r=r, orth=False), free)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("eps", [None, 0.05])
def test_neumann_series_is_peft_sum(terms, eps):
    r = 4
    q = np.random.default_rng(terms).normal(0, 0.3, 6)
    Q = _skew64(q, r)
    if eps is not None and np.linalg.norm(Q) > eps:
        Q = Q * eps / (np.linalg.norm(Q) + 1e-12)
    want = np.eye(r)  # I + 2 Σ_{k=1}^{max(T-2, 2)} Q^k + Q^{max(T-1, 3)}  (T = 2: I + 2Q; T = 3, 4 agree)
    if terms == 2:
        want = want + 2 * Q
    elif terms > 2:
        want = want + sum(2 * np.linalg.matrix_power(Q, k) for k in range(1, max(terms - 2, 2) + 1)) \
            + np.linalg.matrix_power(Q, max(terms - 1, 3))
    got = psoft.rotation(q, r=r, use_cayley_neumann=True, num_cayley_neumann_terms=terms, cayley_neumann_eps=eps)
    np.testing.assert_allclose(got, want, atol=1e-12)
    if eps is not None and terms >= 5:  # a small Q: the series is close to the exact (orthogonal) transform
        np.testing.assert_allclose(got, psoft.rotation(q * eps / np.linalg.norm(_skew64(q, r)), r=r), atol=1e-5)


def _module(shape, r, dtype, seed, **cfg):
    config = psoft.PsoftConfig(r=r, psoft_alpha=2 * r, init_weights=False, **cfg)
    layer = Layer(LayerKind.LINEAR, shape)
    params, _ = psoft.PsoftModule.initialize("m", config, layer, seed=seed)
    rng = np.random.default_rng(seed)
    params = {k: (v + rng.normal(0, 0.2, v.shape) if "vector" in k else v).astype(dtype) for k, v in params.items()}
    return psoft.PsoftModule("m", config, params, layer)


def test_basis_is_a_truncated_svd_of_the_float32_weight():
    W = np.random.default_rng(0).standard_normal((9, 6))
    basis = psoft.principal_basis(W, 4)
    assert basis.dtype == np.float32 and basis.shape == (4 * (9 + 6 + 1),)
    V, S, Uh = (np.asarray(a, np.float64) for a in psoft.unpack_basis(basis, 9, 6, 4))
    s = np.linalg.svd(W.astype(np.float32).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(S, s[:4], rtol=1e-5)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(Uh @ Uh.T, np.eye(4), atol=1e-5)
    u, _, vt = np.linalg.svd(W, full_matrices=False)  # the same subspaces (the signs are the routine's)
    np.testing.assert_allclose(np.abs(V.T @ u[:, :4]), np.eye(4), atol=1e-4)
    np.testing.assert_allclose(np.abs(Uh @ vt[:4].T), np.eye(4), atol=1e-4)
    lowrank = psoft.principal_basis(W, 4, svd="lowrank", niter=10, seed=0)
    np.testing.assert_array_equal(lowrank, psoft.principal_basis(W, 4, svd="lowrank", niter=10, seed=0))
    with pytest.raises(ShapeError, match="r=7"):
        psoft.principal_basis(W, 7)
    bad = W.copy()
    bad[1, 2] = np.inf
    with pytest.raises(NonFiniteError, match="9x6"):
        psoft.principal_basis(bad, 4)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", [{}, dict(ab_svd_init="pissa_init"), dict(psoft_orth=False, psoft_mag_a=False),
                                 dict(use_cayley_neumann=True, num_cayley_neumann_terms=3)],
                         ids=["psoft", "pissa", "free", "neumann"])
def test_merge_forward_unmerge_against_float64(layout, dtype, cfg):
    shape, r = (8, 6), 3
    mod = _module(shape, r, dtype, 7, **cfg)
    rng = np.random.default_rng(2)
    W = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype))
    before = W.copy()
    V, S, Uh = (np.asarray(a, np.float64) for a in psoft.unpack_basis(psoft.principal_basis(W, r), *shape, r))
    R = np.asarray(mod.rotation(np.float64), np.float64)
    D = np.diag(S) if cfg.get("ab_svd_init") != "pissa_init" else None
    middle = (np.diag(S) @ (R - np.eye(r)) if D is not None
              else np.diag(np.sqrt(S)) @ (R - np.eye(r)) @ np.diag(np.sqrt(S)))
    want = W.astype(np.float64) + V @ middle @ Uh
    eps = float(np.finfo(dtype).eps)
    tol = 32 * eps * (np.abs(want).max() + np.abs(W).max() + S.max() * np.abs(R).max())
    res = mod.merge(W)
    np.testing.assert_allclose(res.weight, want, atol=tol)
    np.testing.assert_array_equal(W, before)
    x = rng.standard_normal((2, 3, shape[1])).astype(dtype)
    np.testing.assert_allclose(mod.forward(x, W), x.astype(np.float64) @ want.T, atol=tol * np.abs(x).sum(-1).max())
    back = mod.unmerge(res.weight, record=res.record).weight
    np.testing.assert_allclose(back, W, atol=tol)
    with pytest.raises(NotInvertibleError, match="record"):
        mod.unmerge(res.weight)
    target = LAYOUTS[layout](W.copy())
    merged = mod.merge(target, copy=False)
    assert merged.weight is target
    np.testing.assert_allclose(target, res.weight, atol=2 * eps * np.abs(want).max())


def test_orthogonal_r_keeps_the_singular_values_and_init_is_identity():
    shape, r = (10, 7), 4
    W = np.random.default_rng(5).standard_normal(shape)
    mod = _module(shape, r, np.float64, 3, psoft_mag_a=False, psoft_mag_b=False)
    merged = mod.merge(W).weight
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), np.linalg.svd(W, compute_uv=False),
                               atol=1e-5)  # the basis is float32: W's principal part is split at float32 accuracy
    assert np.abs(merged - W).max() > 1e-2
    cfg = psoft.PsoftConfig(r=r)
    params, _ = psoft.PsoftModule.initialize("m", cfg, Layer(LayerKind.LINEAR, shape))
    ident = psoft.PsoftModule("m", cfg, params, Layer(LayerKind.LINEAR, shape))
    np.testing.assert_array_equal(ident.merge(W.astype(np.float32)).weight, W.astype(np.float32))


def test_a_sign_flip_of_the_basis_changes_the_adapter():
    """Why the basis must be torch's (specs/psoft.md, "3."): the same R on a sign-flipped basis is D R D."""
    shape, r = (6, 5), 3
    W = np.random.default_rng(9).standard_normal(shape)
    R = psoft.rotation(np.array([0.3, -0.2, 0.4]), r=r)
    V, S, Uh = psoft.unpack_basis(psoft.principal_basis(W, r).astype(np.float64), *shape, r)
    d = np.array([1.0, -1.0, 1.0])
    flipped = psoft.pack_basis(np, V * d, S, d[:, None] * Uh)
    a = psoft.delta_weight(psoft.pack_basis(np, V, S, Uh), R, *shape, scaling=1.0)
    b = psoft.delta_weight(flipped, R, *shape, scaling=1.0)
    np.testing.assert_allclose(b, psoft.delta_weight(psoft.pack_basis(np, V, S, Uh), np.diag(d) @ R @ np.diag(d),
                                                     *shape, scaling=1.0), atol=1e-12)
    assert np.abs(a - b).max() > 0.05


def test_refusals(monkeypatch):
    layer = Layer(LayerKind.LINEAR, (5, 4))
    cfg = psoft.PsoftConfig(r=2)
    params, _ = psoft.PsoftModule.initialize("m", cfg, layer)
    with pytest.raises(ShapeError, match="psoft_R.weight"):
        psoft.PsoftModule("m", cfg, {**params, "psoft_R.weight": np.zeros(3, np.float32)}, layer)
    with pytest.raises(ShapeError, match="psoft_mag_a"):
        psoft.PsoftModule("m", psoft.PsoftConfig(r=2, psoft_mag_a=False), params, layer)
    with pytest.raises(UnsupportedError, match="nn.Linear"):
        psoft.PsoftModule("m", cfg, params, Layer(LayerKind.CONV1D_TRANSPOSED, (4, 5)))
    with pytest.raises(ShapeError, match="r=5"):
        psoft.PsoftModule("m", psoft.PsoftConfig(r=5), psoft.init_weights(psoft.PsoftConfig(r=5)), layer)
    mod = psoft.PsoftModule("m", cfg, params, layer)
    with pytest.raises(UnsupportedError, match="base weight"):
        mod.delta_weight()
    with pytest.raises(ShapeError, match="r\\*\\(out\\+in\\+1\\)"):
        mod.unmerge(np.ones((5, 4), np.float32), record=np.ones(3, np.float32))

    def no_torch(name):
        raise BackendError("no peftmath backend named 'torch'")

    monkeypatch.setattr(psoft, "get_backend", no_torch)
    with pytest.raises(UnsupportedError, match="install torch"):
        mod.merge(np.ones((5, 4), np.float32))
    for bad, field in [(dict(ab_svd_init="x"), "ab_svd_init"), (dict(psoft_svd="eig"), "psoft_svd"),
                       (dict(psoft_alpha=0), "psoft_alpha"), (dict(use_cayley_neumann=True, cayley_neumann_eps=1.5),
                                                              "cayley_neumann_eps"),
                       (dict(use_cayley_neumann=True, num_cayley_neumann_terms=0), "num_cayley_neumann_terms")]:
        with pytest.raises(ConfigError, match=field):
            psoft.PsoftConfig(**bad).validate()
    psoft.PsoftConfig(num_cayley_neumann_terms=0).validate()  # unused without the series, as in PEFT
