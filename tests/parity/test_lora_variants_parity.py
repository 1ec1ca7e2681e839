"""BD-LoRA, VeLoRA and MonteCLoRA against PEFT 0.21.2 beyond the PEFT matrix (which checks their merges and
forwards, tests/parity/test_peft_matrix.py): the trainable-parameter count, the adapter saved by peftmath
loaded back by ``PeftModel.from_pretrained`` with the same outputs and the same tensors, and a BD-LoRA on a
transformers Conv1D (GPT-2's layer kind)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    peft_forward,
    check_module_math_as_peft,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_weights,
    redraw,
    require_peft,
    two_linear_inputs,
    two_linear_model,
)

torch, peft = require_peft()

from peft.tuners.lora.config import BdLoraConfig, MontecloraConfig, VeloraConfig  # noqa: E402
from peft.tuners.lora.variants import BdLoraLinearVariant  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

SIZES = (12, 8, 16)
MODULES = ("lin0", "lin1")

CASES = {
    "BD-LoRA": dict(r=4, use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)),
    "BD-LoRA nblocks=4, A only": dict(r=4, use_bdlora=BdLoraConfig(target_modules_bd_a=["lin"], nblocks=4)),
    "VeLoRA": dict(r=4, velora_config=VeloraConfig(num_groups=3, init_type="random")),
    "MonteCLoRA": dict(r=4, monteclora_config=MontecloraConfig(num_samples=3)),
}


def make_peft(case, seed=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(target_modules=list(MODULES), lora_alpha=6, **CASES[case])
        pmodel = peft.get_peft_model(two_linear_model(SIZES), cfg)
    redraw(pmodel, {"lora_": (0.0, 0.5)}, seed=seed)
    return pmodel.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_math_counts_and_checkpoints_both_ways(case, tmp_path):
    pmodel = make_peft(case)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
    bd = BdLoraLinearVariant._get_bdlora_delta_weight  # PEFT's merge of BD-LoRA; its get_delta_weight is not BD's
    check_module_math_as_peft(ad, pmodel, peft_weights(pmodel, MODULES), two_linear_inputs(SIZES), MODULES,
                              peft_delta=(lambda layer: bd(layer, "default")) if "BD" in case else None)
    assert_saves_back_identically(ad, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, two_linear_model(SIZES), tmp_path / "ours", two_linear_inputs(SIZES),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", [dict(velora_config=VeloraConfig(num_groups=2, init_type="random")),
                                     dict(monteclora_config=MontecloraConfig(num_samples=2))])
def test_training_state_variants_on_a_transformers_conv1d(variant, tmp_path):
    """PEFT's Linear LoRA layer wraps transformers' Conv1D too (weight (in, out)); VeLoRA / MonteCLoRA run there."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = Conv1D(8, 12)  # weight (12, 8): in 12, out 8

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(Tiny(), peft.LoraConfig(target_modules=["c0"], r=4, lora_alpha=6,
                                                             fan_in_fan_out=True, **variant))
    redraw(pmodel, {"lora_": (0.0, 0.5)}, seed=3)
    pmodel.eval()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
    x = {"c0": np.random.default_rng(4).standard_normal((3, 12)).astype(np.float32)}
    # LoRA's get_delta_weight is already in the stored (in, out) layout (PEFT's transpose(.., fan_in_fan_out))
    check_module_math_as_peft(ad, pmodel, peft_weights(pmodel, ["c0"]), x, ["c0"])


def test_bdlora_on_a_transformers_conv1d_is_refused_as_peft_fails(tmp_path):
    """PEFT 0.21.2's BD-LoRA reads ``base_layer.out_features``, which transformers' Conv1D lacks: PEFT cannot
    build it; peftmath refuses such a config by name instead of guessing."""
    import peftmath
    from peftmath.errors import UnsupportedError

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = Conv1D(8, 12)  # weight (12, 8): in 12, out 8

    cfg = dict(target_modules=["c0"], r=4, lora_alpha=6, fan_in_fan_out=True,
               use_bdlora=BdLoraConfig(target_modules_bd_b=["c0"], nblocks=2))
    with warnings.catch_warnings(), pytest.raises(AttributeError, match="out_features"):
        warnings.simplefilter("ignore")
        peft.get_peft_model(Tiny(), peft.LoraConfig(**cfg))
    base = {"c0.weight": np.zeros((12, 8), np.float32), "c0.bias": np.zeros(8, np.float32)}
    config = peftmath.io.peft.config_from_dict({**cfg, "peft_type": "LORA", "use_bdlora": {
        "target_modules_bd_b": ["c0"], "nblocks": 2}})
    with pytest.raises(UnsupportedError, match=r"c0: BD-LoRA \(use_bdlora\) on a Conv1D layer"):
        peftmath.create_adapter(base, config, layer_kinds={"c0": "Conv1D"})


