"""(IA)³ parity with Hugging Face PEFT 0.21.2: forward, merge, unmerge and checkpoints both ways.

Each case wraps a tiny torch model with ``peft.get_peft_model(IA3Config(...))`` and redraws every
``ia3_l`` from a NumPy seed with ``|l|`` in [0.25, 4] and a random sign; peftmath reads the very same
tensors. Measured: merges are bit-identical to PEFT in float32 and bfloat16 (one product, one
rounding, on both sides); unmerges are bit-identical with ``peft_compat=True`` and agree to the last
bit here too by default (``l + 1e-8 == l`` in float32 for |l| >= 0.25); forwards agree within float32
rounding, and within one bfloat16 ulp with ``peft_compat=True``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    TOL_Y,
    assert_close,
    base_state,
    bf16_ulps,
    bits_differ,
    build_model,
    layer_factory,
    layer_kwargs,
    load_in_peft,
    make_input,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
    to_adapter,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath import Adapter  # noqa: E402
from peftmath.errors import NotInvertibleError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import ia3  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]


def _grouped_conv(in_ch=6, out_ch=12, groups=3, k=3):
    return torch.nn.Conv2d(in_ch, out_ch, k, groups=groups, padding=1)


#: case -> (layer factories, feedforward_modules); every case has biases unless said otherwise
CASES = {
    "linear": ({"lin": lambda: layer_factory("linear")}, []),
    "linear_ff": ({"mlp.down": lambda: layer_factory("linear", in_f=40, out_f=24)}, ["down"]),
    "linear_nobias_ff_regex": ({"mlp.down": lambda: layer_factory("linear", bias=False),
                                "attn.q": lambda: layer_factory("linear", in_f=24, out_f=24)}, r".*\.down"),
    "conv1d_transformers": ({"attn.c_attn": lambda: layer_factory("conv1d_t", in_f=24, out_f=40),
                             "mlp.c_fc": lambda: layer_factory("conv1d_t", in_f=16, out_f=24)}, ["mlp.c_fc"]),
    "conv2d": ({"conv": lambda: layer_factory("conv2d", k=3, padding=1)}, []),
    "conv2d_ff": ({"conv": lambda: layer_factory("conv2d", k=3, stride=2)}, ["conv"]),
    "conv2d_grouped_ff": ({"gconv": _grouped_conv}, ["gconv"]),
    "conv2d_grouped": ({"gconv": _grouped_conv}, []),
    "conv3d": ({"c3": lambda: layer_factory("conv3d", in_ch=3, out_ch=4, k=3, padding=1),
                "c3ff": lambda: layer_factory("conv3d", in_ch=4, out_ch=2, k=1)}, ["c3ff"]),
    # PEFT's list rule is a raw suffix: "down" also makes "lin_down" feedforward (no dot boundary)
    "suffix_quirk": ({"lin_down": lambda: layer_factory("linear", in_f=24, out_f=40),
                      "up": lambda: layer_factory("linear", in_f=40, out_f=24)}, ["down"]),
}


def _randomize(pm, seed: int, low: float = 0.25, high: float = 4.0) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                v = rng.uniform(low, high, p.shape) * rng.choice([-1.0, 1.0], p.shape)
                p.copy_(torch.from_numpy(v.astype(np.float32)).to(p.dtype))


def _targets(factories, ff):
    """PEFT wants a list feedforward_modules to be a subset of target_modules."""
    return list(factories) + ([t for t in ff if t not in factories] if isinstance(ff, list) else [])


def make(case: str, *, dtype: str = "float32", seed: int = 0, adapter_seed: int = 3, low=0.25, high=4.0):
    factories, ff = CASES[case]
    model = build_model({n: f() for n, f in factories.items()}, seed=seed, dtype=dtype)
    state = base_state(model)
    cfg = peft.IA3Config(target_modules=_targets(factories, ff), feedforward_modules=ff, init_ia3_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
    _randomize(pm, adapter_seed, low, high)
    pm.eval()
    return pm, to_adapter(pm), state, list(factories)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_bit_identical(case, dtype):
    pm, ad, state, names = make(case, dtype=dtype)
    for name in names:  # feedforward decided like PEFT
        assert ad.module(name, weight_shape=state[f"{name}.weight"].shape).feedforward == peft_layer(pm, name).is_feedforward
    merged = ad.merge(state)
    pm.merge_adapter()
    want = peft_weights(pm, names)
    for key, value in want.items():
        assert bits_differ(merged[key], value) == 0, key
    unmerged_compat = ad.unmerge(merged, peft_compat=True)
    unmerged = ad.unmerge(merged)
    pm.unmerge_adapter()
    want = peft_weights(pm, names)
    for key, value in want.items():
        assert bits_differ(unmerged_compat[key], value) == 0, key
        # |l| >= 0.25: l + 1e-8 rounds back to l in float32, so the default agrees bit for bit too
        assert bits_differ(unmerged[key], value) == 0, key


@pytest.mark.parametrize("case", list(CASES))
def test_forward_float32(case):
    pm, ad, state, names = make(case)
    for name in names:
        x = make_input(pm, name)
        want = peft_forward(pm, name, x)
        got = ad.forward(name, x, state, **layer_kwargs(pm, name, groups=True))
        assert got.dtype == np.float32
        assert_close(got, want, what=f"{case}/{name}", **TOL_Y)
        got_c = ad.forward(name, x, state, peft_compat=True, **layer_kwargs(pm, name, groups=True))
        assert_close(got_c, want, what=f"{case}/{name} compat", **TOL_Y)


@pytest.mark.parametrize("case", ["linear", "linear_ff", "conv1d_transformers", "conv2d", "conv2d_ff",
                                  "conv2d_grouped_ff"])
def test_forward_bfloat16(case):
    """peft_compat reproduces PEFT's two roundings (within one bf16 ulp: torch's bf16 GEMM blocks its
    float32 sums differently). The default rounds once: within one ulp of the float64 result of the
    same bf16 inputs, while PEFT stays within its own error bound 2 eps (|x l| |W| + |b|)."""
    pm, ad, state, names = make(case, dtype="bfloat16")
    eps = 2.0**-8  # bf16 unit roundoff
    for name in names:
        x = make_input(pm, name, dtype="bfloat16")
        kw = layer_kwargs(pm, name, groups=True)
        want = peft_forward(pm, name, x)
        got = ad.forward(name, x, state, peft_compat=True, **kw)
        assert got.dtype == BF16
        assert bf16_ulps(got, want).max() <= 1, (case, name)
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        W, b = state[f"{name}.weight"].astype(np.float64), state[f"{name}.bias"].astype(np.float64)
        l, x64 = np.asarray(mod.l, np.float64), x.astype(np.float64)
        layer = Layer(mod.layer.kind, mod.layer.weight_shape, kw.get("groups", mod.layer.groups))
        extra = {k: v for k, v in kw.items() if k != "groups"}
        ref = ia3.forward(x64, W, l, bias=b, feedforward=mod.feedforward, layer=layer, **extra)
        mag = ia3.forward(np.abs(x64), np.abs(W), np.abs(l), bias=np.abs(b), feedforward=mod.feedforward,
                          layer=layer, **extra)
        got_d = ad.forward(name, x, state, **kw)
        assert bf16_ulps(got_d, ref.astype(BF16)).max() <= 1, (case, name)
        assert np.all(np.abs(want.astype(np.float64) - ref) <= 2 * eps * mag + 2.0**-133), (case, name)


def test_merged_forward_equals_peft_merged_forward():
    pm, ad, state, names = make("conv1d_transformers")
    merged = ad.merge(state)
    pm.merge_adapter()
    for name in names:
        x = make_input(pm, name)
        want = peft_forward(pm, name, x)  # PEFT's merged layer
        w, b = merged[f"{name}.weight"], merged[f"{name}.bias"]
        assert_close(x @ w + b, want, what=name, **TOL_Y)


def test_unmerge_small_scale_quirk():
    """With |l| ~ 1e-3 PEFT's ``l + 1e-8`` is visible: peft_compat reproduces it bit for bit, the
    default divides by l and returns the original weight (within a float32 rounding)."""
    pm, ad, state, names = make("linear", low=1e-3, high=2e-3)
    merged = ad.merge(state)
    pm.merge_adapter()
    pm.unmerge_adapter()
    want = peft_weights(pm, names)
    compat = ad.unmerge(merged, peft_compat=True)
    default = ad.unmerge(merged)
    key = "lin.weight"
    assert bits_differ(compat[key], want[key]) == 0
    assert bits_differ(default[key], want[key]) > 0
    err_default = np.abs(default[key].astype(np.float64) - state[key]).max()
    err_peft = np.abs(want[key].astype(np.float64) - state[key]).max()
    assert err_default <= 2 * 2.0**-23 * np.abs(state[key]).max()
    assert err_peft > 10 * err_default


def test_zero_scale_refused_like_peft_is_not():
    pm, ad, state, names = make("linear")
    l = np.array(ad.params["lin"]["ia3_l"])
    l[7, 0] = 0.0
    ad.params["lin"]["ia3_l"] = l
    merged = ad.merge(state)
    with pytest.raises(NotInvertibleError, match=r"lin: ia3_l\[7\] = 0.0"):
        ad.unmerge(merged)
    blown = ad.unmerge(merged, peft_compat=True)  # PEFT: row 7 becomes 0 / 1e-8 = 0
    assert np.all(blown["lin.weight"][7] == 0)


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["linear_nobias_ff_regex", "conv1d_transformers", "conv2d_grouped_ff", "conv3d"])
def test_peft_checkpoint_loads(tmp_path, case, dtype):
    pm, ad, state, names = make(case, dtype=dtype)
    pm.save_pretrained(tmp_path)
    loaded = peftmath.load_adapter(tmp_path)
    assert isinstance(loaded.config, ia3.IA3Config)
    assert loaded.modules == sorted(names)
    merged = loaded.merge(state)
    pm.merge_adapter()
    for key, value in peft_weights(pm, names).items():
        assert bits_differ(merged[key], value) == 0, key


def _fresh(case, dtype):
    factories, ff = CASES[case]
    return build_model({n: f() for n, f in factories.items()}, seed=0, dtype=dtype), ff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["linear", "linear_nobias_ff_regex", "conv1d_transformers", "conv2d_grouped_ff",
                                  "conv3d"])
def test_peftmath_checkpoint_loads_in_peft(tmp_path, case, dtype):
    factories, ff = CASES[case]
    names = list(factories)
    model, _ = _fresh(case, dtype)
    state = base_state(model)
    config = ia3.IA3Config(target_modules=_targets(factories, ff), feedforward_modules=ff, init_ia3_weights=False)
    params = {}
    for i, name in enumerate(names):
        p, _ = ia3.IA3Module.initialize(name, config, peft_layer_like(model, name), seed=10 + i)
        params[name] = p
    ad = Adapter(config, params)
    peftmath.save_adapter(ad, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "layers_pattern" not in data and data["peft_type"] == "IA3"
    pm = load_in_peft(model, tmp_path)
    for name in names:
        got = t2n(peft_layer(pm, name).ia3_l["default"])
        assert np.array_equal(got, params[name]["ia3_l"]), name
    merged = ad.merge(state)
    pm.merge_adapter()
    for key, value in peft_weights(pm, names).items():
        assert bits_differ(merged[key], value) == 0, key


def peft_layer_like(model, name):
    """peftmath's Layer for torch module ``name`` of a plain model (groups included)."""
    from transformers.pytorch_utils import Conv1D

    from peftmath.layers import Layer

    mod = model.get_submodule(name)
    shape = tuple(mod.weight.shape)
    if isinstance(mod, Conv1D):
        return Layer.of(shape, "Conv1D")
    return Layer.of(shape, groups=getattr(mod, "groups", 1))
