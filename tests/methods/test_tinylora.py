"""TinyLoRA's own math against independent float64 computations (explicit sums over the projections, NumPy's
SVD in float64), the weight-tying groups, the module-to-vector link and its refusals, layouts and dtypes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmath import Adapter
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import tinylora


def _R_loop(v, P):
    """``R = Σ_i v_i P_i`` by an explicit loop, float64."""
    return sum(float(v[i]) * P[i].astype(np.float64) for i in range(len(v)))


def _factors(rows, cols, r, u, seed):
    rng = np.random.default_rng(seed)
    k = min(r, rows, cols)
    return (rng.standard_normal((k, cols)), rng.standard_normal((rows, k)), rng.standard_normal((u, k, k)),
            rng.standard_normal(u))


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Embedding"])
def test_delta_forward_merge_vs_float64_loops(kind):
    rows, cols = 7, 5  # B has `rows` rows, A `cols` columns
    A, B, P, v = _factors(rows, cols, 3, 4, seed=1)
    R = _R_loop(v, P)
    M = B @ R @ A  # (rows, cols), the decomposed orientation
    shape = (cols, rows) if kind == "Conv1D" else (rows, cols)
    layer = Layer.of(shape, kind)
    want = M.T if kind == "Conv1D" else M
    np.testing.assert_allclose(tinylora.delta_weight(A, B, P, v, layer=layer), want, rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(2)
    W = rng.standard_normal(shape)
    np.testing.assert_allclose(tinylora.merge(W, A, B, P, v, layer=layer), W + want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tinylora.unmerge(W + want, A, B, P, v, layer=layer), W, rtol=1e-12, atol=1e-12)
    if kind == "Embedding":
        ids = rng.integers(0, rows, size=(2, 3))
        y = tinylora.forward(ids, W, A, B, P, v, layer=layer)
        np.testing.assert_allclose(y, (W + M)[ids], rtol=1e-12, atol=1e-12)
    else:
        x = rng.standard_normal((2, 3, layer.in_features))
        b = rng.standard_normal(layer.out_features)
        Wm = W.T if kind == "Conv1D" else W  # (out, in)
        y = tinylora.forward(x, W, A, B, P, v, bias=b, layer=layer)
        np.testing.assert_allclose(y, x @ (Wm + M).T + b, rtol=1e-12, atol=1e-12)


def test_core_is_the_weighted_sum_of_projections():
    _, _, P, v = _factors(4, 4, 3, 6, seed=3)
    np.testing.assert_allclose(tinylora.core(v, P), _R_loop(v, P), rtol=1e-13)
    with pytest.raises(ShapeError, match=r"v \(5,\) and P \(6, 3, 3\)"):
        tinylora.core(v[:5], P)


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Embedding"])
def test_svd_factors_are_the_best_rank_r_part(kind):
    rng = np.random.default_rng(4)
    shape = (9, 6)
    W = rng.standard_normal(shape).astype(np.float32)
    A, B = tinylora.svd_factors(W, 2, layer=kind)
    M = W.T if kind == "Conv1D" else W
    U, s, Vt = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    best = (U[:, :2] * s[:2]) @ Vt[:2]
    assert A.dtype == B.dtype == np.float32 and A.shape == (2, M.shape[1]) and B.shape == (M.shape[0], 2)
    np.testing.assert_allclose(B.astype(np.float64) @ A, best, atol=1e-5)
    # the singular values are split evenly: row norms of A equal column norms of B, both √s
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.sqrt(s[:2]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.sqrt(s[:2]), rtol=1e-5)
    A1, B1 = tinylora.svd_factors(W[:1], 4, layer="Linear")  # r' = min(r, rows, cols)
    assert A1.shape == (1, 6) and B1.shape == (1, 1)


@given(n=st.integers(1, 60), wt=st.floats(0.0, 1.0))
@settings(max_examples=200, deadline=None)
def test_groups_cover_every_vector_in_order(n, wt):
    """Every group index below ``groups`` is used, in non-decreasing order of place; weight_tying 0 gives
    one vector per layer, 1 one vector for all."""
    groups, size = tinylora.group_plan(n, wt)
    got = [tinylora.group_of(i, n, wt) for i in range(n)]
    assert sorted(set(got)) == list(range(groups)) and got == sorted(got)
    assert groups == max(1, round(n * (1 - wt))) and size >= 1
    assert tinylora.group_plan(n, 0.0) == (n, 1) and tinylora.group_plan(n, 1.0)[0] == 1


def _adapter_params(n, r=2, u=3, seed=0):
    """``n`` Linear modules named in reverse alphabetical order of their place, P from PEFT's stream."""
    rng = np.random.default_rng(seed)
    names = [f"m{n - i:02d}" for i in range(n)]
    params = {}
    for i, name in enumerate(names):
        params[name] = {"tinylora_A": rng.standard_normal((r, 5)), "tinylora_B": rng.standard_normal((4, r)),
                        "tinylora_P": tinylora.projection(42 + i, u, r)}
    return names, params


