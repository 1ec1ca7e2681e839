"""Trainable tokens (PEFT's TRAINABLE_TOKENS): merge, unmerge and forward against an independent NumPy reference
(a row-by-row loop over the token indices, float64 or the exact rounding of ``astype``), on every layout, with
the record, duplicates, out-of-range ids, the config, the initialisation and the refusals (delta weight,
``peftmath verify``, scale)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import describe_method
from peftmath.methods import trainable_tokens as tt

BF16 = np.dtype(ml_dtypes.bfloat16)
V, D = 13, 5


def _module(indices, delta, kind="Embedding", shape=(V, D)):
    cfg = tt.TrainableTokensConfig(target_modules=["emb"], token_indices=list(indices))
    cfg.validate()
    return tt.TrainableTokensModule("emb", cfg, {"trainable_tokens_delta": delta}, Layer.of(shape, kind))


def _reference(W, indices, delta):
    """W with row t_j := delta_j (cast to W's dtype), one row at a time, in order (later rows win)."""
    out = np.array(W, copy=True)
    for j, t in enumerate(indices):
        out[t] = np.asarray(delta[j]).astype(W.dtype)
    return out


def _data(seed=0, dtype=np.float32, k_dtype=np.float32, indices=(1, 4, 5, 6, 12)):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, D)).astype(dtype)
    delta = rng.standard_normal((len(indices), D)).astype(k_dtype)
    return W, list(indices), delta


LAYOUTS = {
    "C": lambda w: w.copy(),
    "Fortran": np.asfortranarray,
    "permuted": lambda w: np.ascontiguousarray(w.T).T,
    "row-sliced": lambda w: np.repeat(w, 2, axis=0)[::2],
    "col-sliced": lambda w: np.repeat(w, 2, axis=1)[:, ::2],
}


@pytest.mark.parametrize("kind", ["Embedding", "Linear"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype,k_dtype", [(np.float32, np.float32), (np.float64, np.float32), (BF16, np.float32),
                                           (np.float16, np.float64), (np.float32, BF16)])
def test_merge_unmerge_equal_the_row_loop_bit_for_bit(kind, layout, dtype, k_dtype):
    W, idx, delta = _data(1, dtype, k_dtype)
    mod = _module(idx, delta, kind)
    want = _reference(W, idx, delta)
    Wl = LAYOUTS[layout](W)
    assert np.array_equal(Wl, W)
    res = mod.merge(Wl, None, copy=True)
    assert res.weight is not Wl and res.weight.dtype == W.dtype
    assert np.asarray(res.weight).tobytes() == want.tobytes()  # the rows are delta rounded once; the rest is W
    assert np.array_equal(Wl, W)  # copy=True never touches the input
    np.testing.assert_array_equal(res.record, W[sorted(idx)])
    assert mod.unmerge(res.weight, record=res.record).weight.tobytes() == W.tobytes()
    # copy=False: the rows written into the caller's array, then back
    target = LAYOUTS[layout](W)
    out = mod.merge(target, None, copy=False)
    assert out.weight is target and np.array_equal(target, want)
    back = mod.unmerge(target, record=out.record, copy=False)
    assert back.weight is target and np.ascontiguousarray(target).tobytes() == W.tobytes()


@pytest.mark.parametrize("n_tokens", [5, 2 * tt.MAX_RUNS_SPLICED + 3])
def test_autograd_weight_keeps_its_graph(n_tokens):
    """A torch weight that records gradients takes the out-of-place path (a concatenation of slices, or one
    ``where`` for many scattered ids): the reference values, and gradients reach both W and the rows."""
    torch = pytest.importorskip("torch")
    vocab = 4 * n_tokens
    rng = np.random.default_rng(12)
    idx = sorted(rng.choice(np.arange(0, vocab, 2), size=n_tokens, replace=False).tolist())  # no two adjacent
    W = rng.standard_normal((vocab, D)).astype(np.float32)
    delta = rng.standard_normal((n_tokens, D)).astype(np.float32)
    tW, td = torch.tensor(W, requires_grad=True), torch.tensor(delta, requires_grad=True)
    cfg = tt.TrainableTokensConfig(target_modules=["emb"], token_indices=idx)
    mod = tt.TrainableTokensModule("emb", cfg, {"trainable_tokens_delta": td}, Layer.of((vocab, D), "Embedding"))
    out = mod.merge(tW).weight
    np.testing.assert_array_equal(out.detach().numpy(), _reference(W, idx, delta))
    out.sum().backward()
    np.testing.assert_array_equal(td.grad.numpy(), np.ones_like(delta))
    g = np.ones_like(W)
    g[idx] = 0.0
    np.testing.assert_array_equal(tW.grad.numpy(), g)


def test_read_only_weight_is_refused_in_place_and_merged_as_a_copy():
    W, idx, delta = _data(2)
    ro = W.copy()
    ro.flags.writeable = False
    mod = _module(idx, delta)
    with pytest.raises(UnsupportedError, match=r"emb: copy=False .*read-only.*use copy=True"):
        mod.merge(ro, copy=False)
    assert np.array_equal(ro, W)
    np.testing.assert_array_equal(mod.merge(ro).weight, _reference(W, idx, delta))


