"""Poly parity with Hugging Face PEFT 0.21.2: each layer's forward for given task ids (Poly and MHR, n_splits > 1)
against PEFT's layers and the whole model's forward, merges refused, checkpoints both ways, peftmath's
initialisation loaded by PEFT, the trainable-parameter count, and a task's fixed mixture as a LoRA adapter whose
merge equals PEFT's forward for that task."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    build_model,
    load_in_peft,
    load_peft_checkpoint,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import ConfigError, UnsupportedError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import poly  # noqa: E402

LAYERS = {"blocks.0.q": (12, 8), "blocks.0.v": (12, 6), "blocks.1.q": (12, 8), "head": (8, 4)}
CONFIGS = [dict(), dict(n_splits=2, n_skills=3, r=3), dict(n_splits=2, n_skills=2, r=2, n_tasks=5)]


def base_model(seed=0):
    return build_model({n: torch.nn.Linear(i, o) for n, (i, o) in LAYERS.items()}, seed=seed)


def make_peft(seed=1, **config):
    cfg = dict(target_modules=["q", "v", "head"], r=4, n_tasks=3, n_skills=4, n_splits=1)
    cfg.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(base_model(), peft.PolyConfig(**cfg))
    with torch.no_grad():  # a trained adapter: B moves off zero, the router's logits off ±1e-3
        rng = np.random.default_rng(seed)
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.5, tuple(p.shape)).astype(np.float32)))
    return pm.eval()


def state_of(pm):
    return {k.replace(".base_layer", ""): t2n(v) for k, v in pm.base_model.model.state_dict().items()
            if "poly_" not in k}


def layer_out(pm, name, x, task_ids):
    with torch.no_grad():
        return t2n(pm.base_model.model.get_submodule(name)(torch.from_numpy(x), task_ids=torch.tensor(task_ids)))


def inputs(seed=5, batch=3, seq=4):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, seq, i)).astype(np.float32) for n, (i, _) in LAYERS.items()}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("task_ids", [[2, 0, 1], [1, 1, 1]])
def test_layer_forward_matches_peft(config, task_ids, tmp_path):
    pm = make_peft(**config)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert isinstance(ad.config, poly.PolyConfig) and ad.config.n_splits == config.get("n_splits", 1)
    state = state_of(pm)
    for name, x in inputs().items():
        want = layer_out(pm, name, x, task_ids)
        got = ad.forward(name, x, state, task_ids=np.array(task_ids))
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(ad.forward(name, x, state, task_ids=task_ids, peft_compat=True), want,
                                   atol=2e-6, rtol=1e-5)


def test_whole_model_forward_matches_peft(tmp_path):
    """PEFT's PolyModel.forward(task_ids=...) hooks the ids into every layer: the same as peftmath's layers
    chained (blocks.0.q's output feeds head)."""
    pm = make_peft(n_splits=2, n_skills=3)
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    x = inputs()["blocks.0.q"]
    tids = [0, 2, 1]

    inner = pm.base_model.model
    inner.forward = lambda x: inner.head(inner.get_submodule("blocks.0.q")(x))
    with torch.no_grad():  # PolyModel.forward hooks task_ids into every Poly layer
        want = t2n(pm.base_model(torch.from_numpy(x), task_ids=torch.tensor(tids)))
    got = ad.forward("head", ad.forward("blocks.0.q", x, state, task_ids=tids), state, task_ids=tids)
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=1e-5)


