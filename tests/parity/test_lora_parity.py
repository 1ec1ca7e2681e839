"""LoRA parity with Hugging Face PEFT 0.21.2: delta, forward, merge, unmerge, initialisations.

Every case wraps a tiny torch model with ``peft.get_peft_model`` (``init_lora_weights=False``, then all
adapter tensors redrawn from a NumPy seed, so B != 0 and the adapter is far from a no-op) and reads the
very same tensors into a :class:`peftmath.Adapter`. PEFT is the oracle:

* float32: ΔW and merged / unmerged weights within ``atol = rtol = 1e-5``, forwards within ``1e-4``
  (issue 2, "Done when"). Measured: ΔW and merges 0 to 1.2e-7 (Conv 1x1 and a bias-free Linear differ
  in the last float32 bit), forwards <= 7.6e-6.
* bfloat16: peftmath's default (``W + ΔW`` formed in float32, rounded once) is bit-identical to PEFT's
  default unsafe merge of a float32 adapter and within one bf16 ulp (at the largest operand) of every
  other PEFT path; ``peft_compat=True`` is bit-identical to PEFT on every path (unsafe, safe,
  Embedding, unmerge, bf16 adapter, lora_bias).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    TOL_W,
    TOL_Y,
    assert_close,
    assert_compat_bits,
    bf16_ulps,
    bits_differ,
    check_inplace_and_unmerge,
    in_namespace,
    layer_kwargs,
    make_input,
    make_peft,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
)

torch, peft = require_peft()

from peftmath.layers import Layer, LayerKind  # noqa: E402
from peftmath.methods import lora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

def _lin(**kw):
    return ("linear", kw)


#: case -> (layers, LoraConfig fields); alpha != r everywhere so that the scaling matters
CASES = {
    "linear": ({"lin": _lin()}, dict(r=4, lora_alpha=12, target_modules=["lin"])),
    "linear_nobias": ({"lin": _lin(bias=False, in_f=32, out_f=16)}, dict(r=8, lora_alpha=5, target_modules=["lin"])),
    "rslora": ({"lin": _lin()}, dict(r=4, lora_alpha=12, use_rslora=True, target_modules=["lin"])),
    "conv1d_transformers": ({"attn.c_attn": ("conv1d_t", dict(in_f=24, out_f=40))},
                            dict(r=4, lora_alpha=12, target_modules=["c_attn"])),
    "embedding": ({"emb": ("embedding", {})}, dict(r=4, lora_alpha=12, target_modules=["emb"])),
    "conv1d": ({"conv": ("conv1d", dict(k=3, padding=1))}, dict(r=4, lora_alpha=12, target_modules=["conv"])),
    "conv2d_1x1": ({"conv": ("conv2d", dict(k=1))}, dict(r=4, lora_alpha=12, target_modules=["conv"])),
    "conv2d_3x3": ({"conv": ("conv2d", dict(k=3, stride=2, padding=1))},
                   dict(r=4, lora_alpha=12, target_modules=["conv"])),
    "conv3d": ({"conv": ("conv3d", dict(k=3, in_ch=3, out_ch=4, padding=1))},
               dict(r=2, lora_alpha=6, target_modules=["conv"])),
    "lora_bias_linear": ({"lin": _lin()}, dict(r=4, lora_alpha=12, lora_bias=True, target_modules=["lin"])),
    "lora_bias_conv2d": ({"conv": ("conv2d", dict(k=3, padding=1))},
                         dict(r=4, lora_alpha=12, lora_bias=True, target_modules=["conv"])),
    # rank / alpha patterns: a regex key (blocks\.1\.q), a key matched by suffix ("v" -> blocks.0.v and
    # blocks.1.v), a key with a character class (blocks\.\d\.v) that loses to the earlier "v" in
    # rank_pattern but decides alpha_pattern, and a module left at the defaults (blocks.0.q)
    "patterns": (
        {"blocks.0.q": _lin(), "blocks.0.v": _lin(), "blocks.1.q": _lin(), "blocks.1.v": _lin(),
         "head": _lin(in_f=40, out_f=16)},
        dict(r=4, lora_alpha=8, target_modules=["q", "v", "head"],
             rank_pattern={r"blocks\.1\.q": 2, "v": 6}, alpha_pattern={r"blocks\.\d\.v": 3, "head": 20}),
    ),
    "patterns_rslora": (
        {"blocks.0.q": _lin(), "blocks.1.q": _lin(), "head": _lin(in_f=40, out_f=16)},
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q", "head"],
             rank_pattern={r"blocks\.1\.q": 2}, alpha_pattern={"head": 20}),
    ),
}


def _layer_kind(pm, name):
    from transformers.pytorch_utils import Conv1D

    base = peft_layer(pm, name).get_base_layer()
    if isinstance(base, Conv1D):
        return LayerKind.CONV1D_TRANSPOSED
    if isinstance(base, torch.nn.Embedding):
        return LayerKind.EMBEDDING
    return Layer.of(tuple(base.weight.shape)).kind


# --------------------------------------------------------------------------------------------------
# float32: delta, forward, merge, unmerge, merge_and_unload
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_peft(case):
    layers, config = CASES[case]
    pm, ad, state = make_peft(layers, config)
    names = ad.modules
    assert names == sorted(layers)
    for name in names:
        layer = peft_layer(pm, name)
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        # the rank / scaling PEFT resolved from the patterns
        assert mod.r == layer.r["default"], name
        assert mod.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), name
        # delta weight: Adapter, ModuleAdapter and the functional form
        want = t2n(layer.get_delta_weight("default"))
        assert_close(ad.delta_weight(name, weight_shape=want.shape), want, **TOL_W, what=f"{name} ΔW")
        kind = _layer_kind(pm, name)
        if kind is not LayerKind.EMBEDDING:
            d = lora.delta_weight(mod.A, mod.B, scaling=mod.scaling, layer=Layer.of(want.shape, kind))
            assert_close(d, want, **TOL_W, what=f"{name} lora.delta_weight")
        # unmerged forward (base bias included; conv stride / padding passed through)
        x = make_input(pm, name)
        assert_close(ad.forward(name, x, state, **layer_kwargs(pm, name)), peft_forward(pm, name, x), **TOL_Y,
                     what=f"{name} forward")
    # merge / unmerge against PEFT's own
    pm.merge_adapter()
    peft_merged = peft_weights(pm, names)
    ours = ad.merge(state)
    for key, want in peft_merged.items():
        assert_close(ours[key], want, **TOL_W, what=f"merge {key}")
    # the in-place path (copy=False: BLAS gemm with beta=1 on NumPy float32) gives the same weights,
    # its unmerge restores weights and lora_bias-updated biases; so does the unmerge of PEFT's weights
    check_inplace_and_unmerge(pm, ad, state, peft_merged)
    # merge_and_unload gives a plain model whose state dict is peftmath's merged state
    unloaded = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(unloaded) == sorted(state)
    for key in state:
        assert_close(ours[key], unloaded[key], **TOL_W, what=f"merge_and_unload {key}")


def test_patterns_resolve_like_peft():
    """Ranks and alphas per module, including the PEFT first-key-wins rule, agree with PEFT's layers."""
    layers, config = CASES["patterns"]
    pm, ad, _ = make_peft(layers, config)
    got = {n: (peft_layer(pm, n).r["default"], peft_layer(pm, n).lora_alpha["default"]) for n in ad.modules}
    assert got == {"blocks.0.q": (4, 8), "blocks.0.v": (6, 3), "blocks.1.q": (2, 8), "blocks.1.v": (6, 3),
                   "head": (4, 20)}
    assert {n: ad.config.rank_and_alpha(n) for n in ad.modules} == got