def test_kasa_against_peft(tmp_path):
    """KaSA: PEFT truncates the base weight when it builds (or loads) the adapter; peftmath recomputes that from
    the original base. Forward and merge_and_unload from the original weights, the trainable count, the exact
    unmerge with the record, and the adapter peftmath saves loaded by PEFT onto a fresh original base."""
    import peftmath

    original = two_linear_model(SIZES)
    state = {k: v.detach().numpy().copy() for k, v in original.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(target_modules=list(MODULES), r=4, lora_alpha=6, kasa_config=peft.KasaConfig())
        pmodel = peft.get_peft_model(two_linear_model(SIZES), cfg)
    redraw(pmodel, {"lora_": (0.0, 0.5)}, seed=5)
    pmodel.eval()
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=1e-5, rtol=1e-5)
    records: dict = {}
    merged = ad.merge(state, records=records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: v.detach().numpy() for k, v in pmodel.merge_and_unload().state_dict().items()}
    for key in state:
        np.testing.assert_allclose(merged[key], want[key], atol=1e-5, rtol=1e-5, err_msg=key)
    back = ad.unmerge(merged, records=records)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], atol=1e-5, err_msg=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own adapter, loaded onto a fresh original base (PEFT truncates it)
        reference = peft.PeftModel.from_pretrained(two_linear_model(SIZES), tmp_path / "peft").eval()
        check_reloaded_in_peft(reference, peftmath.load_adapter(tmp_path / "peft"), two_linear_model(SIZES),
                               tmp_path / "ours", xs, atol=1e-6, rtol=1e-6)


def test_alora_forward_against_peft(tmp_path):
    """aLoRA: PEFT's layer forward with ``alora_offsets`` (from its own ``calculate_alora_offsets`` on token ids)
    equals peftmath's; the merge is refused by both; peftmath's saved adapter loads in PEFT."""
    import peftmath
    from peft.tuners.lora.variants import calculate_alora_offsets
    from peftmath.errors import UnsupportedError
    from peftmath.methods.lora import alora_offsets

    inv = [3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(target_modules=list(MODULES), r=4, lora_alpha=6, alora_invocation_tokens=inv)
        pmodel = peft.get_peft_model(two_linear_model(SIZES), cfg)
    redraw(pmodel, {"lora_": (0.0, 0.5)}, seed=7)
    pmodel.eval()
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
    ids = torch.tensor([[1, 3, 4, 5, 6, 7], [2, 2, 2, 2, 2, 2], [3, 4, 9, 3, 4, 0], [0, 0, 0, 0, 3, 4]])
    offsets = calculate_alora_offsets(pmodel.peft_config, "default", ids)
    assert alora_offsets(ids.numpy(), inv) == offsets
    state = peft_weights(pmodel, MODULES)
    rng = np.random.default_rng(8)
    for name, width in zip(MODULES, SIZES[:2]):
        x = rng.standard_normal((4, 6, width)).astype(np.float32)
        with torch.no_grad():
            want = pmodel.base_model.model.get_submodule(name)(torch.from_numpy(x), alora_offsets=offsets)
        np.testing.assert_allclose(ad.forward(name, x, state, alora_offsets=offsets), want.numpy(),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(UnsupportedError, match="cannot be merged"):
        ad.merge(state)
    with warnings.catch_warnings(), pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        warnings.simplefilter("ignore")
        pmodel.merge_adapter()
    peftmath.save_adapter(ad, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.PeftModel.from_pretrained(two_linear_model(SIZES), tmp_path / "ours").eval()
    x = rng.standard_normal((4, 6, SIZES[0])).astype(np.float32)
    with torch.no_grad():
        a = fresh.base_model.model.lin0(torch.from_numpy(x), alora_offsets=offsets)
        b = pmodel.base_model.model.lin0(torch.from_numpy(x), alora_offsets=offsets)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
