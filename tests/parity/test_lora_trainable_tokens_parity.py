"""LoRA with trainable tokens (``LoraConfig.trainable_token_indices``) against Hugging Face PEFT 0.21.2, on a tiny
Llama built from a ``LlamaConfig`` (no download), tied and untied, with the field's list and dict forms:
PEFT's checkpoint read by peftmath (the modules, the rows), ``Adapter.merge`` equal to ``merge_and_unload``'s
state dict, the unmerged forward of the wrapped tables equal to PEFT's, the exact unmerge with the records, and
peftmath's save loaded back by ``PeftModel.from_pretrained`` with PEFT's logits. (The PEFT test matrix row
``Embedding + transformers Conv1D 1 LoRA trainable_tokens`` runs the streamed command too.)"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    bits_differ,
    load_in_peft,
    load_peft_checkpoint,
    n2t,
    peft_forward,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.errors import CheckpointError, NotInvertibleError, PeftMathWarning  # noqa: E402

pytestmark = [pytest.mark.parity]

VOCAB, HIDDEN = 32, 16
IDS = np.array([[2, 5, 30, 7, 0, 11]])


def _llama(tied: bool):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).eval()


def _peft(tied: bool, indices, targets=("q_proj", "v_proj")):
    model = _llama(tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                            trainable_token_indices=indices))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for _, p in pmodel.named_parameters():
            if p.requires_grad:  # LoRA's B and the token rows start as no-ops
                p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)))
    return pmodel.eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(input_ids=torch.from_numpy(IDS)).logits)


def _merged_reference(pmodel) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}


CASES = {
    "untied list": (False, [3, 30, 7], ["model.embed_tokens"]),
    "untied dict, embedding and lm_head": (False, {"embed_tokens": [3, 30, 7], "lm_head": [2, 5]},
                                           ["lm_head", "model.embed_tokens"]),
    "tied list": (True, [3, 30, 7], ["model.embed_tokens"]),
    "tied dict, equal ids": (True, {"embed_tokens": [3, 30, 7], "lm_head": [3, 30, 7]}, ["model.embed_tokens"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_merges_as_peft(case, tmp_path):
    tied, indices, tables = CASES[case]
    pmodel = _peft(tied, indices)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert [m for m in ad.modules if "proj" not in m] == tables  # a tied lm_head's rows are the embedding's
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
    assert_saves_back_identically(ad, tmp_path)
    state = {k: t2n(v) for k, v in _llama(tied).state_dict().items()}
    # the unmerged forward of each wrapped table
    assert np.array_equal(ad.forward("model.embed_tokens", IDS, state), peft_forward(pmodel, "model.embed_tokens", IDS))
    if "lm_head" in tables:
        h = np.random.default_rng(3).standard_normal((1, 6, HIDDEN)).astype(np.float32)
        np.testing.assert_allclose(ad.forward("lm_head", h, state, kind="Linear"), peft_forward(pmodel, "lm_head", h),
                                   rtol=1e-6, atol=1e-6)
    logits = _logits(pmodel)
    reference = _merged_reference(pmodel)
    records: dict = {}
    if tied:  # a tied torch state dict: lm_head.weight is the embedding's tensor, and stays so
        tstate = _llama(tied).state_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PeftMathWarning)
            merged = ad.merge(tstate, records=records)
        assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
        merged = {k: t2n(v) for k, v in merged.items()}
        records = {k: t2n(v) for k, v in records.items()}
    else:
        merged = {k: np.asarray(v) for k, v in ad.merge(state, records=records).items()}
    assert sorted(merged) == sorted(reference)
    for key, want in reference.items():
        if "proj" in key:
            np.testing.assert_allclose(merged[key], want, rtol=1e-6, atol=1e-6, err_msg=key)
        else:  # replaced rows and untouched tensors: bit for bit
            assert bits_differ(merged[key], want) == 0, key
    assert bits_differ(merged["model.embed_tokens.weight"], state["model.embed_tokens.weight"]) > 0  # not vacuous
    # the merged model computes PEFT's adapted logits
    fresh = _llama(tied)
    fresh.load_state_dict({k: n2t(v) for k, v in merged.items()})
    np.testing.assert_allclose(_logits(fresh), logits, rtol=1e-5, atol=1e-5)
    # unmerge with the records: the tables exactly, the LoRA weights within rounding (a tied lm_head: below)
    back = ad.unmerge(merged, records=records)
    for key, want in state.items():
        if tied and key == "lm_head.weight":
            continue
        if "proj" in key:
            np.testing.assert_allclose(np.asarray(back[key]), want, rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            assert bits_differ(np.asarray(back[key]), want) == 0, key
    with pytest.raises(NotInvertibleError):
        ad.unmerge(merged)
    if tied:  # in place into the one shared tensor and back: both names see the merged, then the original rows
        live = _llama(tied).state_dict()
        records = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PeftMathWarning)
            ad.merge(live, copy=False, records=records)
        assert bits_differ(t2n(live["lm_head.weight"]), reference["lm_head.weight"]) == 0
        ad.unmerge(live, copy=False, records=records)
        assert bits_differ(t2n(live["lm_head.weight"]), state["lm_head.weight"]) == 0
        assert live["lm_head.weight"].data_ptr() == live["model.embed_tokens.weight"].data_ptr()


@pytest.mark.parametrize("case", ["untied dict, embedding and lm_head", "tied list"])
def test_peftmath_save_loads_in_peft_with_its_logits(case, tmp_path):
    tied, indices, _ = CASES[case]
    pmodel = _peft(tied, indices)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    # rebuilt from arrays (nothing of PEFT's files kept) and written by peftmath
    again = pm.Adapter(ad.config, {m: {s: np.array(a) for s, a in p.items()} for m, p in ad.params.items()})
    pm.save_adapter(again, tmp_path / "ours")
    fresh = load_in_peft(_llama(tied), tmp_path / "ours")
    np.testing.assert_array_equal(_logits(fresh), _logits(pmodel))


def test_a_lora_target_cannot_also_be_wrapped(tmp_path):
    """PEFT refuses to wrap a LoRA-adapted embedding for trainable tokens (TypeError): a checkpoint holding both
    for one module is not one PEFT wrote, and peftmath refuses it by name."""
    model = _llama(False)
    with pytest.raises(TypeError, match="trainable_token_indices cannot be applied"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(model, peft.LoraConfig(target_modules=["embed_tokens"],
                                                       trainable_token_indices=[1, 2]))
    pmodel = _peft(False, [3, 30, 7])
    ad = load_peft_checkpoint(pmodel, tmp_path)
    params = {m: dict(p) for m, p in ad.params.items()}
    params["model.embed_tokens"].update({"lora_embedding_A": np.zeros((4, VOCAB), np.float32),
                                         "lora_embedding_B": np.zeros((HIDDEN, 4), np.float32)})
    state = {k: t2n(v) for k, v in _llama(False).state_dict().items()}
    with pytest.raises(CheckpointError, match="both LoRA tensors .* PEFT 0.21.2 cannot build"):
        pm.Adapter(ad.config, params).merge(state)


@pytest.mark.parametrize("indices", [[3, 30, 3], {"embed_tokens": [3, 30, 7], "lm_head": [2, 5]}])
def test_initial_rows_are_peft_s(indices, tmp_path):
    """A fresh PEFT adapter's rows (before training) are initial_rows' (the identity), for both forms."""
    from peftmath.methods._lora_tokens import TOKENS_KEY, initial_rows

    model = _llama(False)
    state = {k: t2n(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    ad = load_peft_checkpoint(pmodel, tmp_path)
    ours = initial_rows(ad.config, state)
    tables = sorted(m for m in ad.modules if "proj" not in m)
    assert sorted(ours) == tables
    for m in tables:
        assert bits_differ(np.asarray(ours[m][TOKENS_KEY]), np.asarray(ad.params[m][TOKENS_KEY])) == 0, m
