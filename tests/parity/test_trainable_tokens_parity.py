"""Trainable tokens parity with Hugging Face PEFT 0.21.2: merged weights bit for bit (``layer.merge()`` and
``merge_and_unload``, float32 and bfloat16), unmerge, forwards (Embedding lookups, a Linear with PEFT's
bias-less forward under ``peft_compat``, a scaled embedding), checkpoints both ways, the trainable-parameter
count, repeated token ids, and a tied-embedding Llama (PEFT saves the tied rows under both names)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    assert_compat_bits,
    assert_saves_back_identically,
    bits_differ,
    build_model,
    check_reloaded_in_peft,
    in_namespace,
    load_peft_checkpoint,
    n2t,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.errors import NotInvertibleError, UnsupportedError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import describe_method  # noqa: E402
from peftmath.methods import trainable_tokens as tt  # noqa: E402

V, D = 40, 6
TOKENS = [3, 0, 17, 39, 18]
MODULES = ("emb", "head")


def _model(dtype="float32", scale=None):
    emb = torch.nn.Embedding(V, D)
    if scale is not None:  # a scaled embedding (Gemma's Gemma3TextScaledWordEmbedding): forward times embed_scale
        class Scaled(torch.nn.Embedding):
            def forward(self, ids):
                return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

        emb = Scaled(V, D)
        emb.register_buffer("embed_scale", torch.tensor(scale), persistent=False)
    return build_model({"emb": emb, "head": torch.nn.Linear(D, V)}, seed=0, dtype=dtype)


def make_peft(*, dtype="float32", scale=None, tokens=TOKENS, init_weights=False, modules=MODULES, perturb=True):
    model = _model(dtype, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.TrainableTokensConfig(target_modules=list(modules),
                                                                       token_indices=list(tokens),
                                                                       init_weights=init_weights))
    if perturb:  # a trained adapter: N(0, 0.3²) added to every row
        rng = np.random.default_rng(1)
        with torch.no_grad():
            for name, p in pmodel.named_parameters():
                if "trainable_tokens_delta" in name:
                    p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)).to(p.dtype))
    return pmodel.eval()


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V, size=(3, 7))
    ids[0, :5] = TOKENS
    x = rng.standard_normal((3, 2, D)).astype(np.float32)
    return {"emb": ids, "head": x.astype(dtype)}


def _base_state(pmodel, modules=MODULES):
    """The base weights (and the head's bias) of the wrapped modules, as NumPy."""
    return peft_weights(pmodel, modules)


@pytest.mark.parametrize("init_weights", [True, False])
def test_merge_unmerge_and_forward_match_peft(init_weights, tmp_path):
    pmodel = make_peft(init_weights=init_weights)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, tt.TrainableTokensConfig) and ad.config.token_indices == TOKENS
    assert ad.modules == list(MODULES) and ad.params["emb"]["trainable_tokens_delta"].shape == (len(TOKENS), D)
    state = _base_state(pmodel)
    xs = _inputs()
    # forward: the Embedding lookup exactly; the Linear as PEFT's (bias-less) with peft_compat, and with the
    # bias by default (the merged layer's forward)
    assert np.array_equal(ad.forward("emb", xs["emb"], state), peft_forward(pmodel, "emb", xs["emb"]))
    want = peft_forward(pmodel, "head", xs["head"])
    got = ad.forward("head", xs["head"], state, kind="Linear", peft_compat=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ad.forward("head", xs["head"], state, kind="Linear"), want + state["head.bias"],
                               rtol=1e-6, atol=1e-6)
    # merge: bit for bit with PEFT's layer.merge(); the records are the original rows
    records: dict = {}
    merged = ad.merge(state, records=records)
    for name in MODULES:
        peft_layer(pmodel, name).merge()
    peft_merged = peft_weights(pmodel, MODULES)
    for key, want in peft_merged.items():
        assert bits_differ(np.asarray(merged[key]), want) == 0, key
    assert all(not np.array_equal(merged[f"{n}.weight"], state[f"{n}.weight"]) for n in MODULES)  # not vacuous
    # the merged PEFT layer's forward is peftmath's default forward
    np.testing.assert_allclose(ad.forward("head", xs["head"], state, kind="Linear"),
                               peft_forward(pmodel, "head", xs["head"]), rtol=1e-6, atol=1e-6)
    # unmerge: PEFT's unmerge and the base, bit for bit (the record); refused without it
    back = ad.unmerge(merged, records=records)
    for name in MODULES:
        peft_layer(pmodel, name).unmerge()
    for key, want in peft_weights(pmodel, MODULES).items():
        assert bits_differ(np.asarray(back[key]), want) == 0 and bits_differ(np.asarray(back[key]), state[key]) == 0
    with pytest.raises(NotInvertibleError, match="records="):
        ad.unmerge(merged)