def test_unmerge_needs_the_record():
    W, idx, delta = _data(3)
    mod = _module(idx, delta)
    merged = mod.merge(W).weight
    with pytest.raises(NotInvertibleError, match=r"emb: unmerging trainable tokens needs the original rows.*records="):
        mod.unmerge(merged)
    with pytest.raises(ShapeError, match=r"merge record has shape \(2, 5\), expected \(5, 5\)"):
        mod.unmerge(merged, record=W[:2])
    assert mod.needs_record() and describe_method("TRAINABLE_TOKENS").needs_record(mod)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_merges_into_one_shared_table_unmerge_in_either_order(order):
    """A tied embedding and lm_head (PEFT saves the tied adapter under both names): two modules with the same
    rows merge into one array in place; their records differ (the second sees the first's rows), and unmerging
    both in the same order (as Adapter.unmerge does) or in reverse gives the original table back."""
    W, idx, delta = _data(4)
    table = W.copy()
    mods = {"a": _module(idx, delta), "b": _module(idx, delta, "Linear")}
    recs = {n: mods[n].merge(table, copy=False).record for n in order}
    np.testing.assert_array_equal(table, _reference(W, idx, delta))
    for seq in (order, order[::-1]):
        t = table.copy()
        for n in seq:
            mods[n].unmerge(t, record=recs[n], copy=False)
        assert t.tobytes() == W.tobytes(), seq


def test_repeated_indices_equal_rows_are_merged_once_different_rows_refused():
    W, _, _ = _data(5)
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((4, D)).astype(np.float32)
    delta[2] = delta[0]
    mod = _module([7, 2, 7, 9], delta)
    np.testing.assert_array_equal(mod.merge(W).weight, _reference(W, [7, 2, 7, 9], delta))
    assert mod.describe() == {"tokens": 3} and mod.num_parameters() == 4 * D  # PEFT's parameter has k rows
    delta[2, 3] += 1.0
    with pytest.raises(UnsupportedError, match=r"emb: token_indices repeats a token with different .*token 7 at "
                                               r"positions 0 and 2.*unspecified"):
        _module([7, 2, 7, 9], delta)


def test_out_of_range_and_negative_indices():
    W, _, delta = _data(6)
    with pytest.raises(ShapeError, match=r"emb: token index 13 \(token_indices\[4\]\) is outside the table of V = 13"):
        _module([1, 4, 5, 6, 13], delta)
    with pytest.raises(ConfigError, match=r"token_indices.*negative token ids \[-1\]"):
        tt.TrainableTokensConfig(token_indices=[1, -1]).validate()
    with pytest.raises(ConfigError, match=r"token_indices.*list of integers"):
        tt.TrainableTokensConfig(token_indices=[1, 2.0]).validate()
    with pytest.raises(ShapeError, match=r"trainable_tokens_delta has shape \(5, 5\), expected \(k, D\) = \(4, 5\)"):
        _module([1, 2, 3, 4], delta)


def test_embedding_forward_is_the_lookup_in_the_merged_table():
    W, idx, delta = _data(7)
    mod = _module(idx, delta)
    ids = np.random.default_rng(7).integers(0, V, size=(3, 8))
    ids[0, :5] = idx
    merged = _reference(W, idx, delta)
    y = mod.forward(ids, W)
    assert y.shape == (3, 8, D) and y.tobytes() == merged[ids].tobytes()
    np.testing.assert_array_equal(mod.forward(ids, W, embed_scale=2.5), merged[ids] * np.float32(2.5))
    Wb = W.astype(BF16)
    yb = _module(idx, delta).forward(ids, Wb, embed_scale=0.3)
    assert yb.dtype == BF16 and yb.tobytes() == (_reference(Wb, idx, delta)[ids] * np.asarray(0.3, BF16)).tobytes()
    with pytest.raises(ShapeError, match=r"emb: token id 13 is outside the table of V = 13"):
        mod.forward(np.array([0, 13]), W)
    with pytest.raises(ShapeError, match=r"an Embedding takes integer token ids.*kind='Linear'"):
        mod.forward(np.ones((2, D), np.float32), W)
    with pytest.raises(UnsupportedError, match="max_norm"):
        mod.forward(ids, W, max_norm=1.0)


def test_linear_forward_has_the_bias_peft_compat_drops_it():
    W, idx, delta = _data(8, np.float64)
    b = np.random.default_rng(8).standard_normal(V)
    x = np.random.default_rng(9).standard_normal((2, 3, D))
    mod = _module(idx, delta, "Linear")
    merged = _reference(W, idx, delta)
    np.testing.assert_allclose(mod.forward(x, W, b), x @ merged.T + b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mod.forward(x, W, b, peft_compat=True), x @ merged.T, rtol=1e-13, atol=1e-13)
    with pytest.raises(ShapeError, match="embed_scale applies to an Embedding"):
        mod.forward(x, W, b, embed_scale=2.0)