@pytest.mark.parametrize(("n", "wt"), [(4, 0.0), (5, 0.5), (6, 0.7), (3, 1.0)])
def test_link_finds_each_module_by_its_projection(n, wt):
    cfg = tinylora.TinyLoraConfig(r=2, u=3, weight_tying=wt)
    names, params = _adapter_params(n)
    groups, _ = tinylora.group_plan(n, wt)
    rng = np.random.default_rng(9)
    shared = {tinylora.v_key(g): rng.standard_normal(3) for g in range(groups)}
    shuffled = {m: params[m] for m in sorted(params)}  # a file's order: by name, not by place
    links = tinylora.link_modules(cfg, shuffled, shared)
    for i, m in enumerate(names):
        assert links[m] == {"tinylora_v": tinylora.v_key(tinylora.group_of(i, n, wt))}
    # the adapter binds each module to that vector: ΔW uses it
    ad = Adapter(cfg, shuffled, shared=shared)
    for i, m in enumerate(names):
        v = shared[tinylora.v_key(tinylora.group_of(i, n, wt))]
        p = params[m]
        want = p["tinylora_B"] @ _R_loop(v, p["tinylora_P"]) @ p["tinylora_A"]
        np.testing.assert_allclose(ad.delta_weight(m, weight_shape=(4, 5)), want, rtol=1e-6, atol=1e-9)
    assert ad.num_trainable_parameters() == 3 * groups
    part = copy.copy(ad)  # the streamer's per-module parts keep the links computed with every module
    part.params = {names[-1]: params[names[-1]]}
    np.testing.assert_allclose(part.delta_weight(names[-1], weight_shape=(4, 5)),
                               ad.delta_weight(names[-1], weight_shape=(4, 5)))


def test_link_refusals():
    cfg = tinylora.TinyLoraConfig(r=2, u=3, weight_tying=0.0)
    names, params = _adapter_params(3)
    shared = {tinylora.v_key(g): np.zeros(3) for g in range(3)}
    with pytest.raises(CheckpointError, match=r"PEFT makes 3 vector.*the checkpoint has 2"):
        tinylora.link_modules(cfg, params, {k: shared[k] for k in list(shared)[:2]})
    bad = {m: dict(p) for m, p in params.items()}
    bad[names[1]]["tinylora_P"] = -bad[names[1]]["tinylora_P"]
    with pytest.raises(CheckpointError, match=rf"{names[1]}: with 3 weight-tying groups over 3 modules"):
        Adapter(cfg, bad, shared=shared)
    twin = {m: dict(p) for m, p in params.items()}
    twin[names[2]]["tinylora_P"] = twin[names[0]]["tinylora_P"]
    with pytest.raises(CheckpointError, match="same projection"):
        tinylora.link_modules(cfg, twin, shared)
    no_p = {m: {k: a for k, a in p.items() if k != "tinylora_P"} for m, p in params.items()}
    with pytest.raises(CheckpointError, match="save_projection=True"):
        tinylora.link_modules(cfg, no_p, shared)
    # one vector: no place needed, the projections are not asked
    one = tinylora.TinyLoraConfig(r=2, u=3, weight_tying=1.0)
    assert set(tinylora.link_modules(one, bad, {tinylora.v_key(0): np.zeros(3)})[names[1]].values()) == \
        {tinylora.v_key(0)}


