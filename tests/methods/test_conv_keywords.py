"""Every method's forward takes the same conv keywords and checks its input (issue 15, items 6 and 7).

* ``stride``, ``padding``, ``dilation`` and ``groups`` are accepted by every method's functional and
  module forward (see "Conv keywords" in :mod:`peftmath.layers`); the unmerged forward with them equals
  PyTorch's own ``conv{1,2,3}d`` of the merged weight (an independent float64 computation).
* ``groups`` is inferred from the input (``x.shape[1] // W.shape[1]``); a given ``groups`` that
  contradicts it is a ShapeError; grouped convs compute what PyTorch computes (LoRA, LoHa, LoKr, IA3)
  or are refused with UnsupportedError (DoRA, AdaLoRA, OFT, BOFT).
* An input of the wrong width is a ShapeError naming the module and both shapes, on every method,
  through ``Adapter.forward`` and through each functional forward.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from peftmath.adapter import Adapter
from peftmath.errors import ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import adalora, boft, dora, get_method, ia3, loha, lokr, lora, oft, vera
from tests.test_cross_backend import CASES, _adapter, _build

torch = pytest.importorskip("torch")
F = torch.nn.functional

EPS64 = float(np.finfo(np.float64).eps)


def _torch_conv(x, W, b=None, **kw):
    """PyTorch's convolution in float64: the independent reference."""
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[W.ndim]
    t = (lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)))
    return fn(t(x), t(W), t(b), **kw).numpy()


def _close(got, want, scale):
    return float(np.max(np.abs(np.asarray(got) - want))) <= 1e4 * EPS64 * scale


def _state(W, bias):
    return {"m.weight": W} | ({"m.bias": bias} if bias is not None else {})


CONV_CASES = [c for c in CASES if c.values[2].is_conv]
FLAT_CASES = [c for c in CASES if c.values[2] in (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)]


# --------------------------------------------------------------------------------------------------
# Item 7: the input's width
# --------------------------------------------------------------------------------------------------
def _wider(x: np.ndarray) -> np.ndarray:
    """``x`` with one more feature / channel (never a multiple of the weight's channels here)."""
    return np.concatenate([x, x[:, :1]], axis=1)


@pytest.mark.parametrize("peft_type,label,kind", CONV_CASES + FLAT_CASES)
def test_wrong_width_is_a_shape_error_naming_module_and_shapes(peft_type, label, kind):
    method, config, layer, W, bias, params, x = _build(peft_type, label, kind, 5)
    ad = _adapter(config, params, None, None)
    bad = _wider(x)
    with pytest.raises(ShapeError) as info:
        ad.forward("m", bad, _state(W, bias), kind=kind)
    msg = str(info.value)
    assert msg.startswith("m: ") and str(tuple(bad.shape)) in msg and str(tuple(W.shape)) in msg
    ad.forward("m", x, _state(W, bias), kind=kind)  # the right width passes