# --------------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------------
BF16_CASES = ["linear", "conv1d_transformers", "embedding", "conv2d_3x3", "lora_bias_linear", "patterns"]


def _bf16_setup(case, *, autocast=True):
    layers, config = CASES[case]
    # factors N(0, 0.3²) and s = 3 make ΔW as large as W, so that many roundings matter
    pm, ad, state = make_peft(layers, config, dtype="bfloat16", autocast_adapter_dtype=autocast)
    return pm, ad, state


def _peft_paths(pm, names, state, *, safe):
    """PEFT's merged and unmerged weights; ``state`` is updated to the weights PEFT merged into (a bf16
    merge / unmerge round trip does not restore W exactly, so a second merge starts elsewhere)."""
    state.update(peft_weights(pm, names))
    pm.merge_adapter(safe_merge=safe)
    merged = peft_weights(pm, names)
    pm.unmerge_adapter()
    unmerged = peft_weights(pm, names)
    return merged, unmerged


def _delta_spacing(ad, state, key):
    """The bf16 spacing of max(|W|, |ΔW|, |W + ΔW|) per element (the scale of a double rounding)."""
    name = key.rsplit(".", 1)[0]
    w = state[key].astype(np.float64)
    if key.endswith(".bias"):
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        lb = ad.params[name].get("lora_B.bias")
        d = 0 * w if lb is None else np.asarray(lb, np.float64) * mod.scaling
    else:
        d = np.asarray(ad.delta_weight(name, weight_shape=w.shape), np.float64)
    big = np.maximum(np.maximum(np.abs(w), np.abs(d)), np.abs(w + d)).astype(BF16)
    return np.abs(np.spacing(big)).astype(np.float64)


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_default_unsafe_merge_is_peft_default(case):
    """PEFT's default (fp32 adapter on a bf16 base, unsafe merge ``W.data += ΔW``) forms the sum in
    float32 and rounds once, which is peftmath's default rounding: the results agree to the bit,
    except Embedding, whose merge rounds ΔW to bf16 first in PEFT; there peftmath's default is within
    one bf16 ulp of max(|W|, |ΔW|, |W'|)."""
    pm, ad, state = _bf16_setup(case)
    names = ad.modules
    assert all(a.dtype == np.float32 for p in ad.params.values() for a in p.values())  # autocast to fp32
    merged, _ = _peft_paths(pm, names, state, safe=False)
    ours = ad.merge(state)
    for key, want in merged.items():
        assert ours[key].dtype == BF16
        if case == "embedding":
            err = np.abs(ours[key].astype(np.float64) - want.astype(np.float64)) / _delta_spacing(ad, state, key)
            assert err.max() <= 1.0, (key, err.max())
        else:
            assert np.all(bf16_ulps(ours[key], want) <= 1.0), key
            assert bits_differ(ours[key], want) == 0, key


