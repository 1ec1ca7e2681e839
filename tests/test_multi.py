"""Several adapters over one base: stacked forward, sequential merge/unmerge, the mixed batch."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import assert_same_namespace, to_np, to_xp
from hypothesis import given
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.multi import BASE, AdapterSet, mixed_batch_forward


def _adapter(xp, rng, r, alpha, emb=False, dora=False):
    if emb:
        p = {"lora_embedding_A": rng.standard_normal((r, 13)), "lora_embedding_B": rng.standard_normal((6, r))}
        name = "emb"
    else:
        p = {"lora_A.weight": rng.standard_normal((r, 10)), "lora_B.weight": rng.standard_normal((8, r))}
        name = "lin"
    if dora:
        p["lora_magnitude_vector"] = rng.uniform(0.5, 2.0, 8)
    cfg = pm.LoraConfig(r=r, lora_alpha=alpha, target_modules=[name], use_dora=dora)
    return Adapter(cfg, {name: {k: to_xp(xp, v) for k, v in p.items()}})


def _state(xp, rng):
    return {"lin.weight": to_xp(xp, rng.standard_normal((8, 10))), "lin.bias": to_xp(xp, rng.standard_normal(8)),
            "emb.weight": to_xp(xp, rng.standard_normal((13, 6)))}


@given(seed=st.integers(0, 2**31 - 1), pattern=st.sampled_from(["identical", "distinct", "uniform", "skewed", "zipf"]))
def test_mixed_batch_equals_each_row_with_its_own_adapter(xp, seed, pattern):
    rng = np.random.default_rng(seed)
    ads = {f"a{i}": _adapter(xp, rng, r=i + 1, alpha=2.0 + i) for i in range(4)}      # heterogeneous ranks
    ads.update({f"e{i}": _adapter(xp, rng, r=2, alpha=3.0, emb=True) for i in range(2)})
    state = _state(xp, rng)
    choices = list(ads)[:4] + [BASE]
    n = 8
    names = {
        "identical": ["a1"] * n,
        "distinct": [choices[i % len(choices)] for i in range(n)],
        "uniform": list(rng.choice(choices, n)),
        "skewed": ["a0"] * (n - 2) + ["a3", BASE],
        "zipf": [choices[min(int(z) - 1, len(choices) - 1)] for z in rng.zipf(2.0, n)],
    }[pattern]
    x = to_xp(xp, rng.standard_normal((n, 3, 10)))
    y = mixed_batch_forward("lin", x, state, ads, names)
    assert_same_namespace(xp, y)
    for b, name in enumerate(names):
        row = x[b:b + 1, ...]
        ref = ads[name].forward("lin", row, state) if name != BASE else \
            row @ xp.matrix_transpose(state["lin.weight"]) + state["lin.bias"]
        np.testing.assert_allclose(to_np(y)[b], to_np(ref)[0], rtol=1e-12, atol=1e-12)
    ids = to_xp(xp, rng.integers(0, 13, (3, 5)))
    emb_names = ["e0", BASE, "e1"]
    ye = mixed_batch_forward("emb", ids, state, ads, emb_names)
    for b, name in enumerate(emb_names):
        ref = ads[name].forward("emb", ids[b:b + 1, ...], state) if name != BASE else \
            to_np(state["emb.weight"])[to_np(ids)[b].astype(int)][None]
        np.testing.assert_allclose(to_np(ye)[b], to_np(ref)[0], rtol=1e-12, atol=1e-12)


def test_stacked_forward_and_sequential_merge(xp):
    rng = np.random.default_rng(0)
    s = AdapterSet({"a": _adapter(xp, rng, 2, 4.0), "b": _adapter(xp, rng, 3, 1.5)})
    state = _state(xp, rng)
    x = to_xp(xp, rng.standard_normal((4, 10)))
    y = s.forward("lin", x, state)
    base = to_np(x) @ to_np(state["lin.weight"]).T + to_np(state["lin.bias"])
    expected = base + sum(to_np(s.adapters[n].forward("lin", x, state)) - base for n in ("a", "b"))
    np.testing.assert_allclose(to_np(y), expected, rtol=1e-12, atol=1e-12)
    records: dict = {}
    merged = s.merge(state, records=records)
    np.testing.assert_allclose(to_np(x) @ to_np(merged["lin.weight"]).T + to_np(merged["lin.bias"]), to_np(y),
                               rtol=1e-10, atol=1e-10)
    back = s.unmerge(merged, records=records)
    np.testing.assert_allclose(to_np(back["lin.weight"]), to_np(state["lin.weight"]), rtol=1e-12, atol=1e-12)
    s.set_active(["b"])
    np.testing.assert_allclose(to_np(s.forward("lin", x, state)), to_np(s.adapters["b"].forward("lin", x, state)))


def test_dora_merges_in_order_and_unmerges_in_reverse(xp):
    rng = np.random.default_rng(1)
    s = AdapterSet({"a": _adapter(xp, rng, 2, 4.0, dora=True), "b": _adapter(xp, rng, 2, 2.0, dora=True)})
    state = _state(xp, rng)
    records: dict = {}
    merged = s.merge(state, records=records)
    assert set(records) == {"a", "b"} and "lin" in records["a"]
    back = s.unmerge(merged, records=records)
    np.testing.assert_allclose(to_np(back["lin.weight"]), to_np(state["lin.weight"]), rtol=1e-10, atol=1e-10)
    with pytest.raises(UnsupportedError, match="DoRA"):
        s.forward("lin", to_xp(xp, np.ones((1, 10))), state)


def test_bad_inputs():
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(2)
    ads = {"a": _adapter(xp, rng, 2, 2.0), "d": _adapter(xp, rng, 2, 2.0, dora=True)}
    state = _state(xp, rng)
    x = np.ones((2, 10))
    with pytest.raises(ConfigError, match="not loaded"):
        mixed_batch_forward("lin", x, state, ads, ["a", "zzz"])
    with pytest.raises(ShapeError, match="2 rows but adapter_names has 3"):
        mixed_batch_forward("lin", x, state, ads, ["a", "a", "a"])
    with pytest.raises(UnsupportedError, match="DoRA"):
        mixed_batch_forward("lin", x, state, ads, ["a", "d"])
    s = AdapterSet(ads)
    with pytest.raises(ConfigError, match="already loaded"):
        s.add("a", ads["a"])
    with pytest.raises(ConfigError, match="__base__"):
        s.add(BASE, ads["a"])
    s.delete("d")
    assert s.active == ["a"]


def test_mixed_batch_refuses_arrays_of_two_libraries():
    """x, the weight and every adapter's factors must share one library and device (a raw
    AttributeError from deep inside the stacking used to be the answer)."""
    torch = pytest.importorskip("torch")
    from peftmath.errors import NamespaceError

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    cfg = pm.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"])
    torch_ad = Adapter(cfg, {"lin": {"lora_A.weight": torch.ones(2, 6), "lora_B.weight": torch.ones(8, 2)}})
    numpy_ad = Adapter(cfg, {"lin": {"lora_A.weight": np.ones((2, 6), np.float32),
                                     "lora_B.weight": np.ones((8, 2), np.float32)}})
    with pytest.raises(NamespaceError, match=r"mixed_batch_forward\(lin\).*numpy.*torch"):
        mixed_batch_forward("lin", x, {"lin.weight": W}, {"a": torch_ad}, ["a", BASE])
    with pytest.raises(NamespaceError, match="different array libraries"):
        mixed_batch_forward("lin", torch.from_numpy(x), {"lin.weight": W}, {"a": numpy_ad}, ["a", BASE])
    with pytest.raises(NamespaceError, match="different array libraries"):
        mixed_batch_forward("lin", x, {"lin.weight": W}, {"a": numpy_ad, "b": torch_ad}, ["a", "b"])


def _rowwise(x, state, factors, names):
    """The mixed batch computed row by row in float64 with plain NumPy: an independent reference."""
    W, bias = np.asarray(state["lin.weight"], np.float64), np.asarray(state["lin.bias"], np.float64)
    y = np.asarray(x, np.float64) @ W.T + bias
    for b, name in enumerate(names):
        if name != BASE:
            A, B, s = factors[name]
            y[b] += s * (np.asarray(x[b], np.float64) @ A.T) @ B.T
    return y


@pytest.mark.parametrize("names", [
    ["a2", BASE, "a0", "a2", "a1", BASE, "a0", "a3"],      # scattered, base rows in the middle
    ["a0", "a0", "a1", "a2", "a2", "a3", BASE, BASE],       # already grouped, base rows last (no permutation)
    [BASE, "a3", "a3", "a3", "a3", "a3", "a3", "a1"],       # skewed, a base row first
])
@pytest.mark.parametrize("layout", ["fortran", "strided", "read-only"])
def test_mixed_batch_on_views_and_read_only_inputs(names, layout):
    """Inputs beside the happy path: Fortran-ordered / strided / read-only x and factors stored as
    transposed or strided views give the row-by-row result, and nothing is modified."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(5)
    state = _state(xp, rng)
    ads, factors = {}, {}
    for i in range(4):                                      # ranks 1..4, factors in odd layouts
        r = i + 1
        A = np.asfortranarray(rng.standard_normal((r, 10)))
        B = rng.standard_normal((r, 16)).T[::2]             # (8, r), strided rows, transposed
        cfg = pm.LoraConfig(r=r, lora_alpha=1.5 * r + 1, target_modules=["lin"])
        ads[f"a{i}"] = Adapter(cfg, {"lin": {"lora_A.weight": A, "lora_B.weight": B}})
        factors[f"a{i}"] = (A, B, (1.5 * r + 1) / r)
    full = rng.standard_normal((8, 6, 10))
    x = {"fortran": np.asfortranarray(full[:, :3]), "strided": full[:, ::2], "read-only": full[:, :3].copy()}[layout]
    if layout == "read-only":
        x.setflags(write=False)
        for A, B, _ in factors.values():
            A.setflags(write=False)
    before = {k: np.array(v, copy=True) for k, v in [("x", x)] + [(n, f[0]) for n, f in factors.items()]}
    y = mixed_batch_forward("lin", x, state, ads, names)
    np.testing.assert_allclose(y, _rowwise(x, state, factors, names), rtol=1e-12, atol=1e-12)
    assert np.array_equal(x, before["x"]) and all(np.array_equal(factors[n][0], before[n]) for n in factors)