def test_merge_and_unload_state_dict_and_in_place(tmp_path):
    pmodel = make_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = {k: t2n(v) for k, v in _model().state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    merged = ad.merge(state)
    assert sorted(merged) == sorted(reference)
    for key, want in reference.items():
        assert bits_differ(np.asarray(merged[key]), want) == 0, key
    inplace = {k: n2t(v) for k, v in state.items()}  # torch tensors, written in place
    records: dict = {}
    out = pm.Adapter(ad.config, {m: {s: n2t(np.asarray(a)) for s, a in p.items()} for m, p in ad.params.items()}) \
        .merge(inplace, copy=False, records=records)
    for key, want in reference.items():
        assert out[key] is inplace[key] and bits_differ(t2n(inplace[key]), want) == 0, key
    back = pm.Adapter(ad.config, {m: {s: n2t(np.asarray(a)) for s, a in p.items()} for m, p in ad.params.items()}) \
        .unmerge(inplace, copy=False, records=records)
    for key, want in state.items():
        assert bits_differ(t2n(back[key]), want) == 0, key


def test_bfloat16_bit_for_bit(tmp_path):
    pmodel = make_peft(dtype="bfloat16")
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = _base_state(pmodel)
    xs = _inputs(BF16)
    assert bits_differ(np.asarray(ad.forward("emb", xs["emb"], state)), peft_forward(pmodel, "emb", xs["emb"])) == 0
    want = {"head": peft_forward(pmodel, "head", xs["head"])}
    for namespace in ("numpy", "torch"):  # PEFT's bias-less F.linear: bit for bit with torch's kernels
        ns_ad, to_x, to_n = in_namespace(ad, namespace)
        got = to_n({"head": ns_ad.forward("head", to_x(xs)["head"], to_x(state), kind="Linear", peft_compat=True)})
        assert_compat_bits(got, want, namespace=namespace, what=("forward",))
    merged = ad.merge(state)
    for name in MODULES:
        peft_layer(pmodel, name).merge()
    for key, want in peft_weights(pmodel, MODULES).items():
        assert merged[key].dtype == BF16 and bits_differ(np.asarray(merged[key]), want) == 0, key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scaled_embedding(dtype, tmp_path):
    pmodel = make_peft(dtype=dtype, scale=2.75, modules=("emb",))
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = _base_state(pmodel, ("emb",))
    ids = _inputs()["emb"]
    want = peft_forward(pmodel, "emb", ids)
    got = np.asarray(ad.forward("emb", ids, state, embed_scale=2.75))
    assert got.dtype == want.dtype and bits_differ(got, want) == 0


def test_repeated_token_ids(tmp_path):
    """PEFT's index_copy keeps an unspecified one of a repeated id's rows: equal rows merge as PEFT merges,
    different rows are refused."""
    pmodel = make_peft(tokens=[5, 9, 5], init_weights=True, perturb=False, modules=("emb",))
    with torch.no_grad():
        d = pmodel.base_model.model.emb.trainable_tokens_delta["default"]
        d[0] += 1.0
        d[2] = d[0]
    ad = load_peft_checkpoint(pmodel, tmp_path / "equal")
    state = {"emb.weight": peft_weights(pmodel, ["emb"])["emb.weight"]}
    merged = ad.merge(state)
    peft_layer(pmodel, "emb").merge()
    assert bits_differ(np.asarray(merged["emb.weight"]), peft_weights(pmodel, ["emb"])["emb.weight"]) == 0
    peft_layer(pmodel, "emb").unmerge()
    with torch.no_grad():
        d[2] += 0.5
    ad = load_peft_checkpoint(pmodel, tmp_path / "different")
    with pytest.raises(UnsupportedError, match=r"emb: token_indices repeats a token .*token 5 at positions 0 and 2"):
        ad.merge(state)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pmodel, ad, _model(), tmp_path / "ours", _inputs(), rtol=0, atol=0)