@pytest.mark.parametrize("autocast", [True, False], ids=["fp32_adapter", "bf16_adapter"])
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_default_within_one_ulp_of_every_peft_path(case, autocast):
    """PEFT's safe merge, its unmerge and every merge of a bf16 adapter round ΔW to bf16 before the
    add (a double rounding); peftmath's default rounds the float32 sum once. With u = the bf16 spacing
    at max(|W|, |ΔW|, |W ± ΔW|): peftmath is within u/2 of the exact sum S and PEFT within
    u/2 (rounding ΔW) + u/2 (rounding W + bf16(ΔW)); both results lie on the bf16 grid, which has
    step u when |S| is in the top binade (so 1.5 u rounds down to 1 u) and at most u/2 below (where
    the rounding errors of the sums are at most u/4): at most one u apart. Measured: exactly 1 u at
    worst, on every case and both adapter dtypes. The spacing at |W ± ΔW| itself is no yardstick:
    after cancellation the sum is tiny and PEFT's result is off by up to ulp(ΔW)/2 from the exactly
    rounded one (2-5% of the elements are more than one ulp of the result apart)."""
    pm, ad, state = _bf16_setup(case, autocast=autocast)
    names = ad.modules
    for safe in (False, True):
        merged, unmerged = _peft_paths(pm, names, state, safe=safe)
        ours = ad.merge(state, safe=safe)
        back = ad.unmerge(merged)
        for key in merged:
            sp = _delta_spacing(ad, state, key)
            err_m = np.abs(ours[key].astype(np.float64) - merged[key].astype(np.float64)) / sp
            err_u = np.abs(back[key].astype(np.float64) - unmerged[key].astype(np.float64)) / sp
            assert err_m.max() <= 1.0 and err_u.max() <= 1.0, (key, safe, err_m.max(), err_u.max())


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32_adapter", "bf16_adapter"])
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_peft_compat_is_bit_identical(case, autocast, namespace):
    """``peft_compat=True`` reproduces PEFT's rounding order on every path: unsafe merge (ΔW as
    computed), safe merge and Embedding merge (ΔW rounded to W's dtype first), unmerge (idem), a bf16
    adapter (ΔW = bf16(float32 product), PEFT's CPU rule) and the lora_bias update (``b_B·s`` in the
    adapter dtype, added in float32).

    With the torch namespace peftmath runs torch's own GEMM and must agree to the bit. With NumPy the
    float32 ΔW comes from a different BLAS (OpenBLAS vs oneDNN/MKL); the product has only r <= 8 terms
    and on the machines we measured it agreed to the bit too (0 differing elements), but a different
    summation order could flip the last float32 bit and, rarely, a bf16 rounding: we allow at most
    0.1% of the elements to differ there, by one ulp only.
    """
    pm, ad, state = _bf16_setup(case, autocast=autocast)
    names = ad.modules
    if not autocast:
        assert all(a.dtype == BF16 for p in ad.params.values() for a in p.values())
    ad_x, to_x, to_n = in_namespace(ad, namespace)
    for safe in (False, True):
        merged, unmerged = _peft_paths(pm, names, state, safe=safe)
        ours = to_n(ad_x.merge(to_x(state), safe=safe, peft_compat=True))
        back = to_n(ad_x.unmerge(to_x(merged), peft_compat=True))
        assert_compat_bits(ours, merged, namespace=namespace, what=("merge", safe))
        assert_compat_bits(back, unmerged, namespace=namespace, what=("unmerge", safe))


