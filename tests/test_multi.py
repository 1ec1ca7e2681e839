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
