"""The PEFT-parity harness shared by the LoHa and LoKr tests (both LyCORIS methods in PEFT): build a
PEFT model on tiny layers and read PEFT's own adapter into peftmath, the inputs and error scales of the
comparisons, and the checks both methods run (delta / forward / merge / unmerge per module, a bf16
adapter with ``peft_compat``, the training forward on PEFT's dropout draws, checkpoints both ways)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    adapter_to_torch,
    assert_close,
    assert_same_tensors,
    assert_saves_back_identically,
    base_state,
    bf16_ulps,
    build_model,
    layer_factory,
    layer_kwargs,
    load_in_peft,
    n2t,
    peft_layer,
    peft_tensors,
    redraw,
    require_peft,
    t2n,
    to_adapter,
)

torch, peft = require_peft()

import peftmath as pmath  # noqa: E402
from peftmath.layers import Layer  # noqa: E402


def factory(kind, kw):
    """A torch layer of ``kind`` (``layer_factory``'s kinds plus a grouped Conv2d)."""
    if kind == "conv2d_grouped":
        return torch.nn.Conv2d(kw["in_ch"], kw["out_ch"], kw["k"], groups=kw["groups"], padding=1)
    return layer_factory(kind, **kw)


def make(case, config_cls, prefix: str, dtype="float32", *, autocast=True, seed=1):
    """(peft model, peftmath Adapter from PEFT's own state dict, base state dict) for ``case`` =
    (layers {name: (kind, keywords)}, config fields); the adapter tensors (named ``prefix``...) are
    redrawn from N(0, 0.4²) so that no factor is zero."""
    layers, fields = case
    model = build_model({n: factory(k, kw) for n, (k, kw) in layers.items()}, seed=0, dtype=dtype)
    state = base_state(model)
    cfg = config_cls(**fields, target_modules=list(layers), init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast)
    redraw(pm, {prefix: (0.0, 0.4)}, seed=seed)
    pm.eval()
    return pm, to_adapter(pm), state


def test_input(pm, name, dtype):
    base = peft_layer(pm, name).get_base_layer()
    rng = np.random.default_rng(5)
    if isinstance(base, torch.nn.Conv2d):
        shape = (2, base.in_channels, 9, 8)
    elif isinstance(base, torch.nn.Conv1d):
        shape = (2, base.in_channels, 11)
    else:
        shape = (3, 4, base.in_features)
    x = rng.standard_normal(shape).astype(np.float32)
    return x.astype(BF16) if dtype == "bfloat16" else x


test_input.__test__ = False  # a helper, not a test


def magnitude(x, W, b, mod, kw):
    """float64 ``|x|·(|W| + |ΔW|)ᵀ + |b|`` (or the conv of the absolute values): the scale of the
    rounding errors of a bf16 forward."""
    from peftmath._array import conv

    absw = np.abs(np.asarray(W, np.float64)) + np.abs(np.asarray(mod.delta_weight(), np.float64))
    ax = np.abs(np.asarray(x, np.float64))
    ab = np.zeros(absw.shape[0]) if b is None else np.abs(np.asarray(b, np.float64))
    if absw.ndim == 2:
        return ax @ absw.T + ab
    return conv(ax, absw, ab, **kw)


def module_like_peft(pm, ad, state, name):
    """peftmath's module ``name``, after checking that PEFT resolved the same rank and scaling."""
    layer = peft_layer(pm, name)
    mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
    assert layer.r["default"] == mod.r and layer.scaling["default"] == pytest.approx(mod.scaling, rel=1e-15)
    return mod


def check_delta_forward_merge_unmerge(pm, ad, state, name, dtype):
    """One module against PEFT: rank and scaling, ΔW, the unmerged forward (peftmath on torch tensors),
    merge and unmerge; float32 within 1e-5, bfloat16 within one ulp (of the forward's magnitude for the
    forward). Returns peftmath's module."""
    layer = peft_layer(pm, name)
    mod = module_like_peft(pm, ad, state, name)
    W = state[f"{name}.weight"]
    # delta (fp32 adapter)
    with torch.no_grad():
        d_peft = t2n(layer.get_delta_weight("default"))
    assert_close(mod.delta_weight(), d_peft, atol=1e-6, rtol=1e-5, what=f"{name} delta")
    # forward, computed by peftmath with torch's kernels (the base layer bit-identical to PEFT's)
    kw = layer_kwargs(pm, name, groups=True)
    x = test_input(pm, name, dtype)
    with torch.no_grad():
        y_peft = t2n(layer(n2t(x)))
    y = t2n(adapter_to_torch(ad).forward(name, n2t(x), {k: n2t(v) for k, v in state.items()}, **kw))
    if dtype == "float32":
        assert_close(y, y_peft, atol=1e-5, rtol=1e-5, what=f"{name} forward")
    else:  # both round base(x) to bf16 (PEFT fuses the bias, Layer.base_forward adds it after)
        mag = magnitude(x, W, state.get(f"{name}.bias"), mod, kw)
        err = np.abs(y.astype(np.float64) - y_peft.astype(np.float64))
        assert np.all(err <= 2 * 2.0**-7 * mag), f"{name} forward: max err/mag {np.max(err / mag):.3g}"
    # merge / unmerge (NumPy), against PEFT's merged and unmerged weights
    merged = mod.merge(W).weight
    with torch.no_grad():
        layer.merge()
        w_peft = t2n(layer.get_base_layer().weight)
        layer.unmerge()
        w_back = t2n(layer.get_base_layer().weight)
    back = mod.unmerge(w_peft).weight  # the same input as PEFT's unmerge
    if dtype == "float32":
        assert_close(merged, w_peft, atol=1e-6, rtol=1e-6, what=f"{name} merge")
        assert_close(back, w_back, atol=1e-6, rtol=1e-6, what=f"{name} unmerge")
    else:
        assert merged.dtype == BF16 and bf16_ulps(merged, w_peft).max() <= 1
        assert np.mean(bf16_ulps(merged, w_peft) > 0) < 0.02, "more than 2% of merged bf16 weights differ"
        assert bf16_ulps(back, w_back).max() <= 1
    return mod


def check_bf16_adapter_peft_compat(pm, ad, state, name, tensor):
    """autocast_adapter_dtype=False keeps bf16 adapter tensors (``tensor`` of module ``name`` is checked);
    PEFT then rounds every intermediate: ``peft_compat=True`` gives PEFT's ΔW within one bf16 ulp (and
    no farther than the default), and its merge within one ulp."""
    layer = peft_layer(pm, name)
    assert getattr(layer, tensor)["default"].dtype == torch.bfloat16
    mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
    with torch.no_grad():
        d_peft = t2n(layer.get_delta_weight("default")).astype(np.float32)
        layer.merge()
        w_peft = t2n(layer.get_base_layer().weight)
    compat = np.asarray(mod.delta_weight(peft_compat=True))
    plain = np.asarray(mod.delta_weight())
    ulp = np.abs(np.spacing(d_peft.astype(BF16)).astype(np.float32))
    assert np.max(np.abs(compat - d_peft) / np.maximum(ulp, 1e-30)) <= 1
    assert np.max(np.abs(compat - d_peft)) <= np.max(np.abs(plain - d_peft))
    merged = mod.merge(state[f"{name}.weight"], peft_compat=True).weight
    assert bf16_ulps(merged, w_peft).max() <= 1


def check_train_forward(pm, ad, state, name, forward, *, seed, mean_scaled, what):
    """PEFT's training forward of module ``name`` (with the rank and module dropout set on its layer)
    against ``forward(x, W, mod, bias=, row_mask=, **conv keywords)`` on PEFT's own draws: PEFT draws
    torch.rand(1) (module dropout) then torch.rand(out) (rows); replayed, they give the row mask
    (divided by its mean when ``mean_scaled``), or the base layer alone when the module is dropped."""
    layer = peft_layer(pm, name)
    x = test_input(pm, name, "float32")
    W, b = state[f"{name}.weight"], state[f"{name}.bias"]
    pm.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        y_peft = t2n(layer(n2t(x)))
    torch.manual_seed(seed)
    keep_module = bool(torch.rand(1) > layer.module_dropout["default"])
    drop = (torch.rand(W.shape[0]) > layer.rank_dropout["default"]).float()
    mask = (drop / drop.mean() if mean_scaled else drop).numpy()
    mod = ad.module(name, weight_shape=W.shape)
    kw = layer_kwargs(pm, name)
    if keep_module:
        y = forward(x, W, mod, bias=b, row_mask=mask, **kw)
    else:
        y = mod.layer.base_forward(x, W, b, np, **kw)
    assert_close(y, y_peft, atol=1e-5, rtol=1e-5, what=what)


def check_peft_checkpoint_loads(pm, state, folder, peft_type, fields):
    """PEFT's ``save_pretrained`` in ``folder`` -> ``peftmath.load_adapter``: the config ``fields`` as
    PEFT wrote them, PEFT's tensors bit for bit, PEFT's merged weights (float32, 1e-6), and
    ``save_adapter`` writes PEFT's files again."""
    pm.save_pretrained(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    ad = pmath.load_adapter(folder)
    assert ad.config.peft_type == peft_type
    for field in fields:
        assert ad.config.to_dict()[field] == raw[field], field
    assert_same_tensors(ad.params, peft_tensors(pm))
    merged = ad.merge(state)
    for name in ad.modules:
        layer = peft_layer(pm, name)
        with torch.no_grad():
            layer.merge()
            w_peft = t2n(layer.get_base_layer().weight)
        assert_close(merged[f"{name}.weight"], w_peft, atol=1e-6, rtol=1e-6, what=f"{name} merge")
    assert_saves_back_identically(ad, folder)


def check_peftmath_checkpoint_loads(layers, config, module_cls, folder, **init_kw):
    """An adapter peftmath initialises (``module_cls.initialize(..., seed=i, **init_kw)`` per layer of
    ``layers``, on a base model of seed 3) -> ``save_adapter`` -> PEFT's ``from_pretrained``: every key
    used, the same ranks and scalings, PEFT holds our tensors bit for bit, and PEFT's forward equals
    peftmath's (float32, 1e-4)."""
    model = build_model({n: factory(k, kw) for n, (k, kw) in layers.items()}, seed=3)
    state = base_state(model)
    params = {}
    for i, name in enumerate(layers):
        params[name], new_w = module_cls.initialize(name, config, Layer.of(state[f"{name}.weight"].shape), seed=i,
                                                    **init_kw)
        assert new_w is None
    ad = pmath.Adapter(config, params)
    pmath.save_adapter(ad, folder)
    pm = load_in_peft(model, folder)
    for name in layers:
        layer = peft_layer(pm, name)
        module_like_peft(pm, ad, state, name)
        for key, value in params[name].items():
            np.testing.assert_array_equal(t2n(getattr(layer, key)["default"]), value)
        x = test_input(pm, name, "float32")
        with torch.no_grad():
            y_peft = t2n(layer(n2t(x)))
        assert_close(ad.forward(name, x, state, **layer_kwargs(pm, name, groups=True)), y_peft, atol=1e-4,
                     rtol=1e-4, what=f"{name} forward")
