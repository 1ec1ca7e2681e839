"""LoRA variants with LoRA's inference math (specs/lora.md, "12. Variants"): BD-LoRA's block-diagonal factors,
and VeLoRA / MonteCLoRA, whose saved tensors are training state. Compared with float64 computations that
expand the block-diagonal factor with ``scipy.linalg.block_diag`` (an independent construction); PEFT's own
numbers are checked by the PEFT matrix (tests/parity/test_peft_matrix.py) and tests/parity/test_lora_variants_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import block_diag

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath import Adapter, create_adapter
from peftmath.io.peft import config_from_dict
from peftmath.errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.methods.lora import block_diagonal

OUT, IN, R, NB = 12, 8, 4, 2


def _dense(compact: np.ndarray, nb: int) -> np.ndarray:
    """PEFT's ``weight_as_blockdiagonal_matrix``: the nb row chunks of ``compact`` on the diagonal."""
    return block_diag(*np.split(np.asarray(compact, np.float64), nb, axis=0))


def _config(**bd):
    return config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q", "o"],
                             "use_bdlora": {"nblocks": NB, "match_strict": True, **bd}})


def _bd_adapter(rng, dtype=np.float32):
    """``q`` with a block-diagonal lora_A (r, in/nb), ``o`` with a block-diagonal lora_B (out, r/nb)."""
    params = {
        "q": {"lora_A.weight": rng.standard_normal((R, IN // NB)).astype(dtype),
              "lora_B.weight": rng.standard_normal((OUT, R)).astype(dtype)},
        "o": {"lora_A.weight": rng.standard_normal((R, IN)).astype(dtype),
              "lora_B.weight": rng.standard_normal((OUT, R // NB)).astype(dtype)},
    }
    return Adapter(_config(target_modules_bd_a=["q"], target_modules_bd_b=["o"]), params)


@pytest.mark.parametrize("shape, nb", [((4, 3), 2), ((6, 5), 3), ((2, 7), 1), ((8, 1), 4)])
def test_block_diagonal_equals_scipy(shape, nb):
    M = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_array_equal(block_diagonal(M, nb), _dense(M, nb))


def test_block_diagonal_keeps_the_namespace(xp):
    M = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    got = block_diagonal(to_xp(xp, M), 2)
    assert_same_namespace(xp, got)
    np.testing.assert_array_equal(to_np(got), _dense(M, 2).astype(np.float32))


def test_bdlora_merge_forward_unmerge_against_float64():
    rng = np.random.default_rng(2)
    ad = _bd_adapter(rng)
    s = 6 / R
    base = {f"{m}.weight": rng.standard_normal((OUT, IN)).astype(np.float32) for m in ("q", "o")}
    merged = ad.merge(base)
    for m, side in (("q", "A"), ("o", "B")):
        A = np.asarray(ad.params[m]["lora_A.weight"], np.float64)
        B = np.asarray(ad.params[m]["lora_B.weight"], np.float64)
        A, B = (_dense(A, NB), B) if side == "A" else (A, _dense(B, NB))
        want = base[f"{m}.weight"] + s * B @ A
        np.testing.assert_allclose(merged[f"{m}.weight"], want, rtol=1e-5, atol=1e-5)
        x = rng.standard_normal((3, IN)).astype(np.float32)
        np.testing.assert_allclose(ad.forward(m, x, base), x @ want.T, rtol=1e-4, atol=1e-4)
    back = ad.unmerge(merged)
    for key, w in base.items():
        np.testing.assert_allclose(back[key], w, atol=1e-5)
    # the dense form is not what is saved: the compact factors are kept as read
    assert ad.params["q"]["lora_A.weight"].shape == (R, IN // NB)
    assert ad.params["o"]["lora_B.weight"].shape == (OUT, R // NB)


def test_bdlora_compact_factor_of_the_wrong_width_is_refused():
    rng = np.random.default_rng(3)
    params = {"q": {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),  # dense, not (r, in/nb)
                    "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32)}}
    ad = Adapter(_config(target_modules_bd_a=["q"]), params)
    with pytest.raises(ShapeError, match=r"q: base weight \(12, 8\) fits neither .* lora_A \(4, 8\).*use_bdlora: "
                                         r"lora_A holds the compact blocks"):
        ad.merge({"q.weight": np.zeros((OUT, IN), np.float32)})


def test_bdlora_nblocks_must_divide_the_rank():
    rng = np.random.default_rng(4)
    cfg = config_from_dict({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["q"],
                            "use_bdlora": {"nblocks": 2, "target_modules_bd_b": ["q"]}})
    params = {"q": {"lora_A.weight": rng.standard_normal((3, IN)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((OUT, 1)).astype(np.float32)}}
    with pytest.raises(ShapeError, match=r"q: BD-LoRA with nblocks=2 needs r=3"):
        Adapter(cfg, params).merge({"q.weight": np.zeros((OUT, IN), np.float32)})


@pytest.mark.parametrize("bd, match", [
    (dict(target_modules_bd_a=["q"], target_modules_bd_b=["q"]), "matches both"),
    (dict(target_modules_bd_a=["zzz"]), "matches neither"),
])
def test_bdlora_pattern_rules_are_peft_s(bd, match):
    rng = np.random.default_rng(5)
    params = {"q": {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32)}}
    with pytest.raises(ConfigError, match=match):
        Adapter(_config(**bd), params).merge({"q.weight": np.zeros((OUT, IN), np.float32)})


def test_bdlora_without_match_strict_leaves_unmatched_modules_plain():
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((R, IN)), rng.standard_normal((OUT, R))
    params = {"q": {"lora_A.weight": A.astype(np.float32), "lora_B.weight": B.astype(np.float32)}}
    ad = Adapter(_config(target_modules_bd_a=["zzz"], match_strict=False), params)
    got = ad.merge({"q.weight": np.zeros((OUT, IN), np.float32)})["q.weight"]
    np.testing.assert_allclose(got, 6 / R * B @ A, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", [{"use_dora": True}, {"velora_config": {"num_groups": 2}}])
def test_one_variant_at_a_time(other):
    with pytest.raises(ConfigError, match="PEFT 0.21.2 runs one LoRA variant per layer"):
        config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["q"],
                          "use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["q"]}, **other})


@pytest.mark.parametrize("init", [True, False])
def test_bdlora_init_draws_the_compact_factor(init):
    base = {"q.weight": np.zeros((64, 32), np.float32), "o.weight": np.zeros((64, 32), np.float32)}
    cfg = config_from_dict({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q", "o"],
                            "init_lora_weights": init,
                            "use_bdlora": {"nblocks": 4, "target_modules_bd_a": ["q"], "target_modules_bd_b": ["o"]}})
    ad = create_adapter(base, cfg, seed=0)
    A = np.asarray(ad.params["q"]["lora_A.weight"])
    assert A.shape == (8, 32 // 4)
    bound = np.sqrt(6 / (32 / 4))  # torch's kaiming_uniform_ (a = 0) over the block's fan-in
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.8 * bound
    B = np.asarray(ad.params["o"]["lora_B.weight"])
    assert B.shape == (64, 8 // 4) and not B.any()  # PEFT's block-diagonal B starts at zero, whatever the init
    assert ad.merge(base)["q.weight"].shape == (64, 32)


def _velora_adapter(rng, embed_len, groups=2):
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q"],
                            "velora_config": {"num_groups": groups, "init_type": "random", "scale": 1.0}})
    params = {"q": {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32),
                    "lora_velora_embed": rng.standard_normal(embed_len).astype(np.float32)}}
    return Adapter(cfg, params)


def test_velora_state_takes_no_part_in_the_math():
    rng = np.random.default_rng(7)
    ad = _velora_adapter(rng, IN // 2)
    A = np.asarray(ad.params["q"]["lora_A.weight"], np.float64)
    B = np.asarray(ad.params["q"]["lora_B.weight"], np.float64)
    W = rng.standard_normal((OUT, IN)).astype(np.float32)
    np.testing.assert_allclose(ad.merge({"q.weight": W})["q.weight"], W + 6 / R * B @ A, rtol=1e-5, atol=1e-5)
    assert ad.num_trainable_parameters() == R * IN + OUT * R  # the embed is a buffer


def test_velora_embed_of_the_wrong_length_is_refused():
    ad = _velora_adapter(np.random.default_rng(8), IN)
    with pytest.raises(ShapeError, match=r"q.*lora_velora_embed"):
        ad.module("q")


def test_velora_on_an_embedding_is_refused():
    rng = np.random.default_rng(9)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["emb"],
                            "velora_config": {"num_groups": 2}})
    params = {"emb": {"lora_embedding_A": rng.standard_normal((R, 10)).astype(np.float32),
                      "lora_embedding_B": rng.standard_normal((6, R)).astype(np.float32)}}
    with pytest.raises(UnsupportedError, match=r"emb: VeLoRA .* on a Embedding layer"):
        Adapter(cfg, params).module("emb")


def test_monteclora_state_shapes_are_checked():
    rng = np.random.default_rng(10)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["q"],
                            "monteclora_config": {"num_samples": 3}})
    params = {"q": {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32),
                    "lora_monteclora_sampler.std_prior": np.zeros(R, np.float32),
                    "lora_monteclora_sampler.expert_weights_prior": np.zeros(3, np.float32),
                    "lora_monteclora_sampler.gaussian_var_prior": np.eye(R, dtype=np.float32),
                    "lora_monteclora_sampler.expert_weights": np.full(3, 1 / 3, np.float32)}}
    ad = Adapter(cfg, params)
    # std_prior and expert_weights_prior are trainable, the other two buffers (PEFT's count)
    assert ad.num_trainable_parameters() == R * IN + OUT * R + R + 3
    params["q"]["lora_monteclora_sampler.gaussian_var_prior"] = np.eye(R + 1, dtype=np.float32)
    with pytest.raises(ShapeError, match=r"q.*gaussian_var_prior"):
        Adapter(cfg, params).module("q")


def test_combine_of_bdlora_gives_a_plain_lora():
    from peftmath import combine

    rng = np.random.default_rng(11)
    a, b = _bd_adapter(rng), _bd_adapter(rng)
    base = {f"{m}.weight": rng.standard_normal((OUT, IN)).astype(np.float32) for m in ("q", "o")}
    both = combine([a, b], [0.5, 0.5], combination_type="cat")
    assert both.config.use_bdlora is None
    want = {k: (np.asarray(a.merge(base)[k], np.float64) + np.asarray(b.merge(base)[k], np.float64)) / 2
            for k in base}
    got = both.merge(base)
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4)


def test_training_state_without_its_field_is_a_checkpoint_error():
    rng = np.random.default_rng(12)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["q"]})
    params = {"q": {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
                    "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32),
                    "lora_velora_embed": np.zeros(IN // 2, np.float32)}}
    with pytest.raises(CheckpointError, match="has no velora_config"):
        Adapter(cfg, params).module("q")


# --------------------------------------------------------------------------------------------------
# KaSA: the base weight's r smallest singular components dropped, ΔW = s·B diag(d) A
# --------------------------------------------------------------------------------------------------
def _kasa(rng, r=3, out=OUT, inn=IN, dtype=np.float32):
    cfg = config_from_dict({"peft_type": "LORA", "r": r, "lora_alpha": 6, "target_modules": ["q"],
                            "kasa_config": {"beta": 1e-4, "gamma": 1e-3}})
    params = {"q": {"lora_A.weight": rng.standard_normal((r, inn)).astype(dtype),
                    "lora_B.weight": rng.standard_normal((out, r)).astype(dtype),
                    "lora_diag": rng.standard_normal(r).astype(dtype)}}
    return Adapter(cfg, params)


def _kasa_reference(W, p, r, s):
    """float64: W minus its r smallest singular components (numpy's SVD), plus s·B diag(d) A."""
    U, S, Vh = np.linalg.svd(np.asarray(W, np.float64), full_matrices=False)
    k = S.shape[0]
    dropped = (U[:, k - r:] * S[k - r:]) @ Vh[k - r:]
    A, B, d = (np.asarray(p[k_], np.float64) for k_ in ("lora_A.weight", "lora_B.weight", "lora_diag"))
    return W - dropped + s * (B * d) @ A, W - dropped


def test_kasa_merge_forward_and_exact_unmerge_with_the_record():
    rng = np.random.default_rng(20)
    ad = _kasa(rng)
    W = rng.standard_normal((OUT, IN)).astype(np.float32)
    b = rng.standard_normal(OUT).astype(np.float32)
    want, truncated = _kasa_reference(W, ad.params["q"], 3, 6 / 3)
    records = {}
    merged = ad.merge({"q.weight": W, "q.bias": b}, records=records)
    tol = 1e-5 * np.abs(want).max()  # float32 SVD of W
    np.testing.assert_allclose(merged["q.weight"], want, atol=tol)
    np.testing.assert_array_equal(merged["q.bias"], b)
    x = rng.standard_normal((4, IN)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("q", x, {"q.weight": W, "q.bias": b}), x @ want.T + b, atol=1e-4, rtol=1e-4)
    back = ad.unmerge(merged, records=records)
    np.testing.assert_allclose(back["q.weight"], W, atol=tol)
    # without the record the dropped part is lost: refused, or PEFT's truncated base with peft_compat
    with pytest.raises(NotInvertibleError, match=r"q: KaSA's merge dropped the base weight's 3 smallest"):
        ad.unmerge(merged)
    np.testing.assert_allclose(ad.unmerge(merged, peft_compat=True)["q.weight"], truncated, atol=tol)


def test_kasa_merge_in_place_writes_the_callers_array():
    rng = np.random.default_rng(21)
    ad = _kasa(rng)
    W = np.asfortranarray(rng.standard_normal((OUT, IN)).astype(np.float32))
    want = ad.merge({"q.weight": W.copy()})["q.weight"]
    mod = ad.module("q")
    res = mod.merge(W, copy=False)
    assert res.weight is W and res.record is not None
    np.testing.assert_allclose(W, want, atol=1e-6)
    mod.unmerge(W, record=res.record, copy=False)
    np.testing.assert_allclose(W, ad.unmerge({"q.weight": np.asarray(want)}, records={"q": res.record})["q.weight"],
                               atol=1e-6)


@pytest.mark.parametrize("change, error, match", [
    (dict(r=8), ConfigError, r"q: KaSA needs r=8 below min\(out, in\)=8"),
    (dict(drop="lora_diag"), CheckpointError, "kasa_config is set but the checkpoint has no lora_diag"),
    (dict(diag=5), ShapeError, "q.*lora_diag"),
])
def test_kasa_refusals(change, error, match):
    rng = np.random.default_rng(22)
    ad = _kasa(rng, r=change.get("r", 3))
    if "drop" in change:
        del ad.params["q"][change["drop"]]
    if "diag" in change:
        ad.params["q"]["lora_diag"] = np.ones(change["diag"], np.float32)
    with pytest.raises(error, match=match):
        ad.module("q", weight_shape=(OUT, IN))


def test_kasa_on_a_conv1d_layer_is_refused():
    ad = _kasa(np.random.default_rng(23))
    with pytest.raises(UnsupportedError, match=r"q: KaSA \(kasa_config\) on a Conv1D layer"):
        ad.module("q", weight_shape=(IN, OUT), kind="Conv1D")


# --------------------------------------------------------------------------------------------------
# aLoRA: the adapter acts only from the (last) invocation sequence on
# --------------------------------------------------------------------------------------------------
from peftmath.methods.lora import alora_mask, alora_offsets  # noqa: E402


@pytest.mark.parametrize("row, inv, want", [
    ([5, 1, 2, 9, 1, 2, 7], [1, 2], 3),       # the last occurrence counts
    ([1, 2, 3], [1, 2, 3], 3),                # the whole row
    ([4, 4, 4], [4, 4], 2),                   # overlapping matches: the last start
    ([1, 2], [1, 2, 3], None),                # longer than the row
    ([7, 8, 9], [8, 7], None),
])
def test_alora_offsets(row, inv, want):
    assert alora_offsets([row], inv) == [want]


def test_alora_forward_masks_the_adapter_term():
    rng = np.random.default_rng(30)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q"],
                            "alora_invocation_tokens": [3, 4]})
    A, B = rng.standard_normal((R, IN)), rng.standard_normal((OUT, R))
    ad = Adapter(cfg, {"q": {"lora_A.weight": A.astype(np.float32), "lora_B.weight": B.astype(np.float32)}})
    W, b = rng.standard_normal((OUT, IN)).astype(np.float32), rng.standard_normal(OUT).astype(np.float32)
    ids = np.array([[1, 3, 4, 5, 6], [2, 2, 2, 2, 2], [3, 4, 9, 3, 4]])
    offsets = alora_offsets(ids, [3, 4])
    assert offsets == [4, None, 2]
    x = rng.standard_normal((3, 5, IN)).astype(np.float32)
    got = ad.forward("q", x, {"q.weight": W, "q.bias": b}, alora_offsets=offsets)
    mask = alora_mask(offsets, 3, 5)
    want = x @ W.T.astype(np.float64) + b + mask[..., None] * (6 / R) * (x @ A.T @ B.T)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # no offsets: the base model everywhere (PEFT's default)
    np.testing.assert_allclose(ad.forward("q", x, {"q.weight": W, "q.bias": b}), x @ W.T + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(UnsupportedError, match=r"q: an aLoRA adapter .* cannot be merged"):
        ad.merge({"q.weight": W, "q.bias": b})
    with pytest.raises(ShapeError, match="2 alora_offsets for a batch of 3 rows"):
        ad.forward("q", x, {"q.weight": W, "q.bias": b}, alora_offsets=[1, 2])


@pytest.mark.parametrize("dora", [False, True])
def test_bound_lora_and_dora_modules_pickle(dora):
    """A bound module crosses to a dask.distributed worker by pickle: the same class, the same merge."""
    import pickle

    rng = np.random.default_rng(40)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q"], "use_dora": dora})
    p = {"lora_A.weight": rng.standard_normal((R, IN)).astype(np.float32),
         "lora_B.weight": rng.standard_normal((OUT, R)).astype(np.float32)}
    if dora:
        p["lora_magnitude_vector"] = rng.uniform(0.5, 1.5, OUT).astype(np.float32)
    mod = Adapter(cfg, {"q": p}).module("q", weight_shape=(OUT, IN))
    back = pickle.loads(pickle.dumps(mod))
    assert type(back) is type(mod)
    W = rng.standard_normal((OUT, IN)).astype(np.float32)
    np.testing.assert_array_equal(back.merge(W).weight, mod.merge(W).weight)


def test_kasa_create_adapter_draws_lora_diag_and_round_trips():
    """A new KaSA adapter carries PEFT's ``lora_diag = randn(r)`` (before, create_adapter left it out and the
    adapter it returned was refused by its own binding); its merge / record unmerge / forward agree in float64."""
    rng = np.random.default_rng(12)
    base = {"q.weight": rng.standard_normal((OUT, IN)), "o.weight": rng.standard_normal((OUT, IN))}
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["q", "o"],
                            "init_lora_weights": False, "kasa_config": {"beta": 1e-4, "gamma": 1e-3}})
    ad = create_adapter(base, cfg, seed=3)
    d = {m: np.asarray(ad.params[m]["lora_diag"]) for m in ("q", "o")}
    assert all(v.shape == (R,) and np.unique(v).size == R for v in d.values())
    assert not np.array_equal(d["q"], d["o"])  # one draw per module
    records: dict = {}
    merged = ad.merge(base, records=records)
    for m in ("q", "o"):
        W = base[f"{m}.weight"]
        U, S, Vh = np.linalg.svd(W, full_matrices=False)  # the r smallest triplets dropped, s·B diag(d) A added
        A, B = (np.asarray(ad.params[m][k], np.float64) for k in ("lora_A.weight", "lora_B.weight"))
        want = U[:, :-R] @ np.diag(S[:-R]) @ Vh[:-R] + 6 / R * (B * d[m]) @ A
        # B diag(d) is formed in the factors' float32 (one rounding); the rest runs in the weight's float64
        tol = 4 * np.finfo(np.float32).eps * 6 / R * float(np.max(np.abs(B * d[m]) @ np.abs(A)))
        np.testing.assert_allclose(merged[f"{m}.weight"], want, rtol=0, atol=tol)
        x = rng.standard_normal((3, IN))
        np.testing.assert_allclose(ad.forward(m, x, base), x @ want.T, rtol=0, atol=tol * IN * np.max(np.abs(x)))
    back = ad.unmerge(merged, records=records)
    for key, w in base.items():
        np.testing.assert_allclose(back[key], w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant, kind, match", [
    ({"kasa_config": {}}, "Conv1D", r"KaSA \(kasa_config\) on a Conv1D layer"),
    ({"velora_config": {"num_groups": 2}}, "Embedding", r"VeLoRA \(velora_config\) on a Embedding layer"),
    ({"monteclora_config": {"num_samples": 2}}, "Conv2d", r"MonteCLoRA \(monteclora_config\) on a Conv2d layer"),
    ({"alora_invocation_tokens": [3]}, "Embedding", r"aLoRA \(alora_invocation_tokens\) on a Embedding layer"),
])
def test_variant_on_an_unsupported_kind_is_refused_at_initialisation(variant, kind, match):
    """The refusal the binding gives comes already from initialize (create_adapter no longer returns an adapter
    that fails at its first use); the same layer kind of a plain LoRA initialises."""
    from peftmath.layers import Layer
    from peftmath.methods.lora import LoraModule

    shape = {"Conv1D": (IN, OUT), "Embedding": (OUT, IN), "Conv2d": (OUT, IN, 3, 3)}[kind]
    layer = Layer.of(shape, kind)
    cfg = config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["m"], **variant})
    with pytest.raises(UnsupportedError, match=match):
        LoraModule.initialize("m", cfg, layer, seed=0)
    plain = config_from_dict({"peft_type": "LORA", "r": R, "target_modules": ["m"]})
    assert LoraModule.initialize("m", plain, layer, seed=0)[0]