# --------------------------------------------------------------------------------------------------
# deterministic initialisations: PiSSA (full SVD), OLoRA, orthogonal
# --------------------------------------------------------------------------------------------------
def _peft_init(init, layers, config):
    pm, _, state = make_peft(layers, dict(config, init_lora_weights=init), randomize=False)
    return pm, state


def _signs_aligned(ours_A, ours_B, A, B):
    """Flip each rank-one component (row of A with column of B) of ours to PEFT's sign."""
    sign = np.sign(np.sum(ours_A * A, axis=1))
    sign[sign == 0] = 1
    return ours_A * sign[:, None], ours_B * sign[None, :]


# OLoRA is left out on Conv1D: PEFT factors the stored (in, out) weight there (no fan_in_fan_out
# transpose), peftmath defines OLoRA for nn.Linear only
@pytest.mark.parametrize("init, kind", [("pissa", "linear"), ("pissa", "conv1d_transformers"), ("olora", "linear")])
def test_svd_and_qr_inits_match_peft(init, kind):
    layers = {"lin": _lin(in_f=24, out_f=40)} if kind == "linear" else {"c": ("conv1d_t", dict(in_f=24, out_f=40))}
    config = dict(r=4, lora_alpha=12, target_modules=list(layers))
    pm, state = _peft_init(init, layers, config)
    (name,) = list(layers)
    layer = peft_layer(pm, name)
    A, B = t2n(layer.lora_A["default"].weight), t2n(layer.lora_B["default"].weight)
    s = layer.scaling["default"]
    new_peft = t2n(layer.get_base_layer().weight)
    cfg = lora.LoraConfig(**config, fan_in_fan_out=(kind != "linear"))
    geom = Layer.of(state[f"{name}.weight"].shape, "Linear" if kind == "linear" else "Conv1D")
    params, new_ours = lora.LoraModule.initialize(name, cfg, geom, weight=state[f"{name}.weight"], init=init)
    oA, oB = np.asarray(params["lora_A.weight"]), np.asarray(params["lora_B.weight"])
    # the product and the residual base weight do not depend on the factors' signs
    assert_close(s * oB @ oA, s * B @ A, **TOL_W, what=f"{init} s·BA")
    assert_close(new_ours, new_peft, **TOL_W, what=f"{init} residual W")
    # the sum is the original weight (up to rounding)
    W = state[f"{name}.weight"]
    delta = s * oB @ oA
    assert_close(np.asarray(new_ours) + (delta if kind == "linear" else delta.T), W, **TOL_W, what="W' + sBA")
    # the factors themselves, up to the sign of each rank-one component
    oA, oB = _signs_aligned(oA, oB, A, B)
    assert_close(oA, A, atol=1e-5, rtol=1e-4, what=f"{init} A up to sign")
    assert_close(oB, B, atol=1e-5, rtol=1e-4, what=f"{init} B up to sign")