def test_merge_refused_in_both(tmp_path):
    pm = make_peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    with pytest.raises((AttributeError, NotImplementedError, TypeError)):
        pm.merge_and_unload()  # PEFT's Poly layers have no merge
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(UnsupportedError, match="task id of each input row.*fixed_mixture"):
        ad.merge(state)
    with pytest.raises(UnsupportedError, match="fixed_mixture"):
        ad.delta_weight("head")
    assert all(np.array_equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("config", CONFIGS)
def test_fixed_mixture_merge_equals_peft_forward_of_that_task(config, tmp_path):
    pm = make_peft(**config)
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    for t in range(ad.config.n_tasks):
        lora = poly.fixed_mixture(ad, t)
        assert lora.config.peft_type == "LORA" and lora.config.r == ad.config.r
        merged = lora.merge(state)
        for name, x in inputs().items():
            want = layer_out(pm, name, x, [t] * x.shape[0])
            W, b = merged[f"{name}.weight"], merged[f"{name}.bias"]
            np.testing.assert_allclose(x @ W.T + b, want, atol=1e-5, rtol=1e-5)
        # the LoRA adapter is a PEFT LoRA checkpoint too: PEFT's merge_and_unload gives the same weights
        peftmath.save_adapter(lora, tmp_path / f"lora{t}")
        lm = load_in_peft(base_model(), tmp_path / f"lora{t}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_merged = {k: t2n(v) for k, v in lm.merge_and_unload().state_dict().items()}
        for name in LAYERS:
            np.testing.assert_allclose(merged[f"{name}.weight"], peft_merged[f"{name}.weight"], atol=1e-6, rtol=1e-6)


def test_expert_is_a_one_hot_mixture_in_peft(tmp_path):
    """poly.expert(ad, s): PEFT's forward with router logits that put all the weight on skill s (+40: σ = 1,
    −40: σ ≈ 4e-18) for one task."""
    pm = make_peft(n_splits=2, n_skills=3, r=3)
    ad = load_peft_checkpoint(pm, tmp_path)
    s = 1
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith("module_logits"):
                logits = torch.full((2, 3), -40.0)
                logits[:, s] = 40.0
                p[0] = logits.reshape(-1)
    merged = poly.expert(ad, s).merge(state_of(pm))
    for name, x in inputs().items():
        np.testing.assert_allclose(x @ merged[f"{name}.weight"].T + merged[f"{name}.bias"],
                                   layer_out(pm, name, x, [0, 0, 0]), atol=1e-5, rtol=1e-5)


def test_combine_linear_of_experts_is_the_mixture_for_one_split(tmp_path):
    """n_splits = 1 and the same mixing weights w in every module: pm.combine of the experts with
    combination_type="linear" and weights w_s² (each expert's A and B scaled by w_s) is fixed_mixture(weights=w)."""
    pm = make_peft(n_skills=3)
    ad = load_peft_checkpoint(pm, tmp_path)
    w = np.array([[0.5, 0.2, 0.3]])
    experts = [poly.expert(ad, s) for s in range(3)]
    combined = peftmath.combine(experts, list(w[0] ** 2), combination_type="linear")
    state = state_of(pm)
    want = poly.fixed_mixture(ad, weights=w).merge(state)
    got = combined.merge(state)
    for name in LAYERS:
        np.testing.assert_allclose(got[f"{name}.weight"], want[f"{name}.weight"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pm = make_peft(**config)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]


def test_checkpoints_both_ways(tmp_path):
    pm = make_peft(n_splits=2, n_skills=3)
    ad = load_peft_checkpoint(pm, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    peftmath.save_adapter(ad, tmp_path / "ours")
    fresh = load_in_peft(base_model(), tmp_path / "ours")
    for name, x in inputs().items():
        np.testing.assert_allclose(layer_out(fresh, name, x, [1, 2, 0]), layer_out(pm, name, x, [1, 2, 0]),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init_weights", [True, False])
def test_peftmath_initialisation_loads_in_peft(init_weights, tmp_path):
    cfg = poly.PolyConfig(target_modules=["q", "v", "head"], r=2, n_tasks=2, n_skills=3, n_splits=2,
                          init_weights=init_weights)
    params = {n: poly.init_module(cfg, Layer.of((o, i)), seed=k) for k, (n, (i, o)) in enumerate(LAYERS.items())}
    ad = peftmath.Adapter(cfg, params)
    peftmath.save_adapter(ad, tmp_path)
    fresh = load_in_peft(base_model(), tmp_path)
    state = state_of(fresh)
    for name, x in inputs().items():
        np.testing.assert_allclose(ad.forward(name, x, state, task_ids=[1, 0, 1]), layer_out(fresh, name, x, [1, 0, 1]),
                                   atol=2e-6, rtol=1e-5)
    assert ad.num_trainable_parameters() == fresh.get_nb_trainable_parameters()[0]


def test_task_ids_out_of_range_refused_as_peft(tmp_path):
    pm = make_peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    x = inputs()["head"]
    with pytest.raises(ValueError, match="Only 3 tasks"):
        layer_out(pm, "head", x, [0, 3, 1])
    with pytest.raises(ConfigError, match=r"task ids \[3\] are outside \[0, 3\)"):
        ad.forward("head", x, state_of(pm), task_ids=[0, 3, 1])


def test_one_task_merges_to_peft_forward(tmp_path):
    """n_tasks = 1: the only valid task id is 0, so the change is fixed and peftmath merges it (PEFT has no merge);
    the merged layer equals PEFT's forward with task_ids = 0."""
    pm = make_peft(n_tasks=1, n_splits=2, n_skills=3)
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    merged = ad.merge(state)
    for name, x in inputs().items():
        want = layer_out(pm, name, x, [0] * x.shape[0])
        np.testing.assert_allclose(x @ merged[f"{name}.weight"].T + merged[f"{name}.bias"], want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ad.forward(name, x, state), want, atol=2e-6, rtol=1e-5)
