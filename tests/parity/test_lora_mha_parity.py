"""LoRA on ``nn.MultiheadAttention`` against PEFT 0.21.2's ``lora.MultiheadAttention`` (specs/lora.md, 12).

A tiny model with attentions (packed q/k/v) and a Linear: PEFT saves, peftmath reads; peftmath's merged state
(by default and with ``peft_compat=True``, without a warning) equals ``merge_and_unload().state_dict()`` (same
keys, values within float32 round-off), and a torch model holding it computes PEFT's adapted output. The
out-projection's change counts twice (PEFT 0.21.2's merge and its attention forward; checked against float64
deltas from PEFT's own tensors, so that a PEFT that stops doing so fails this test), the in-projection's once;
per-module forwards (the out-projection as PEFT's attention applies it: ``2ΔW``; PEFT's inner ``lora.Linear``
called alone, a forward its attention never runs, is ``ΔW`` once), unmerges, the trainable count, the command
(``merge`` with and without ``--peft-compat``, ``unmerge``, ``verify``, ``inspect --base``), and peftmath's save
loaded by ``PeftModel.from_pretrained`` with PEFT's outputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    base_state,
    load_in_peft,
    load_peft_checkpoint,
    n2t,
    peft_attention_out_projection,
    peft_forward,
    peft_layer,
    redraw,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath import cli  # noqa: E402

pytestmark = [pytest.mark.parity]

E = 12  # embed_dim, 3 heads


class Net(torch.nn.Module):
    """Two attention blocks (one nested, one without biases) and a Linear head."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, 3, bias=bias)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].attn = torch.nn.MultiheadAttention(E, 3, bias=False, batch_first=True)
        self.head = torch.nn.Linear(E, 5)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        z = y.transpose(0, 1)
        z, _ = self.blocks[0].attn(z, z, z)
        return self.head(z)


ATTN = ("attn", "blocks.0.attn")
CASES = {
    "plain": dict(target_modules=["attn", "head"], r=4, lora_alpha=8),
    "rslora and patterns": dict(target_modules=["attn", "head"], r=4, lora_alpha=8, use_rslora=True,
                                rank_pattern={"blocks.0.attn": 6}, alpha_pattern={"attn": 3.0, "out_proj": 100.0}),
    "bias lora_only": dict(target_modules=["attn"], r=2, lora_alpha=5, bias="lora_only"),
    "no attention bias": dict(target_modules=["attn"], r=3, lora_alpha=3),
}