def test_orthogonal_init_is_a_no_op_in_both():
    """``init_lora_weights='orthogonal'``: both factors non-zero, B A = 0 (to rounding) in PEFT and in
    peftmath (the random draws differ: torch's RNG is not reproduced, the structure is)."""
    layers = {"lin": _lin(in_f=24, out_f=40)}
    config = dict(r=6, lora_alpha=12, target_modules=["lin"])
    pm, state = _peft_init("orthogonal", layers, config)
    layer = peft_layer(pm, "lin")
    A, B = t2n(layer.lora_A["default"].weight), t2n(layer.lora_B["default"].weight)
    params, new = lora.LoraModule.initialize("lin", lora.LoraConfig(**config), Layer.of((40, 24)),
                                             weight=state["lin.weight"], init="orthogonal", seed=3)
    oA, oB = np.asarray(params["lora_A.weight"]), np.asarray(params["lora_B.weight"])
    assert new is None
    for a, b in ((A, B), (oA, oB)):
        assert a.shape == (6, 24) and b.shape == (40, 6)
        assert np.abs(a).max() > 1e-2 and np.abs(b).max() > 1e-2
        # zero in exact arithmetic; float32 factors built from a float32 QR leave ~r·eps·|B||A|
        ba = np.abs(b.astype(np.float64) @ a.astype(np.float64)).max()
        assert ba <= 1e-5 * np.abs(b).max() * np.abs(a).max(), ba
    assert_close(t2n(layer.get_delta_weight("default")), 0 * state["lin.weight"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# where PEFT itself fails, peftmath stays consistent (merged forward == unmerged forward)
# --------------------------------------------------------------------------------------------------
def _merged_forward(ad, name, x, state, **kw):
    import array_api_compat.numpy as xp

    merged = ad.merge(state)
    w = merged[f"{name}.weight"]
    return Layer.of(w.shape).base_forward(x, w, merged.get(f"{name}.bias"), xp, **kw)


def test_conv3d_kernel_1x1xk_merges_where_peft_crashes():
    """PEFT's ``_ConvNd.get_delta_weight`` takes its 1x1 path for a Conv3d whose first two kernel sizes
    are 1 and crashes on the 5-D tensors (issue #3768, still in 0.21.2); its unmerged forward works.
    peftmath merges, and the merged layer reproduces PEFT's unmerged forward."""
    pm, ad, state = make_peft({"conv": ("conv3d", dict(k=(1, 1, 3), in_ch=3, out_ch=4, padding=(0, 0, 1)))},
                              dict(r=2, lora_alpha=6, target_modules=["conv"]))
    x = make_input(pm, "conv")
    kw = layer_kwargs(pm, "conv")
    want = peft_forward(pm, "conv", x)
    assert_close(ad.forward("conv", x, state, **kw), want, **TOL_Y, what="unmerged forward")
    assert_close(_merged_forward(ad, "conv", x, state, **kw), want, **TOL_Y, what="merged forward")
    with pytest.raises(RuntimeError):
        pm.merge_adapter()


def test_dilated_conv_forward_where_peft_crashes():
    """PEFT's conv ``lora_A`` does not copy the base dilation (issue #3697): with dilation 2 and
    padding 2 the LoRA branch has another spatial size and PEFT's forward raises. peftmath's default
    uses the base dilation, so its unmerged forward equals the merged layer — and PEFT's merged
    weights (merging works) give the same output."""
    pm, ad, state = make_peft({"conv": ("conv2d", dict(k=3, dilation=2, padding=2))},
                              dict(r=2, lora_alpha=6, target_modules=["conv"]))
    x = make_input(pm, "conv")
    kw = layer_kwargs(pm, "conv")
    with pytest.raises(RuntimeError):
        peft_forward(pm, "conv", x)
    ours = ad.forward("conv", x, state, **kw)
    assert_close(ours, _merged_forward(ad, "conv", x, state, **kw), **TOL_Y, what="unmerged vs merged")
    pm.merge_adapter()
    assert_close(ours, peft_forward(pm, "conv", x), **TOL_Y, what="vs PEFT's merged layer")


def test_olora_on_conv1d_is_refused_where_peft_builds_unusable_factors():
    """PEFT's OLoRA factors the stored weight without the fan_in_fan_out transpose: on a transformers
    Conv1D (W stored (in, out)) it sets lora_A to (r, out) and lora_B to (in, r), and the forward then
    fails. peftmath refuses OLoRA on anything but nn.Linear, with a ConfigError naming the layer."""
    from peftmath.errors import ConfigError

    pm, _, state = make_peft({"c": ("conv1d_t", dict(in_f=24, out_f=40))},
                             dict(r=4, lora_alpha=12, target_modules=["c"], init_lora_weights="olora"),
                             randomize=False)
    layer = peft_layer(pm, "c")
    assert tuple(layer.lora_A["default"].weight.shape) == (4, 40)  # should be (4, 24)
    with pytest.raises(RuntimeError):
        peft_forward(pm, "c", make_input(pm, "c"))
    cfg = lora.LoraConfig(r=4, lora_alpha=12, fan_in_fan_out=True, target_modules=["c"])
    with pytest.raises(ConfigError, match="olora"):
        lora.LoraModule.initialize("c", cfg, Layer.of((24, 40), "Conv1D"), weight=state["c.weight"], init="olora")
