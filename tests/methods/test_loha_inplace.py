"""LoHa (and LoKr) merges by row tiles (issue 20, item 2): in place really in place, ``copy=True`` in one pass.

Per tile of rows LoHa forms ``t1 = (s·w1_a)[rows] @ w1_b``, ``t2 = w2_a[rows] @ w2_b`` in reused buffers and
writes ``W[rows] ± t1 ⊙ t2``. Checked against float64 ``W ± s (w1_a w1_b) ⊙ (w2_a w2_b)`` computed here,
within the rounding bound of float32 (``γ_{r+3}`` of ``|s| (|w1_a||w1_b|) ⊙ (|w2_a||w2_b|)``, plus
``u |W|`` for the addition and one rounding to the stored dtype); on Fortran-ordered, permuted, sliced and
torch ``channels_last`` weights, Conv2d, float16 / bfloat16; the same bits from ``copy=True`` and any tile
size or BLAS thread setting; the peak extra allocation of an in-place merge a small fraction of W; JAX still
computing out of place.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from peftmath.errors import UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import _lycoris, loha, lokr
from tests.helpers import traced_peak

U = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
BF16 = np.dtype(ml_dtypes.bfloat16)
S = 1.7


def factors(rng, out, in_flat, r=4):
    a1, a2 = (rng.standard_normal((out, r)).astype(np.float32) * 0.5 for _ in range(2))
    b1, b2 = (rng.standard_normal((r, in_flat)).astype(np.float32) * 0.5 for _ in range(2))
    return a1, b1, a2, b2


def reference(W, a1, b1, a2, b2, sign=1):
    """float64 ``W ± s·(a1 b1)⊙(a2 b2)`` on the matrix view, and the scale of the float32 rounding bound."""
    d = lambda x: np.asarray(x, np.float64)  # noqa: E731
    out = W.shape[0]
    W64 = d(W).reshape(out, -1)
    delta = S * (d(a1) @ d(b1)) * (d(a2) @ d(b2))
    absd = abs(S) * (np.abs(d(a1)) @ np.abs(d(b1))) * (np.abs(d(a2)) @ np.abs(d(b2)))
    return (W64 + sign * delta).reshape(W.shape), absd.reshape(W.shape), np.abs(W64).reshape(W.shape)


def check(got, W0, params, *, sign=1, r=4, stored="float32"):
    ref, absd, absw = reference(W0, *params, sign=sign)
    k = r + 3
    bound = k * U["float32"] / (1 - k * U["float32"]) * absd + U["float32"] * (absw + absd)
    if stored != "float32":
        bound = bound + U[stored] * np.abs(ref)
    err = np.abs(np.asarray(got, np.float64) - ref)
    assert np.all(err <= bound + 1e-30), f"max error / bound {float(np.max(err / (bound + 1e-30))):.3g}"


def layouts(rng, shape):
    C = rng.standard_normal(shape).astype(np.float32)
    yield "C", C, C
    F = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    yield "Fortran", F, F
    P = rng.standard_normal(tuple(reversed(shape))).astype(np.float32)
    yield "permuted", np.transpose(P), P
    big = rng.standard_normal((2 * shape[0],) + shape[1:]).astype(np.float32)
    yield "row-strided", big[1::2], big


@pytest.mark.parametrize("shape", [(45, 70), (16, 6, 3, 3), (20, 9, 5)])
@pytest.mark.parametrize("sign", [1, -1], ids=["merge", "unmerge"])
def test_in_place_on_every_layout(shape, sign):
    rng = np.random.default_rng(sum(shape) + sign)
    lay = Layer.of(shape)
    params = factors(rng, *lay.matrix_shape)
    fn = loha.merge if sign > 0 else loha.unmerge
    for label, W, base in layouts(rng, shape):
        W0 = W.copy()
        new = fn(W0, *params, scaling=S, layer=lay)
        assert new.flags.c_contiguous and new.dtype == np.float32
        assert fn(W, *params, scaling=S, layer=lay, copy=False) is W and np.shares_memory(W, base), label
        check(W, W0, params, sign=sign)
        np.testing.assert_array_equal(W, new, err_msg=label)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_half_precision_rounds_once(dtype):
    rng = np.random.default_rng(3)
    params = factors(rng, 40, 64)
    W0 = rng.standard_normal((40, 64)).astype(dtype)
    new = loha.merge(W0, *params, scaling=S)
    assert new.dtype == W0.dtype
    check(new, W0, params, stored=np.dtype(dtype).name)
    W = np.asfortranarray(W0)
    assert loha.merge(W, *params, scaling=S, copy=False) is W
    np.testing.assert_array_equal(np.ascontiguousarray(W).view(np.uint16), new.view(np.uint16))


def test_round_trip():
    rng = np.random.default_rng(4)
    params = factors(rng, 33, 50)
    W0 = rng.standard_normal((33, 50)).astype(np.float32)
    W = W0.copy()
    loha.merge(W, *params, scaling=S, copy=False)
    loha.unmerge(W, *params, scaling=S, copy=False)
    _, absd, absw = reference(W0, *params)
    assert np.all(np.abs(W - W0) <= 4 * U["float32"] * (absw + 2 * absd) + 16 * U["float32"] * absd)


def test_tiles_and_threads_do_not_change_the_numbers(monkeypatch):
    rng = np.random.default_rng(5)
    params = factors(rng, 97, 64)
    W0 = rng.standard_normal((97, 64)).astype(np.float32)
    results = []
    for elements, threads in ((1 << 30, "1"), (5 * 64, "1"), (5 * 64, "3"), (64, "2")):
        monkeypatch.setattr(_lycoris, "BLOCK_ELEMENTS", elements)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
        W = W0.copy()
        loha.merge(W, *params, scaling=S, copy=False)
        results.append((W, loha.unmerge(W0, *params, scaling=S)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_the_generic_blocks_give_the_same_bits():
    """The NumPy kernel (out= buffers) and the portable row blocks (any array library) agree bit for bit."""
    rng = np.random.default_rng(6)
    params = factors(rng, 30, 40)
    W0 = rng.standard_normal((30, 40)).astype(np.float32)
    strict = pytest.importorskip("array_api_strict")
    got = loha.merge(strict.asarray(W0), *(strict.asarray(p) for p in params), scaling=S)
    np.testing.assert_array_equal(np.asarray(got), loha.merge(W0, *params, scaling=S))


@pytest.mark.parametrize("sign", [1, -1])
def test_peak_allocation_is_a_small_fraction_of_w(sign):
    rng = np.random.default_rng(7)
    params = factors(rng, 2048, 2048, r=16)
    W = rng.standard_normal((2048, 2048)).astype(np.float32)
    fn = loha.merge if sign > 0 else loha.unmerge
    _, peak = traced_peak(lambda: fn(W, *params, scaling=S, copy=False))
    assert peak <= 0.25 * W.nbytes, f"in place: {peak / W.nbytes:.1%} of W"
    _, peak = traced_peak(lambda: fn(W, *params, scaling=S))
    assert peak <= 1.25 * W.nbytes, f"copy=True: {peak / W.nbytes:.1%} of W"


def test_torch_in_place_and_channels_last():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    lay = Layer.of((12, 6, 3, 3))
    params = factors(rng, *lay.matrix_shape)
    Wn = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    tp = tuple(torch.from_numpy(p) for p in params)
    for fmt in (torch.contiguous_format, torch.channels_last):
        Wt = torch.from_numpy(Wn.copy()).to(memory_format=fmt)
        new = loha.merge(Wt, *tp, scaling=S, layer=lay)
        assert np.array_equal(Wt.numpy(), Wn)
        check(new.numpy(), Wn, params)
        ptr = Wt.data_ptr()
        assert loha.merge(Wt, *tp, scaling=S, layer=lay, copy=False) is Wt and Wt.data_ptr() == ptr
        check(Wt.numpy(), Wn, params)


def test_torch_keeps_the_autograd_graph():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    params = [torch.from_numpy(p) for p in factors(rng, 6, 8)]
    params[0].requires_grad_(True)
    out = loha.merge(torch.zeros(6, 8), *params, scaling=S)
    out.sum().backward()
    assert params[0].grad is not None and float(params[0].grad.abs().sum()) > 0


def test_jax_computes_out_of_place():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(10)
    params = factors(rng, 6, 8)
    W0 = rng.standard_normal((6, 8)).astype(np.float32)
    got = loha.merge(jnp.asarray(W0), *(jnp.asarray(p) for p in params), scaling=S)
    np.testing.assert_allclose(np.asarray(got), loha.merge(W0, *params, scaling=S), atol=1e-5)
    with pytest.raises(UnsupportedError, match="JAX"):
        loha.merge(jnp.asarray(W0), *(jnp.asarray(p) for p in params), scaling=S, copy=False)


@pytest.mark.parametrize("shape,both", [((64, 48), False), ((32, 16, 3, 3), True)])
def test_lokr_in_place_on_permuted_layouts(shape, both):
    """LoKr shares the row-block write path: in place on a Fortran / permuted weight, equal to its copy=True
    and to float64 ``W + s·kron(w1, w2)``."""
    rng = np.random.default_rng(11)
    lay = Layer.of(shape)
    p = lokr.init_weights(lokr.geometry(lay, 2, decompose_both=both), init_weights=False, seed=1)
    delta = lokr.delta_weight({k: v.astype(np.float64) for k, v in p.items()}, scaling=S, layer=lay)
    for label, W, base in layouts(rng, shape):
        W0 = W.copy()
        new = lokr.merge(W0, p, scaling=S, layer=lay)
        assert lokr.merge(W, p, scaling=S, layer=lay, copy=False) is W and np.shares_memory(W, base), label
        np.testing.assert_array_equal(W, new)
        ref = W0.astype(np.float64) + delta
        assert np.all(np.abs(W - ref) <= 8 * U["float32"] * (np.abs(W0) + np.abs(delta)) + 1e-30)
    W = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    _, peak = traced_peak(lambda: lokr.merge(W, p, scaling=S, layer=lay, copy=False))
    assert peak <= max(0.25 * W.nbytes, 64 << 10)