def _functional_forwards():
    """method -> (build the arguments of its functional forward for a Linear (out=6, in=4)), name."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 4))
    A, B = rng.standard_normal((2, 4)), rng.standard_normal((6, 2))
    yield "lora.forward", lambda x: lora.forward(x, W, A, B, scaling=1.0)
    yield "dora.forward", lambda x: dora.forward(x, W, A, B, np.ones(6), scaling=1.0)
    E = rng.standard_normal((2, 1))
    yield "adalora.forward", lambda x: adalora.forward(x, W, A, E, B, scaling=1.0)
    yield "ia3.forward", lambda x: ia3.forward(x, W, rng.standard_normal((6, 1)))
    yield "loha.forward", lambda x: loha.forward(x, W, B, A, B, A, scaling=1.0)
    yield "lokr.forward", lambda x: lokr.forward(
        x, W, {"lokr_w1": rng.standard_normal((2, 2)), "lokr_w2": rng.standard_normal((3, 2))}, scaling=1.0)
    yield "vera.forward", lambda x: vera.forward(x, W, np.ones(6), np.ones(2), rng.standard_normal((2, 4)),
                                                 rng.standard_normal((6, 2)))
    yield "oft.forward", lambda x: oft.forward(x, W, np.eye(2)[None].repeat(2, axis=0))
    yield "boft.forward", lambda x: boft.forward(x, W, np.zeros((1, 2, 2, 2)), np.ones((6, 1)))


@pytest.mark.parametrize("where,call", list(_functional_forwards()), ids=lambda v: v if isinstance(v, str) else "")
def test_functional_forward_wrong_width(where, call):
    x = np.ones((3, 4))
    assert call(x).shape == (3, 6)
    with pytest.raises(ShapeError, match=re.escape(f"{where}: input of shape (3, 5) does not fit the Linear base "
                                                   f"weight (6, 4)")):
        call(np.ones((3, 5)))


# --------------------------------------------------------------------------------------------------
# Item 6: the conv keywords on every method
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type,label,kind", CONV_CASES)
def test_conv_keywords_equal_torch_conv_of_the_merged_weight(peft_type, label, kind):
    method, config, layer, W, bias, params, x = _build(peft_type, label, kind, 6)
    ad = _adapter(config, params, None, None)
    state = _state(W, bias)
    merged = ad.merge(state, layer_kinds={"m": kind})
    Wm, bm = merged["m.weight"], merged["m.bias"]
    scale = float(np.max(np.abs(x))) * float(np.sum(np.abs(Wm))) + float(np.max(np.abs(bm)))
    plain = ad.forward("m", x, state, kind=kind)
    assert np.array_equal(ad.forward("m", x, state, kind=kind, stride=1, padding=0, dilation=1, groups=1), plain)
    kw = dict(stride=2, padding=1, dilation=2)
    if peft_type == "OFT":
        with pytest.raises(UnsupportedError, match="dilation"):
            ad.forward("m", x, state, kind=kind, **kw)
        kw["dilation"] = 1
    got = ad.forward("m", x, state, kind=kind, **kw)
    assert _close(got, _torch_conv(x, Wm, bm, **kw), scale)
    with pytest.raises(ShapeError, match=r"m: groups=2 contradicts the input .* groups = \d+ // \d+ = 1"):
        ad.forward("m", x, state, kind=kind, groups=2)


@pytest.mark.parametrize("peft_type,label,kind", FLAT_CASES)
def test_conv_keywords_on_a_layer_that_is_not_a_conv(peft_type, label, kind):
    method, config, layer, W, bias, params, x = _build(peft_type, label, kind, 7)
    ad = _adapter(config, params, None, None)
    y = ad.forward("m", x, _state(W, bias), kind=kind)
    assert np.array_equal(ad.forward("m", x, _state(W, bias), kind=kind, stride=1, padding=0, groups=None), y)
    with pytest.raises(ShapeError, match=r"m: stride=2, groups=2 only apply to convolutions"):
        ad.forward("m", x, _state(W, bias), kind=kind, stride=2, groups=2)


# --------------------------------------------------------------------------------------------------
# Item 6: grouped convolutions
# --------------------------------------------------------------------------------------------------
GROUPED = {  # method -> config fields
    "LORA": dict(r=6, lora_alpha=8, init_lora_weights=False),  # r divisible by groups, as PEFT needs
    "LOHA": dict(r=2, alpha=6, init_weights=False),
    "LOKR": dict(r=2, alpha=6, init_weights=False),
    "IA3": dict(init_ia3_weights=False),
    "IA3-ff": dict(init_ia3_weights=False, feedforward_modules=["m"]),
}


def _grouped(peft_type: str, shape: tuple[int, ...], groups: int, seed: int):
    method = get_method(peft_type.split("-")[0])
    rng = np.random.default_rng(seed)
    layer = Layer.of(shape, groups=groups)
    W = rng.standard_normal(shape)
    bias = rng.standard_normal(shape[0])
    config = method.Config(target_modules=["m"], **GROUPED[peft_type])
    params, _ = method.Module.initialize("m", config, layer, weight=W, seed=seed)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = rng.standard_normal((2, shape[1] * groups, *(k + 4 for k in shape[2:])))
    return method, config, Adapter(config, {"m": params}), W, bias, x


@pytest.mark.parametrize("peft_type", list(GROUPED))
@pytest.mark.parametrize("shape,groups", [((8, 2, 3), 2), ((6, 2, 3, 3), 3), ((4, 1, 2, 2, 2), 2)],
                         ids=["Conv1d-g2", "Conv2d-g3", "Conv3d-g2"])
def test_grouped_conv_forward_infers_groups(peft_type, shape, groups):
    if Layer.of(shape).kind not in get_method(peft_type.split("-")[0]).Module.supported_kinds:
        pytest.skip(f"{peft_type} does not adapt {Layer.of(shape).kind.value}")
    method, config, ad, W, bias, x = _grouped(peft_type, shape, groups, 8)
    state = _state(W, bias)
    mod = ad.module("m", weight_shape=tuple(W.shape))
    kw = dict(padding=1)
    got = ad.forward("m", x, state, **kw)  # no groups= given: inferred from x
    if peft_type == "LORA":  # no dense delta for a grouped conv (PEFT cannot merge it): the two convs
        lo = _torch_conv(_torch_conv(x, mod.A, **kw), mod.B, groups=groups)
        want = _torch_conv(x, W, bias, groups=groups, **kw) + mod.scaling * lo
    elif peft_type.startswith("IA3"):
        merged = ad.merge(state)
        want = _torch_conv(x, merged["m.weight"], merged["m.bias"], groups=groups, **kw)
    else:
        want = _torch_conv(x, W + np.asarray(mod.delta_weight()), bias, groups=groups, **kw)
    scale = float(np.max(np.abs(x))) * float(np.sum(np.abs(W))) * 10
    assert np.max(np.abs(want - _torch_conv(x, W, bias, groups=groups, **kw))) > 1e-3  # the adapter matters
    assert _close(got, want, scale)
    assert np.array_equal(ad.forward("m", x, state, groups=groups, **kw), got)
    with pytest.raises(ShapeError, match=rf"m: groups=1 contradicts the input .* groups = {x.shape[1]} // "
                                         rf"{shape[1]} = {groups}"):
        ad.forward("m", x, state, groups=1, **kw)


def test_groups_that_do_not_divide_the_output_channels():
    method, config, ad, W, bias, x = _grouped("LOHA", (6, 2, 3, 3), 1, 9)
    x4 = np.concatenate([x, x, x, x], axis=1)  # 8 channels: groups 4, which does not divide 6 outputs
    with pytest.raises(ShapeError, match=r"m: input of shape \(2, 8, 7, 7\) .* groups = 8 // 2 = 4 does not divide "
                                         r"the 6 output channels"):
        ad.forward("m", x4, _state(W, bias))


@pytest.mark.parametrize("peft_type,label", [("ADALORA", "AdaLoRA"), ("OFT", "OFT"), ("BOFT", "BOFT")])
def test_grouped_input_refused_where_the_method_does_not_define_it(peft_type, label):
    method, config, layer, W, bias, params, x = _build(peft_type, label, LayerKind.CONV2D, 10)
    ad = _adapter(config, params, None, None)
    x2 = np.concatenate([x, x], axis=1)  # twice the weight's channels: a grouped conv with groups=2
    with pytest.raises(UnsupportedError, match="groups=2"):
        ad.forward("m", x2, _state(W, bias), kind=LayerKind.CONV2D)


def test_dora_on_a_grouped_conv_forwards_and_refuses_merges():
    """A grouped conv: the adapter's forward (groups inferred from the input) is the functional one, which
    test_dora checks against a float64 loop of PEFT's norm; merges are refused (specs/dora.md)."""
    rng = np.random.default_rng(11)
    layer = Layer.of((4, 2, 3, 3), groups=2)
    W = rng.standard_normal(layer.weight_shape)
    A, B = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((4, 1, 1, 1))
    m = rng.uniform(0.5, 2.0, (1, 4, 1, 1))
    params = {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m}
    ad = Adapter(lora.LoraConfig(target_modules=["m"], r=2, lora_alpha=2, use_dora=True), {"m": params})
    x = rng.standard_normal((1, 4, 5, 5))
    want = dora.forward(x, W, A, B, m, scaling=1.0, layer=layer)
    np.testing.assert_allclose(ad.forward("m", x, {"m.weight": W}), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dora.forward(x, W, A, B, m, scaling=1.0), want, rtol=0, atol=0)  # groups from x
    with pytest.raises(UnsupportedError, match="DoRA on a conv with groups=2.*cannot be merged"):
        ad.merge({"m.weight": W})
