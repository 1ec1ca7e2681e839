"""The PEFT-parity harness shared by the LoHa and LoKr tests (both LyCORIS methods in PEFT): build a
PEFT model on tiny layers, read PEFT's own adapter into peftmath, and the inputs and error scales of
the comparisons."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import BF16, base_state, build_model, layer_factory, n2t, t2n

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftmath as pmath  # noqa: E402
from peftmath.io.peft import config_from_dict, split_key  # noqa: E402


def factory(kind, kw):
    """A torch layer of ``kind`` (``layer_factory``'s kinds plus a grouped Conv2d)."""
    if kind == "conv2d_grouped":
        return torch.nn.Conv2d(kw["in_ch"], kw["out_ch"], kw["k"], groups=kw["groups"], padding=1)
    return layer_factory(kind, **kw)


def make(case, config_cls, prefix: str, suffixes, dtype="float32", *, autocast=True, seed=1):
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
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if prefix in name:
                p.copy_(torch.from_numpy(rng.normal(0.0, 0.4, p.shape).astype(np.float32)).to(p.dtype))
    pm.eval()
    return pm, to_adapter(pm, suffixes), state


def config_dict(pm):
    def default(o):
        return sorted(o) if isinstance(o, (set, frozenset)) else getattr(o, "value", str(o))

    return json.loads(json.dumps(pm.peft_config["default"].to_dict(), default=default))


def to_adapter(pm, suffixes):
    params = {}
    for key, value in peft.get_peft_model_state_dict(pm).items():
        module, suffix = split_key(key, suffixes)
        params.setdefault(module, {})[suffix] = t2n(value)
    return pmath.Adapter(config_from_dict(config_dict(pm)), params)


def layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def conv_kwargs(pm, name):
    base = layer(pm, name).get_base_layer()
    if isinstance(base, torch.nn.modules.conv._ConvNd):
        return dict(stride=tuple(base.stride), padding=tuple(base.padding), dilation=tuple(base.dilation),
                    groups=base.groups)
    return {}


def test_input(pm, name, dtype):
    base = layer(pm, name).get_base_layer()
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


def torch_adapter(ad):
    return pmath.Adapter(ad.config, {m: {k: n2t(np.asarray(v)) for k, v in p.items()} for m, p in ad.params.items()})


def check_delta_forward_merge_unmerge(pm, layer, mod, tad, tstate, state, name, dtype):
    """One module against PEFT: ΔW, the unmerged forward (peftmath on torch tensors), merge and unmerge;
    float32 within 1e-5, bfloat16 within one ulp (of the forward's magnitude for the forward)."""
    from tests.parity.conftest import BF16, assert_close, bf16_ulps

    W = state[f"{name}.weight"]
    # delta (fp32 adapter)
    with torch.no_grad():
        d_peft = t2n(layer.get_delta_weight("default"))
    assert_close(mod.delta_weight(), d_peft, atol=1e-6, rtol=1e-5, what=f"{name} delta")
    # forward, computed by peftmath with torch's kernels (the base layer bit-identical to PEFT's)
    kw = conv_kwargs(pm, name)
    x = test_input(pm, name, dtype)
    with torch.no_grad():
        y_peft = t2n(layer(n2t(x)))
    y = t2n(tad.forward(name, n2t(x), tstate, **kw))
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