def test_peftmath_initialised_adapter_loads_in_peft(tmp_path):
    """peftmath's own initialisation (random rows), saved, loaded by PeftModel.from_pretrained: PEFT's merged
    weights and forwards are peftmath's."""
    base = _model()
    state = {k: t2n(v) for k, v in base.state_dict().items()}
    m = describe_method("TRAINABLE_TOKENS")
    cfg = tt.TrainableTokensConfig(target_modules=list(MODULES), token_indices=[7, 1, 33], init_weights=False)
    params = {name: m.initialize(name, cfg, Layer.of(state[f"{name}.weight"].shape, kind), weight=state[f"{name}.weight"],
                                 seed=j)[0] for j, (name, kind) in enumerate((("emb", "Embedding"), ("head", "Linear")))}
    ad = pm.Adapter(cfg, params, layer_kinds={"emb": "Embedding", "head": "Linear"})
    pm.save_adapter(ad, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    xs = _inputs()
    assert np.array_equal(ad.forward("emb", xs["emb"], state), peft_forward(fresh, "emb", xs["emb"]))
    np.testing.assert_allclose(ad.forward("head", xs["head"], state, peft_compat=True),
                               peft_forward(fresh, "head", xs["head"]), rtol=1e-6, atol=1e-6)
    merged = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {k: t2n(v) for k, v in fresh.merge_and_unload().state_dict().items()}
    for key, want in reference.items():
        assert bits_differ(np.asarray(merged[key]), want) == 0, key


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft(tokens=[1, 2, 2, 30])
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0] == 2 * 4 * D


# --------------------------------------------------------------------------------------------------
# a tied-embedding model: PEFT wraps embed_tokens and lm_head and saves the shared rows under both names
# --------------------------------------------------------------------------------------------------
def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def _tied_peft():
    model = _llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.TrainableTokensConfig(token_indices=[2, 7, 30], init_weights=False))
    return pmodel.eval()


def test_tied_embedding_llama(tmp_path):
    pmodel = _tied_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.config.target_modules == "model.embed_tokens"
    assert ad.modules == ["lm_head", "model.embed_tokens"]  # PEFT saved the tied rows under both names
    np.testing.assert_array_equal(ad.params["lm_head"]["trainable_tokens_delta"],
                                  ad.params["model.embed_tokens"]["trainable_tokens_delta"])
    base = _llama()
    state = {k: t2n(v) for k, v in base.state_dict().items()}
    ids = np.array([[2, 5, 30, 7, 0]])
    hidden = np.random.default_rng(3).standard_normal((1, 5, 16)).astype(np.float32)
    assert np.array_equal(ad.forward("model.embed_tokens", ids, state),
                          peft_forward(pmodel, "model.embed_tokens", ids))
    np.testing.assert_allclose(ad.forward("lm_head", hidden, state, kind="Linear"),
                               peft_forward(pmodel, "lm_head", hidden), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        logits = t2n(pmodel(input_ids=torch.from_numpy(ids)).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_model = pmodel.merge_and_unload()
        reference = {k: t2n(v) for k, v in merged_model.state_dict().items()}
    merged = ad.merge(state)
    for key, want in reference.items():
        assert bits_differ(np.asarray(merged[key]), want) == 0, key
    # the merged tables, loaded into a fresh (tied) model, give PEFT's adapted logits
    fresh = _llama()
    fresh.load_state_dict({k: n2t(np.asarray(v)) for k, v in merged.items()})
    with torch.no_grad():
        np.testing.assert_allclose(t2n(fresh(input_ids=torch.from_numpy(ids)).logits), logits, rtol=1e-5, atol=1e-5)


def test_tied_embedding_in_place_on_the_shared_tensor(tmp_path):
    """The torch state dict of a tied model holds one tensor under two keys: both modules merge into it in
    place (the same rows twice) and unmerge back to the original bits (the second record is the first's rows,
    left alone by the rule of specs/trainable_tokens.md section 5)."""
    pmodel = _tied_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    tad = pm.Adapter(ad.config, {m: {s: n2t(np.asarray(a)) for s, a in p.items()} for m, p in ad.params.items()})
    model = _llama()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    before = t2n(sd["lm_head.weight"])
    records: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tad.merge(sd, copy=False, records=records)
        want = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    assert bits_differ(t2n(sd["lm_head.weight"]), want["lm_head.weight"]) == 0
    tad.unmerge(sd, copy=False, records=records)
    assert bits_differ(t2n(sd["model.embed_tokens.weight"]), before) == 0


def test_tied_embedding_stored_once_is_refused_by_the_adapter(tmp_path):
    """A checkpoint that stores the tied table once (save_pretrained: no lm_head.weight) cannot hold the lm_head
    module's merge separately: the adapter refuses, naming both tensors (specs/trainable_tokens.md, section 7)."""
    pmodel = _tied_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = {k: t2n(v) for k, v in _llama().state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UnsupportedError, match=r"lm_head: this model ties lm_head\.weight to model\.embed_tokens"):
        ad.merge(state, model_config={"model_type": "llama", "tie_word_embeddings": True})


@pytest.mark.xfail(strict=True, reason="PEFT counts the tied rows once; the adapter counts each module's tensor "
                                       "(specs/trainable_tokens.md, section 7: an adapter.py change)")
def test_tied_embedding_trainable_count(tmp_path):
    pmodel = _tied_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