def test_projection_matching_survives_half_precision_rounding():
    """PEFT casts P to a half-precision model's dtype: the place is still found."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    P = tinylora.projection(47, 4, 3)
    assert tinylora._place_of(P.astype(ml_dtypes.bfloat16), 42, 8) == 5
    assert tinylora._place_of(P.astype(ml_dtypes.bfloat16).astype(np.float32), 42, 8) == 5
    assert tinylora._place_of(P.astype(np.float16), 42, 8) == 5
    assert tinylora._place_of(P, 42, 5) is None  # place 5 is not among 0..4


def test_integer_ids_are_looked_up():
    """A Linear and an Embedding of TinyLoRA hold the same tensors and ΔW; integer ids make the forward a
    lookup (an nn.Linear cannot take them)."""
    A, B, P, v = _factors(6, 4, 2, 3, seed=5)
    cfg = tinylora.TinyLoraConfig(r=2, u=3)
    ad = Adapter(cfg, {"emb": {"tinylora_A": A, "tinylora_B": B, "tinylora_P": P}},
                 shared={tinylora.v_key(0): v})
    W = np.random.default_rng(6).standard_normal((6, 4))
    ids = np.array([[0, 5, 2]])
    want = (W + B @ _R_loop(v, P) @ A)[ids]
    np.testing.assert_allclose(ad.forward("emb", ids, {"emb.weight": W}), want, rtol=1e-12)
    np.testing.assert_allclose(ad.forward("emb", ids, {"emb.weight": W}, kind="Embedding"), want, rtol=1e-12)


@pytest.mark.parametrize("layout", ["F", "permuted", "readonly"])
def test_inplace_layouts_and_float32(layout):
    A, B, P, v = (a.astype(np.float32) for a in _factors(8, 6, 3, 4, seed=7))
    W0 = np.random.default_rng(8).standard_normal((8, 6)).astype(np.float32)
    want = W0.astype(np.float64) + B.astype(np.float64) @ _R_loop(v, P) @ A.astype(np.float64)
    if layout == "readonly":
        W = W0.copy()
        W.flags.writeable = False
        with pytest.raises(UnsupportedError, match="copy=True"):
            tinylora.merge(W, A, B, P, v, copy=False)
        np.testing.assert_array_equal(W, W0)
        return
    W = np.asfortranarray(W0) if layout == "F" else np.ascontiguousarray(W0.T).T
    out = tinylora.merge(W, A, B, P, v, copy=False)
    assert out is W
    np.testing.assert_allclose(W, want, rtol=0, atol=4e-6 * np.max(np.abs(want)))
    tinylora.unmerge(W, A, B, P, v, copy=False)
    np.testing.assert_allclose(W, W0, rtol=0, atol=8e-6 * np.max(np.abs(want)))


def test_initialize_and_init_shared():
    rng = np.random.default_rng(10)
    cfg = tinylora.TinyLoraConfig(r=2, u=5, weight_tying=1.0, init_weights="uniform", init_v_bound=0.3)
    layers = [Layer.of((6, 4)), Layer.of((4, 6), "Conv1D"), Layer.of((9, 4), "Embedding")]
    shared = tinylora.init_shared(cfg, layers, seed=1)
    assert sorted(k for k in shared if k.startswith("base_model.")) == [tinylora.v_key(0)]
    v = shared[tinylora.v_key(0)]
    assert v.dtype == np.float32 and np.all(np.abs(v) <= 0.3) and np.any(v != 0)
    params = {}
    for i, lay in reversed(list(enumerate(layers))):  # any order: each layer its own noted place
        W = rng.standard_normal(lay.weight_shape).astype(np.float32)
        p, new = tinylora.TinyLoraModule.initialize(f"m{i}", cfg, lay, weight=W, shared=shared)
        assert new is None
        np.testing.assert_array_equal(p["tinylora_P"], tinylora.projection(42 + i, 5, 2))
        A, B = tinylora.svd_factors(W, 2, layer=lay)
        np.testing.assert_array_equal(p["tinylora_A"], A)
        params[f"m{i}"] = p
    assert set(shared) == {tinylora.v_key(0)}  # the note is gone
    Adapter(cfg, params, shared=shared)
    zero = tinylora.TinyLoraConfig(r=2, u=5)
    p, _ = tinylora.TinyLoraModule.initialize("m", zero, Layer.of((6, 4)), weight=np.ones((6, 4), np.float32))
    assert np.all(p[tinylora.v_key(0)] == 0)  # no shared=: the vector comes with the params; default v = 0
    with pytest.raises(UnsupportedError, match="weight_tying=1.0"):
        tinylora.init_shared(tinylora.TinyLoraConfig(r=2, u=5), layers)
    with pytest.raises(ConfigError, match="pass weight="):
        tinylora.TinyLoraModule.initialize("m", zero, Layer.of((6, 4)))
    with pytest.raises(ShapeError, match="Conv2d"):
        tinylora.TinyLoraModule.initialize("m", zero, Layer.of((6, 4, 3, 3)), weight=np.ones((6, 4, 3, 3)))


def test_config_validation():
    for bad, match in ((dict(u=0), "'u'"), (dict(weight_tying=1.5), "weight_tying"), (dict(init_weights="gauss"),
                       "init_weights"), (dict(bias="lora_only"), "bias"), (dict(exclude_modules=["x"]),
                       "exclude_modules")):
        with pytest.raises(ConfigError, match=match):
            tinylora.TinyLoraConfig(**bad).validate()
    assert "exclude_modules" not in tinylora.TinyLoraConfig().to_dict()


def test_bad_shapes_are_refused():
    A, B, P, v = _factors(6, 4, 2, 3, seed=11)
    with pytest.raises(ShapeError, match=r"tinylora_A \(2, 4\) and tinylora_B \(6, 2\) do not fit"):
        tinylora.merge(np.zeros((6, 5)), A, B, P, v)
    with pytest.raises(ShapeError, match=r"tinylora_P \(3, 2, 2\) and v \(4,\)"):
        tinylora.merge(np.zeros((6, 4)), A, B, P, np.zeros(4))
    cfg = tinylora.TinyLoraConfig(r=2, u=4)
    with pytest.raises(ShapeError, match="u=4"):
        Adapter(cfg, {"m": {"tinylora_A": A, "tinylora_B": B, "tinylora_P": P}},
                shared={tinylora.v_key(0): v}).module("m", weight_shape=(6, 4))
    assert LayerKind.EMBEDDING in tinylora.METHOD.layer_kinds