def build(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Net(bias=case != "no attention bias")
    redraw(model, {"bias": (0.0, 0.1), "": (0.0, 0.3)}, seed=seed)
    return model.eval()


def make_peft(case: str):
    base = build(case)
    state = base_state(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(base, peft.LoraConfig(**CASES[case]))
    trained = {"lora_": (0.0, 0.3)} | ({"out_proj.base_layer.bias": (0.0, 0.1)} if "bias" in CASES[case] else {})
    redraw(pmodel, trained, seed=1)  # what PEFT trains
    return pmodel.eval(), state


def inputs(seed: int = 5) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((4, 2, E)).astype(np.float32))


def run_torch(state: dict, x: torch.Tensor, case: str) -> np.ndarray:
    """A fresh model holding ``state`` (NumPy), applied to ``x``."""
    model = build(case, seed=7)
    model.load_state_dict({k: n2t(np.asarray(v)) for k, v in state.items()})
    with torch.no_grad():
        return t2n(model(x))


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_forward_and_checkpoints_as_peft(case, tmp_path):
    pmodel, state = make_peft(case)
    x = inputs()
    with torch.no_grad():
        want_out = t2n(pmodel(x))
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    tuner = sorted(n for n, m in pmodel.base_model.model.named_modules()
                   if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer))
    assert ad.modules == tuner
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]

    # the independent float64 deltas from PEFT's own tensors and scalings (its inner Linear's get_delta_weight is
    # ΔW_out once; its attention's get_delta_weight is ΔW_in)
    deltas = {}
    for a in ATTN:
        layer = peft_layer(pmodel, a)
        inner = layer.base_layer.out_proj
        deltas[f"{a}.in_proj_weight"] = layer.scaling["default"] * (f64(t2n(layer.lora_B["default"].weight))
                                                                     @ f64(t2n(layer.lora_A["default"].weight)))
        deltas[f"{a}.out_proj.weight"] = inner.scaling["default"] * (f64(t2n(inner.lora_B["default"].weight))
                                                                      @ f64(t2n(inner.lora_A["default"].weight)))
        np.testing.assert_allclose(deltas[f"{a}.in_proj_weight"], t2n(layer.get_delta_weight("default")), atol=1e-6)
        np.testing.assert_allclose(deltas[f"{a}.out_proj.weight"], t2n(inner.get_delta_weight("default")), atol=1e-6)
        assert inner.scaling["default"] == layer.scaling["default"]  # the out-projection takes the attention's r/alpha
    if "head" in tuner:
        layer = peft_layer(pmodel, "head")
        deltas["head.weight"] = layer.scaling["default"] * (f64(t2n(layer.lora_B["default"].weight))
                                                            @ f64(t2n(layer.lora_A["default"].weight)))
    if "rank_pattern" in CASES[case]:
        assert peft_layer(pmodel, "blocks.0.attn").base_layer.out_proj.r["default"] == 6

    # per-module forwards: the in-projection as a Linear (3E, E); the out-projection as PEFT's attention applies
    # it (merged: W_out + 2ΔW_out), which is not PEFT's inner lora.Linear called alone (ΔW_out once)
    rng = np.random.default_rng(9)
    xm = rng.standard_normal((3, E)).astype(np.float32)
    for a in ATTN:
        out = f"{a}.base_layer.out_proj"
        b_in, b_out = state.get(f"{a}.in_proj_bias"), state.get(f"{a}.out_proj.bias")
        want = f64(xm) @ (f64(state[f"{a}.in_proj_weight"]) + deltas[f"{a}.in_proj_weight"]).T
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for compat in (False, True):
                got = ad.forward(a, xm, state, peft_compat=compat)
                np.testing.assert_allclose(got, want + (0 if b_in is None else f64(b_in)), atol=2e-5)
                got = ad.forward(out, xm, state, peft_compat=compat)
                np.testing.assert_allclose(got, peft_attention_out_projection(pmodel, a, xm), atol=2e-5)
        b = 0 if b_out is None else f64(peft_layer(pmodel, out).base_layer.bias.detach().numpy())
        W_out = f64(state[f"{a}.out_proj.weight"])
        np.testing.assert_allclose(got, f64(xm) @ (W_out + 2 * deltas[f"{a}.out_proj.weight"]).T + b, atol=2e-5)
        np.testing.assert_allclose(peft_forward(pmodel, out, xm), f64(xm) @ (W_out + deltas[f"{a}.out_proj.weight"]).T
                                   + b, atol=2e-5)

    # merges: the default and peft_compat=True are PEFT's merge_and_unload, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = ad.merge(state)
        merged_compat = ad.merge(state, peft_compat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    assert sorted(merged_compat) == sorted(reference) == sorted(state) == sorted(merged)
    for k, want in reference.items():
        change = deltas.get(k, 0.0)
        if k.endswith("out_proj.weight"):  # PEFT 0.21.2 adds the out-projection's change twice
            np.testing.assert_allclose(f64(want) - f64(state[k]), 2 * change, atol=2e-6, err_msg=k)
            change = 2 * change
        for mine in (merged, merged_compat):
            assert mine[k].dtype == want.dtype
            np.testing.assert_allclose(mine[k], want, atol=2e-6, err_msg=k)
            if k.endswith("out_proj.bias") and CASES[case].get("bias") == "lora_only":  # trained, saved, replaced
                assert not np.array_equal(want, state[k])
                np.testing.assert_array_equal(mine[k], want, err_msg=k)
            else:
                np.testing.assert_allclose(mine[k], f64(state[k]) + change, atol=2e-6, err_msg=k)
    for mine in (merged, merged_compat):
        np.testing.assert_allclose(run_torch(mine, x, case), want_out, atol=2e-5)

    # unmerges invert their merges (the replaced bias needs the original)
    originals = state if "bias" in CASES[case] else None
    for got, compat in ((merged, False), (merged_compat, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = ad.unmerge(got, peft_compat=compat, originals=originals)
        for k in state:
            np.testing.assert_allclose(back[k], state[k], atol=2e-6, err_msg=k)

    # saved back: the same files; PEFT loads peftmath's save (every key used) and computes the same output
    assert_saves_back_identically(ad, tmp_path / "peft")
    pm.save_adapter(ad, tmp_path / "ours")
    if "bias" in CASES[case]:  # PEFT loads one adapter with a trained bias only: no second load to check keys
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh = peft.PeftModel.from_pretrained(build(case), tmp_path / "ours").eval()
        assert not [w for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = load_in_peft(build(case), tmp_path / "ours")
    with torch.no_grad():
        np.testing.assert_allclose(t2n(fresh(x)), want_out, atol=1e-6)


def test_the_command_merges_and_inspects(tmp_path):
    from safetensors.numpy import load_file, save_file

    pmodel, state = make_peft("plain")
    ad = load_peft_checkpoint(pmodel, tmp_path / "adapter")
    save_file(state, str(tmp_path / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    base, adapter = str(tmp_path / "base.safetensors"), str(tmp_path / "adapter")
    assert cli.main(["merge", base, adapter, "-o", str(tmp_path / "m.safetensors")]) == 0
    assert cli.main(["merge", base, adapter, "-o", str(tmp_path / "c.safetensors"), "--peft-compat"]) == 0
    default, compat = load_file(str(tmp_path / "m.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert sorted(default) == sorted(compat) == sorted(reference)
    for k in reference:
        np.testing.assert_array_equal(default[k], api[k], err_msg=k)
        np.testing.assert_allclose(default[k], reference[k], atol=2e-6, err_msg=k)
        np.testing.assert_allclose(compat[k], reference[k], atol=2e-6, err_msg=k)
    for name, extra in (("m", []), ("c", ["--peft-compat"])):
        assert cli.main(["unmerge", str(tmp_path / f"{name}.safetensors"), adapter, "-o",
                         str(tmp_path / f"u{name}.safetensors"), *extra]) == 0
        back = load_file(str(tmp_path / f"u{name}.safetensors"))
        for k in state:
            np.testing.assert_allclose(back[k], state[k], atol=2e-6, err_msg=k)
    # verify accepts PEFT's own merged model (saved from merge_and_unload) under the default
    save_file(reference, str(tmp_path / "peft_merged.safetensors"))
    assert cli.main(["verify", base, adapter, str(tmp_path / "peft_merged.safetensors")]) == 0
    assert cli.main(["inspect", adapter, "--base", base]) == 0


def test_lora_bias_on_an_attention_is_refused(tmp_path):
    """PEFT 0.21.2 builds an attention with ``lora_bias=True`` but never applies the in-projection's
    ``lora_B.bias`` (its merge and forward use ``B A`` only): peftmath refuses the adapter, naming the attention,
    before anything is merged."""
    base = build("plain")
    state = base_state(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(base, peft.LoraConfig(target_modules=["attn"], lora_bias=True))
    redraw(pmodel, {"lora_": (0.0, 0.3)}, seed=1)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(pm.errors.UnsupportedError, match=r"attn\.base_layer\.out_proj: .*nn\.MultiheadAttention attn "
                                                         r"with lora_bias"):
        ad.merge(state, copy=False)
    assert all(np.array_equal(state[k], before[k]) for k in state)