def test_mixed_batch_on_a_permuted_torch_view():
    """A torch input that is a permuted (non-contiguous) view gives the row-by-row result."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    rng = np.random.default_rng(6)
    state = _state(xp, rng)
    ads = {f"a{i}": _adapter(xp, rng, r=i + 2, alpha=3.0 + i) for i in range(3)}
    factors = {n: (to_np(a.params["lin"]["lora_A.weight"]), to_np(a.params["lin"]["lora_B.weight"]),
                   (3.0 + i) / (i + 2)) for i, (n, a) in enumerate(ads.items())}
    host = rng.standard_normal((3, 5, 10))                 # (tokens, batch, in), viewed as (batch, tokens, in)
    x = torch.from_numpy(host).permute(1, 0, 2)
    assert not x.is_contiguous()
    names = ["a1", BASE, "a0", "a2", "a1"]
    y = mixed_batch_forward("lin", x, state, ads, names)
    np.testing.assert_allclose(to_np(y), _rowwise(host.transpose(1, 0, 2), {k: to_np(v) for k, v in state.items()},
                                                  factors, names), rtol=1e-12, atol=1e-12)


def _numpy_case(rng, dtype, ranks, names, tokens, inn=10, out=8):
    """Adapters of ``ranks`` (named a0, a1, ...) over Linear(inn, out), an input for ``names`` and the
    (A, B, s) triples in float64 for the row-by-row reference."""
    ads, factors = {}, {}
    for i, r in enumerate(ranks):
        A, B = rng.standard_normal((r, inn)).astype(dtype), rng.standard_normal((out, r)).astype(dtype)
        alpha = 1.5 * r + 1                                 # s = alpha / r: not a power of two
        ads[f"a{i}"] = Adapter(pm.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]),
                               {"lin": {"lora_A.weight": A, "lora_B.weight": B}})
        factors[f"a{i}"] = (A.astype(np.float64), B.astype(np.float64), alpha / r)
    state = {"lin.weight": rng.standard_normal((out, inn)).astype(dtype),
             "lin.bias": rng.standard_normal(out).astype(dtype)}
    x = rng.standard_normal((len(names), tokens, inn)).astype(dtype)
    return ads, factors, state, x


@given(seed=st.integers(0, 2**31 - 1), tokens=st.sampled_from([1, 3]), dtype=st.sampled_from(["float32", "float64"]),
       small=st.sampled_from([None, 2, 4, 7]))
def test_numpy_path_equals_the_generic_path(seed, tokens, dtype, small):
    """The NumPy path (one sort, one gather, factors prepared once, long segments in pieces) gives the
    generic path's terms within float round-off, and both the row-by-row float64 result; ``small`` shrinks
    the small-call limit (and the narrowest slice) so that the products of a segment are cut into slices of
    the input dimension and of the output columns."""
    import array_api_compat.numpy as xp

    from peftmath import multi

    rng = np.random.default_rng(seed)
    ranks = [1, 3, 8, 9, 12]                                # both layouts of Aᵀ (r <= 8 and r > 8)
    choices = [f"a{i}" for i in range(len(ranks))] + [BASE]
    names = list(rng.choice(choices, int(rng.integers(1, 13))))
    ads, factors, state, x = _numpy_case(rng, np.dtype(dtype), ranks, names, tokens)
    mods = {n: ads[n].module("lin", weight_shape=(8, 10)) for n in dict.fromkeys(names) if n != BASE}
    order = list(mods)
    layer = ads["a0"].module("lin", weight_shape=(8, 10)).layer
    cd = np.dtype(dtype).type
    prepared = [multi._numpy_factors(multi._Prepared(ads[n], "lin", mods[n]), cd) for n in order]
    old = multi._SMALL_GEMM, multi._MIN_SLICE
    try:
        if small is not None:
            multi._SMALL_GEMM = small * 12 * 3              # slices of `small` columns at 3 rows of rank 12
            multi._MIN_SLICE = (2, 2)
        fast = multi._numpy_terms(x, prepared, {n: i for i, n in enumerate(order)}, names, layer, cd)
    finally:
        multi._SMALL_GEMM, multi._MIN_SLICE = old
    generic = multi._segmented_terms(xp, x, mods, order, names, layer, cd, None)
    assert fast.dtype == generic.dtype == np.dtype(dtype) and fast.shape == generic.shape == (len(names), tokens, 8)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(fast, generic, rtol=tol, atol=tol)
    want = np.zeros((len(names), tokens, 8))
    for b, n in enumerate(names):
        if n != BASE:
            A, B, s = factors[n]
            want[b] = s * (x[b].astype(np.float64) @ A.T) @ B.T
    np.testing.assert_allclose(fast, want, rtol=tol, atol=tol)
    # and the whole forward, through an AdapterSet (cached preparation), twice
    s_ = AdapterSet(ads)
    for _ in range(2):
        y = s_.mixed_batch_forward("lin", x, state, names)
        np.testing.assert_allclose(y, _rowwise(x, state, factors, names), rtol=tol, atol=tol)


def test_slices_of_a_segment():
    """:func:`multi._slice` keeps each call under the small-call limit with slices no narrower than asked (else
    one call), and :func:`multi._segment_terms` on a Linear(4096, 4096)-sized segment (both products sliced)
    equals the float64 product within float32 round-off."""
    from peftmath import multi

    small = multi._SMALL_GEMM
    for rows, r, dim, least in ((16, 64, 4096, 128), (8, 64, 4096, 512), (64, 64, 4096, 512), (2, 8, 4096, 128),
                                (3, 12, 10, 2)):
        w = multi._slice(rows, r, dim, least)
        if rows * r * dim <= small or small // (rows * r) < least:
            assert w == dim
        else:
            assert least <= w < dim and rows * r * w <= small
    rng = np.random.default_rng(0)
    k, r, n = 8, 64, 4096
    assert multi._slice(k, r, n, multi._MIN_SLICE[0]) < n and multi._slice(k, r, n, multi._MIN_SLICE[1]) < n
    xs = rng.standard_normal((k, n)).astype(np.float32)
    At = np.ascontiguousarray((rng.standard_normal((r, n)) / 64).T.astype(np.float32))
    sBt = (rng.standard_normal((r, n)) / 8).astype(np.float32)
    ys = np.full((k, n), np.nan, dtype=np.float32)
    multi._segment_terms(xs, At, sBt, ys)
    want = (xs.astype(np.float64) @ At.astype(np.float64)) @ sBt.astype(np.float64)
    scale = (np.abs(xs).astype(np.float64) @ np.abs(At)) @ np.abs(sBt)
    assert np.all(np.abs(ys - want) <= 4 * (n + r) * 2.0 ** -24 * scale)


def test_adapter_set_prepares_once_and_sees_replaced_adapters(monkeypatch):
    """An AdapterSet binds and prepares an adapter's module once; an adapter deleted and added again, a
    replaced factor array or a new scale is prepared again (identity checks), so the result follows."""
    rng = np.random.default_rng(7)
    names = ["a0", BASE, "a1", "a0"]
    ads, factors, state, x = _numpy_case(rng, np.dtype("float64"), [2, 3], names, 2)
    s = AdapterSet(ads)
    bound = []
    real = Adapter.module
    monkeypatch.setattr(Adapter, "module", lambda self, *a, **k: bound.append(1) or real(self, *a, **k))
    y1 = s.mixed_batch_forward("lin", x, state, names)
    n1 = len(bound)
    y2 = s.mixed_batch_forward("lin", x, state, names)
    assert n1 == 2 and len(bound) == n1 and np.array_equal(y1, y2)
    np.testing.assert_allclose(y1, _rowwise(x, state, factors, names), rtol=1e-12, atol=1e-12)
    # a replaced factor array
    A0 = rng.standard_normal((2, 10))
    s.adapters["a0"].params["lin"]["lora_A.weight"] = A0
    factors["a0"] = (A0, factors["a0"][1], factors["a0"][2])
    np.testing.assert_allclose(s.mixed_batch_forward("lin", x, state, names), _rowwise(x, state, factors, names),
                               rtol=1e-12, atol=1e-12)
    # a new scale (Adapter.scale multiplies the scaling, as PEFT's set_scale)
    s.adapters["a1"].scale = 0.25
    factors["a1"] = (factors["a1"][0], factors["a1"][1], 0.25 * factors["a1"][2])
    np.testing.assert_allclose(s.mixed_batch_forward("lin", x, state, names), _rowwise(x, state, factors, names),
                               rtol=1e-12, atol=1e-12)
    # deleted and added again under the same name, with other factors
    s.delete("a1")
    other, f_other, _, _ = _numpy_case(rng, np.dtype("float64"), [4], ["a0"], 2)
    s.add("a1", other["a0"])
    factors["a1"] = f_other["a0"]
    np.testing.assert_allclose(s.mixed_batch_forward("lin", x, state, names), _rowwise(x, state, factors, names),
                               rtol=1e-12, atol=1e-12)


def test_numpy_path_takes_half_precision_and_non_contiguous_inputs():
    """float16 inputs with float32 weights are cast once (terms in float32, the sum rounded once to
    float32); a batch already grouped by adapter is used in place, without a permutation."""
    rng = np.random.default_rng(8)
    names = ["a0", "a0", "a1", BASE]                        # already grouped
    ads, factors, state, x = _numpy_case(rng, np.dtype("float32"), [2, 9], names, 3)
    x16 = x.astype(np.float16)[:, ::-1]                     # half precision, a reversed (strided) view
    y = mixed_batch_forward("lin", x16, state, ads, names)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, _rowwise(x16.astype(np.float64), state, factors, names), rtol=2e-5, atol=2e-5)
