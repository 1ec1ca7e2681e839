"""AdaLoRA against PEFT 0.21.2: delta, forward, merge, unmerge (float32, bfloat16), checkpoints both
ways (pruned rank_pattern included), the RankAllocator replayed step by step, the orthogonal regulariser."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    assert_close,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    layer_kwargs,
    make_input,
    n2t,
    peft_config_dict,
    peft_forward,
    peft_layer,
    redraw,
    require_peft,
    t2n,
    to_adapter,
)

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath import Adapter  # noqa: E402
from peftmath.io.peft import config_from_dict  # noqa: E402
from peftmath.methods import adalora  # noqa: E402

pytestmark = pytest.mark.parity

LAYERS = {
    "blocks.0.lin": ("linear", dict(in_f=24, out_f=40)),
    "blocks.0.c1d": ("conv1d_t", dict(in_f=24, out_f=36)),
    "blocks.1.conv": ("conv2d", dict(in_ch=3, out_ch=8, k=3, padding=1, stride=2, dilation=1)),
}
NAMES = sorted(LAYERS)


def _model(dtype="float32", seed=0, layers=LAYERS):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=seed, dtype=dtype)


def _peft(config: dict, *, dtype="float32", seed=0, adapter_seed=1, autocast=True, layers=LAYERS, randomize=True):
    """A PEFT AdaLoRA model whose lora_A/E/B are drawn from a NumPy seed (E non-zero), its base state."""
    model = _model(dtype, seed, layers)
    state = base_state(model)
    cfg = dict(target_modules=[n.split(".")[-1] for n in layers], init_r=6, target_r=3, lora_alpha=10,
               total_step=10, init_lora_weights=False)
    cfg.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.AdaLoraConfig(**cfg), autocast_adapter_dtype=autocast)
    if randomize:
        redraw(pmodel, {"lora_A.": (0.0, 0.5), "lora_B.": (0.0, 0.5), "lora_E.": (0.0, 0.5)}, seed=adapter_seed)
    pmodel.eval()
    return pmodel, state


def _merged_weights(pmodel) -> dict:
    return {f"{n}.weight": t2n(peft_layer(pmodel, n).get_base_layer().weight) for n in NAMES}


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == "float32" else dict(atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------------------
# delta / forward / merge / unmerge
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_delta_forward_merge_unmerge(dtype, name, quiet_warnings):
    pmodel, state = _peft({}, dtype=dtype)
    ad = to_adapter(pmodel)
    layer = peft_layer(pmodel, name)
    W = state[f"{name}.weight"]
    with torch.no_grad():
        want_delta = t2n(layer.get_delta_weight("default"))
    for compat in (False, True):
        got = ad.delta_weight(name, weight_shape=W.shape, peft_compat=compat)
        err = assert_close(got, want_delta, atol=1e-5, rtol=1e-5, what=f"delta {name} compat={compat}")
        assert err <= 1e-5
    # forward (unmerged)
    x = make_input(pmodel, name, dtype=dtype)
    want_y = peft_forward(pmodel, name, x)
    got_y = ad.forward(name, x, state, **layer_kwargs(pmodel, name))
    assert got_y.dtype == want_y.dtype
    assert_close(got_y, want_y, **_tol(dtype), what=f"forward {name}")
    # merge, then unmerge
    with torch.no_grad():
        layer.merge()
    want_m = t2n(layer.get_base_layer().weight)
    got_m = ad.merge(state)[f"{name}.weight"]
    if dtype == "bfloat16":  # both add a float32 delta and round once: at most one bf16 ulp apart
        assert bits_differ(got_m, want_m) <= W.size // 50
        assert_close(got_m, want_m, atol=1e-2, rtol=1e-2, what="merge")
    else:
        assert_close(got_m, want_m, atol=1e-6, rtol=1e-6, what="merge")
    # the merged forward equals the unmerged one
    with torch.no_grad():
        merged_y = peft_forward(pmodel, name, x)
    assert_close(merged_y, want_y, **_tol(dtype), what="PEFT merged forward")
    with torch.no_grad():
        layer.unmerge()
    want_u = t2n(layer.get_base_layer().weight)
    got_u = ad.unmerge({**state, f"{name}.weight": want_m})[f"{name}.weight"]
    if dtype == "bfloat16":
        assert bits_differ(got_u, want_u) <= W.size // 50
    else:
        assert_close(got_u, want_u, atol=1e-6, rtol=1e-6, what="unmerge")
    # peft_compat=True: PEFT's operation order, bit for bit
    assert bits_differ(ad.merge(state, peft_compat=True)[f"{name}.weight"], want_m) == 0
    assert bits_differ(ad.unmerge({**state, f"{name}.weight": want_m}, peft_compat=True)[f"{name}.weight"], want_u) == 0


def test_bf16_adapter_peft_compat_bits(quiet_warnings):
    """With bf16 adapter tensors (autocast_adapter_dtype=False) PEFT rounds after every step;
    peft_compat=True follows the same order."""
    pmodel, state = _peft({}, dtype="bfloat16", autocast=False)
    ad = to_adapter(pmodel)
    for name in NAMES:
        layer = peft_layer(pmodel, name)
        with torch.no_grad():
            want = t2n(layer.get_delta_weight("default"))
        got = ad.delta_weight(name, weight_shape=state[f"{name}.weight"].shape, peft_compat=True)
        got_bf = np.asarray(got).astype(BF16)
        assert bits_differ(got_bf, want.astype(BF16)) <= want.size // 20, name
        assert_close(got_bf, want, atol=2e-2, rtol=2e-2, what=name)


# --------------------------------------------------------------------------------------------------
# RankAllocator replay
# --------------------------------------------------------------------------------------------------
def _params_np(pmodel) -> dict:
    out: dict = {}
    for n, p in pmodel.base_model.model.named_parameters():
        for s in ("lora_A", "lora_E", "lora_B"):
            if f".{s}.default" in n:
                out.setdefault(n.split(f".{s}.")[0], {})[s] = t2n(p).astype(np.float64)
    return out


def _set_grads(pmodel, rng) -> dict:
    grads: dict = {}
    for n, p in pmodel.base_model.model.named_parameters():
        for s in ("lora_A", "lora_E", "lora_B"):
            if f".{s}.default" in n:
                g = rng.normal(0.0, 1.0, p.shape).astype(np.float32)
                p.grad = torch.from_numpy(g.copy())
                grads.setdefault(n.split(f".{s}.")[0], {})[s] = g.astype(np.float64)
    return grads


@pytest.mark.parametrize("backend", ["numpy64", "torch32"])
def test_rank_allocator_replay(backend, quiet_warnings):
    cfg = dict(total_step=10, tinit=2, tfinal=3, deltaT=2, init_r=6, target_r=3, beta1=0.8, beta2=0.9)
    pmodel, _ = _peft(cfg)
    pmodel.train()
    ours_cfg = config_from_dict(peft_config_dict(pmodel))
    if backend == "torch32":
        import array_api_compat.torch as xp

        def conv(d):
            return {m: {s: xp.asarray(n2t(np.asarray(a, np.float32))) for s, a in p.items()} for m, p in d.items()}
    else:
        def conv(d):
            return d
    ra = pmodel.base_model.rankallocator
    rng = np.random.default_rng(7)
    params = conv(_params_np(pmodel))
    state = None
    masked_steps = []
    for step in range(1, 13):
        grads = _set_grads(pmodel, rng)
        want_budget, _ = ra.budget_schedule(step)
        pmodel.base_model.update_and_allocate(step)
        state, masks, budget, theta = adalora.allocate(step, params, conv(grads), state, ours_cfg)
        assert budget == want_budget, step
        if masks is not None:
            params = adalora.apply_masks(params, masks)
            masked_steps.append(step)
            want_pattern = pmodel.peft_config["default"].rank_pattern
            for m, mask in masks.items():
                assert [bool(v) for v in np.asarray(mask.tolist() if hasattr(mask, "tolist") else mask)] == \
                    want_pattern[f"{m}.lora_E.default"], (step, m)
        # EMAs: PEFT keys are the parameter names
        for m in params:
            for s in ("lora_A", "lora_E", "lora_B"):
                key = f"{m}.{s}.default"
                if key in ra.exp_avg_ipt:
                    got_i = np.asarray(state.exp_avg_ipt[m][s].tolist() if backend == "torch32" else state.exp_avg_ipt[m][s])
                    got_u = np.asarray(state.exp_avg_unc[m][s].tolist() if backend == "torch32" else state.exp_avg_unc[m][s])
                    assert_close(got_i, t2n(ra.exp_avg_ipt[key]), atol=1e-6, rtol=1e-5, what=f"Ī {key} @ {step}")
                    assert_close(got_u, t2n(ra.exp_avg_unc[key]), atol=1e-6, rtol=1e-5, what=f"Ū {key} @ {step}")
                else:
                    assert m not in state.exp_avg_ipt  # both reset after the final mask
        # parameters (E masked in place by PEFT)
        want = _params_np(pmodel)
        for m in params:
            got_e = params[m]["lora_E"]
            got_e = np.asarray(got_e.tolist()) if backend == "torch32" else got_e
            assert_close(got_e, want[m]["lora_E"], atol=1e-7, rtol=1e-6, what=f"E {m} @ {step}")
        # an optimizer step stand-in, applied identically on both sides
        delta = {m: {s: rng.normal(0.0, 0.01, a.shape) for s, a in p.items()} for m, p in want.items()}
        with torch.no_grad():
            for n, p in pmodel.base_model.model.named_parameters():
                for s in ("lora_A", "lora_E", "lora_B"):
                    if f".{s}.default" in n:
                        p.add_(torch.from_numpy(delta[n.split(f".{s}.")[0]][s].astype(np.float32)))
        params = {m: {s: (params[m][s] + conv({m: {s: delta[m][s].astype(np.float32)}})[m][s])
                      for s in params[m]} for m in params}
    assert masked_steps == [4, 6, 7, 8, 9, 10, 11, 12]
    assert sum(sum(v) for v in pmodel.peft_config["default"].rank_pattern.values()) == 3 * len(NAMES)


def test_orthogonal_regularizer(quiet_warnings):
    class WithLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.blocks = inner.blocks

        def forward(self, x):
            from types import SimpleNamespace

            return SimpleNamespace(loss=torch.zeros(()))

    model = WithLoss(_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.AdaLoraConfig(
            target_modules=["lin", "c1d", "conv"], init_r=5, total_step=10, orth_reg_weight=0.25,
            init_lora_weights=False))
    out = pmodel.base_model(torch.zeros(1))
    want = float(out.loss) / 0.25
    got = float(adalora.orthogonal_regularizer(_params_np(pmodel)))
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def _pruned_peft(tmp_path, lora_alpha=10):
    """A PEFT model taken through the whole schedule on fake gradients (a real pruned rank_pattern)."""
    cfg = dict(total_step=5, tinit=0, tfinal=1, deltaT=1, init_r=6, target_r=3, lora_alpha=lora_alpha)
    pmodel, state = _peft(cfg)
    pmodel.train()
    rng = np.random.default_rng(3)
    for step in range(1, 6):
        _set_grads(pmodel, rng)
        pmodel.base_model.update_and_allocate(step)
    pmodel.eval()
    pmodel.save_pretrained(tmp_path)
    return pmodel, state


@pytest.mark.parametrize("lora_alpha", [10, 0])
def test_peft_saves_pruned_peftmath_loads(tmp_path, quiet_warnings, lora_alpha):
    pmodel, state = _pruned_peft(tmp_path / "ad", lora_alpha)
    ad = pm.load_adapter(tmp_path / "ad")
    assert ad.peft_type == "ADALORA"
    rp = ad.config.rank_pattern
    assert set(rp) == {f"{n}.lora_E" for n in NAMES}
    for n in NAMES:
        assert ad.params[n]["lora_A"].shape[0] == sum(rp[f"{n}.lora_E"]) < 6
    got = ad.merge(state)
    # in-memory PEFT model (full rank, masked E) == peftmath on the truncated checkpoint; with
    # lora_alpha <= 0 PEFT's reload uses s = r_kept instead of init_r (a quirk peftmath follows)
    deltas = {}
    for n in NAMES:
        with torch.no_grad():
            deltas[n] = t2n(peft_layer(pmodel, n).get_delta_weight("default"))
        kept = sum(rp[f"{n}.lora_E"])
        factor = 1.0 if lora_alpha > 0 else kept / 6
        assert_close(ad.delta_weight(n, weight_shape=state[f"{n}.weight"].shape), deltas[n] * factor,
                     atol=1e-6, rtol=1e-5, what=n)
    if lora_alpha > 0:
        with torch.no_grad():
            pmodel.base_model.merge_adapter()
        want = _merged_weights(pmodel)
        for n in NAMES:
            assert_close(got[f"{n}.weight"], want[f"{n}.weight"], atol=1e-6, rtol=1e-6, what=n)
    # PEFT's own reload of the same folder (ranknum reset to init_r) agrees too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_model(), tmp_path / "ad")
    for n in NAMES:
        assert peft_layer(loaded, n).ranknum["default"].item() == 6.0
        x = make_input(loaded, n)
        assert_close(ad.forward(n, x, state, **layer_kwargs(loaded, n)), peft_forward(loaded, n, x),
                     atol=2e-5, rtol=2e-5, what=f"forward {n}")
    loaded.base_model.merge_adapter()
    for n in NAMES:
        assert_close(got[f"{n}.weight"], _merged_weights(loaded)[f"{n}.weight"], atol=1e-6, rtol=1e-6, what=n)


def test_peftmath_saves_pruned_peft_loads(tmp_path, quiet_warnings):
    masks = {"blocks.0.lin": [True, False, True, True, False, False],
             "blocks.0.c1d": [False] * 5 + [True],
             "blocks.1.conv": [True] * 6}
    config = adalora.AdaLoraConfig(target_modules=["lin", "c1d", "conv"], init_r=6, target_r=3, lora_alpha=7,
                                   total_step=10, init_lora_weights=False,
                                   rank_pattern=adalora.rank_pattern_for_config(masks))
    config.validate()
    model = _model()
    state = base_state(model)
    params = {}
    for i, n in enumerate(NAMES):
        layer = pm.Layer.of(state[f"{n}.weight"].shape, "Conv1D" if n.endswith("c1d") else None)
        params[n], _ = adalora.AdaLoraModule.initialize(n, config, layer, seed=i)
    ad = Adapter(config, params)
    pm.save_adapter(ad, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours")
    for n in NAMES:
        lay = peft_layer(loaded, n)
        assert lay.r["default"] == sum(masks[n])
        x = make_input(loaded, n)
        assert_close(ad.forward(n, x, state, **layer_kwargs(loaded, n)), peft_forward(loaded, n, x),
                     atol=2e-5, rtol=2e-5, what=f"forward {n}")
    loaded.base_model.merge_adapter()
    got = ad.merge(state)
    for n in NAMES:
        assert_close(got[f"{n}.weight"], _merged_weights(loaded)[f"{n}.weight"], atol=1e-6, rtol=1e-6, what=n)


def test_unpruned_round_trip_both_ways(tmp_path, quiet_warnings):
    pmodel, state = _peft({})
    pmodel.save_pretrained(tmp_path / "peft")
    ad = pm.load_adapter(tmp_path / "peft")
    assert ad.config.rank_pattern is None
    pm.save_adapter(ad, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(_model(), tmp_path / "ours")
    pmodel.base_model.merge_adapter()
    again.base_model.merge_adapter()
    got = ad.merge(state)
    for n in NAMES:
        w = got[f"{n}.weight"]
        assert_close(w, _merged_weights(pmodel)[f"{n}.weight"], atol=1e-6, rtol=1e-6, what=n)
        assert_close(w, _merged_weights(again)[f"{n}.weight"], atol=1e-6, rtol=1e-6, what=n)