def test_no_delta_weight_no_scale_and_verify_refuses_by_name(tmp_path):
    from peftmath.io.safetensors import save_file
    from peftmath.io.stream import open_model
    from peftmath.verify import verify

    W, idx, delta = _data(9)
    mod = _module(idx, delta)
    assert not mod.additive
    with pytest.raises(UnsupportedError, match="TRAINABLE_TOKENS replaces rows.*no standalone delta weight"):
        mod.delta_weight()
    cfg = tt.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=idx)
    ad = pm.Adapter(cfg, {"embed_tokens": {"trainable_tokens_delta": delta}})
    with pytest.raises(UnsupportedError, match="no linear scale"):
        ad.merge({"embed_tokens.weight": W}, scale=0.5)
    save_file({"embed_tokens.weight": W}, tmp_path / "b.safetensors", metadata={"format": "pt"})
    merged = {k: np.asarray(v) for k, v in ad.merge({"embed_tokens.weight": W}).items()}
    save_file(merged, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match="TRAINABLE_TOKENS.*verify"):
        verify(open_model(tmp_path / "b.safetensors"), [ad], open_model(tmp_path / "m.safetensors"))


def test_adapter_round_trip_with_records_and_a_checkpoint(tmp_path):
    W, idx, delta = _data(10)
    cfg = tt.TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=idx)
    rng = np.random.default_rng(10)
    ad = pm.Adapter(cfg, {"embed_tokens": {"trainable_tokens_delta": delta},
                          "lm_head": {"trainable_tokens_delta": rng.standard_normal((5, D)).astype(np.float32)}},
                    layer_kinds={"lm_head": "Linear"})
    state = {"embed_tokens.weight": W, "lm_head.weight": rng.standard_normal((V, D)).astype(np.float32),
             "lm_head.bias": rng.standard_normal(V).astype(np.float32)}
    records: dict = {}
    merged = ad.merge(state, records=records)
    assert sorted(records) == ["embed_tokens", "lm_head"]
    np.testing.assert_array_equal(merged["lm_head.bias"], state["lm_head.bias"])
    back = ad.unmerge(merged, records=records)
    for k in state:
        assert np.asarray(back[k]).tobytes() == state[k].tobytes()
    with pytest.raises(NotInvertibleError):
        ad.unmerge(merged)
    pm.save_adapter(ad, tmp_path / "a")
    again = pm.load_adapter(tmp_path / "a")
    assert again.layer_kinds.get("lm_head") in ("Linear", LayerKind.LINEAR)
    x = rng.standard_normal((2, D)).astype(np.float32)
    np.testing.assert_array_equal(again.forward("lm_head", x, state), ad.forward("lm_head", x, state))
    assert again.num_trainable_parameters() == 2 * 5 * D
    for k, v in again.merge(state).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(merged[k]))


def test_initialisation():
    W, idx, _ = _data(11)
    cfg = tt.TrainableTokensConfig(target_modules=["emb"], token_indices=[3, 1, 3])
    layer = Layer.of((V, D), "Embedding")
    p, new_w = describe_method("TRAINABLE_TOKENS").initialize("emb", cfg, layer, weight=W)
    assert new_w is None
    np.testing.assert_array_equal(p["trainable_tokens_delta"], W[[3, 1, 3]])  # the identity: merge changes nothing
    np.testing.assert_array_equal(tt.TrainableTokensModule("emb", cfg, p, layer).merge(W).weight, W)
    rnd = cfg.replace(init_weights=False)
    a, _ = describe_method("TRAINABLE_TOKENS").initialize("emb", rnd, layer, weight=W.astype(BF16), seed=4)
    d = a["trainable_tokens_delta"]
    assert d.dtype == BF16 and d.shape == (3, D) and np.array_equal(d[0], d[2]) and not np.array_equal(d[0], d[1])
    host = np.random.default_rng(4).standard_normal((3, D))
    np.testing.assert_array_equal(d[:2], host[:2].astype(np.float32).astype(BF16))
    with pytest.raises(ShapeError, match=r"init_weights=true .*pass the base weight"):
        describe_method("TRAINABLE_TOKENS").initialize("emb", cfg, layer)
    with pytest.raises(UnsupportedError, match="not defined for a Conv1D layer"):
        describe_method("TRAINABLE_TOKENS").initialize("emb", cfg, Layer.of((D, V), "Conv1D"), weight=W.T)


def test_config_is_peft_shaped():
    cfg = tt.TrainableTokensConfig(target_modules="model.embed_tokens", token_indices=[1, 2])
    cfg.validate()
    d = cfg.to_dict()
    assert d["peft_type"] == "TRAINABLE_TOKENS" and d["token_indices"] == [1, 2] and d["init_weights"] is True
    assert not {"modules_to_save", "exclude_modules", "layers_to_transform", "layers_pattern"} & set(d)
    with pytest.raises(ConfigError, match="no field 'modules_to_save'"):
        tt.TrainableTokensConfig(token_indices=[1], modules_to_save=["x"]).validate()
    assert tt.TrainableTokensConfig.from_dict(d) == cfg
