"""DoRA parity with Hugging Face PEFT 0.21.2 (``use_dora=True``): magnitude init, forward, merge,
the recorded weight norm, unmerge — and the cross-process unmerge PEFT cannot do (design §3 rule 8).

Layers: nn.Linear, transformers Conv1D (fan_in_fan_out), nn.Embedding (one norm per embedding
dimension, over the vocabulary), nn.Conv2d 1x1 and 3x3 with stride / padding, nn.Conv1d. The
magnitude is redrawn as ``m · U(0.5, 1.5)`` so that ``g = m / ‖W + sBA‖`` is far from 1.

Measured: float32 forwards within 8e-6, merged weights and norms within 4e-6 (a few ulps); bf16 with an
fp32 adapter (PEFT's default) bit-identical by default; bf16 with ``peft_compat=True`` bit-identical
for fp32 and bf16 adapters, merge and unmerge.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    TOL_W,
    TOL_Y,
    assert_close,
    assert_compat_bits,
    bf16_ulps,
    build_model,
    check_inplace_and_unmerge,
    in_namespace,
    layer_factory,
    layer_kwargs,
    make_input,
    make_peft,
    n2t,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
)

torch, peft = require_peft()

from peftmath.errors import NotInvertibleError  # noqa: E402
from peftmath.io import load_file, save_file  # noqa: E402
from peftmath.methods import dora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

CASES = {
    "linear": {"lin": ("linear", {})},
    "linear_nobias": {"lin": ("linear", dict(bias=False, in_f=32, out_f=16))},
    "conv1d_transformers": {"attn.c_attn": ("conv1d_t", dict(in_f=24, out_f=40))},
    "embedding": {"emb": ("embedding", {})},
    "conv2d_1x1": {"conv": ("conv2d", dict(k=1))},
    "conv2d_3x3": {"conv": ("conv2d", dict(k=3, stride=2, padding=1))},
    "conv1d": {"conv": ("conv1d", dict(k=3, padding=1))},
}


def _config(layers, **kw):
    return dict(r=4, lora_alpha=12, use_dora=True, target_modules=[n.split(".")[-1] for n in layers], **kw)


def _setup(case, **kw):
    layers = CASES[case]
    return make_peft(layers, _config(layers), **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_magnitude_init_matches_peft(case):
    """PEFT sets ``m = ‖W + s·BA‖`` from the initial factors (here PEFT's own non-zero ones)."""
    pm, ad, state = _setup(case, randomize=False)
    for name in ad.modules:
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        ours = dora.init_magnitude(state[f"{name}.weight"], mod.A, mod.B, scaling=mod.scaling, layer=mod.layer)
        want = t2n(peft_layer(pm, name).lora_magnitude_vector["default"].weight)
        assert ours.shape == want.shape == dora.magnitude_shape(mod.layer)
        assert_close(ours, want, **TOL_W, what=f"{name} magnitude")


@pytest.mark.parametrize("case", list(CASES))
def test_forward_merge_unmerge_match_peft(case):
    pm, ad, state = _setup(case)
    names = ad.modules
    for name in names:
        x = make_input(pm, name)
        ours = ad.forward(name, x, state, **layer_kwargs(pm, name))
        assert_close(ours, peft_forward(pm, name, x), **TOL_Y, what=f"{name} forward")
    records: dict = {}
    ours = ad.merge(state, records=records)
    pm.merge_adapter()
    merged = peft_weights(pm, names)
    for key, want in merged.items():
        assert_close(ours[key], want, **TOL_W, what=f"merge {key}")
    for name in names:
        # the weight norm peftmath records is the one PEFT caches for its unmerge
        cached = t2n(peft_layer(pm, name)._caches["default-weight_norm"]).reshape(-1)
        assert_close(np.asarray(records[name]).reshape(-1), cached, **TOL_W, what=f"{name} weight norm")
        # merged forward == unmerged forward (DoRA does not scale the bias)
        x = make_input(pm, name)
        assert_close(peft_forward(pm, name, x), ad.forward(name, x, state, **layer_kwargs(pm, name)), **TOL_Y,
                     what=f"{name} merged PEFT forward vs unmerged peftmath forward")
    # the in-place path (copy=False: gemm with beta=1, then a row scaling) agrees too, and so do the
    # in-place unmerge and the unmerge of PEFT's merged weights with the recorded norms
    check_inplace_and_unmerge(pm, ad, state, merged, records=records)


@pytest.mark.parametrize("case", ["linear", "conv1d_transformers", "embedding", "conv2d_3x3"])
def test_bf16_merge_within_one_ulp(case):
    """bf16 base, fp32 adapter (PEFT's default autocast): PEFT forms ``(m/n)·(W + ΔW)`` in float32
    and rounds once, as peftmath does. The norms come from different reductions (torch vs NumPy), so
    the float32 results can differ in the last bits and the bf16 results by one ulp, rarely."""
    pm, ad, state = _setup(case, dtype="bfloat16")
    names = ad.modules
    ours = ad.merge(state)
    pm.merge_adapter()
    for key, want in peft_weights(pm, names).items():
        assert ours[key].dtype == want.dtype
        if want.dtype == BF16:
            ulps = bf16_ulps(ours[key], want)
            assert ulps.max() <= 1.0, (key, ulps.max())
            assert np.count_nonzero(ulps) <= max(1, want.size // 100), (key, np.count_nonzero(ulps))


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32_adapter", "bf16_adapter"])
@pytest.mark.parametrize("case", ["linear", "conv1d_transformers", "embedding", "conv2d_3x3"])
def test_bf16_peft_compat_is_bit_identical(case, autocast, namespace):
    """``peft_compat=True`` follows PEFT's DoRA rounding: with a bf16 adapter on a bf16 base every torch
    op rounds to bf16 (ΔW, W + ΔW, its norm, g = m / n, g ⊙ (W + ΔW); unmerge: W' / g, then − ΔW), with
    an fp32 adapter everything is float32 and rounded once. Merge (unsafe and safe) and unmerge (with
    the norm recorded by the compat merge, which PEFT caches) agree to the bit. The default differs
    from PEFT's bf16-adapter numbers by many ulps where W + ΔW cancels (it rounds once).

    The torch namespace runs torch's kernels. NumPy reduces the norm in another order; measured 0
    differing elements here, allowed: 0.1% of the elements, one ulp each.
    """
    pm, ad, state = _setup(case, dtype="bfloat16", autocast_adapter_dtype=autocast)
    names = ad.modules
    ad_x, to_x, to_n = in_namespace(ad, namespace)
    for safe in (False, True):
        state.update(peft_weights(pm, names))  # a bf16 merge / unmerge round trip moves W
        records: dict = {}
        ours = to_n(ad_x.merge(to_x(state), safe=safe, peft_compat=True, records=records))
        pm.merge_adapter(safe_merge=safe)
        merged = peft_weights(pm, names)
        pm.unmerge_adapter()
        unmerged = peft_weights(pm, names)
        back = to_n(ad_x.unmerge(to_x(merged), records=records, peft_compat=True))
        assert_compat_bits(ours, merged, namespace=namespace, what=("merge", safe))
        assert_compat_bits(back, unmerged, namespace=namespace, what=("unmerge", safe))


def test_unmerge_across_processes_needs_the_recorded_norm(tmp_path):
    """Design §3 rule 8: merge in peftmath, save the merged weights and the recorded norms, then
    'restart': a fresh PEFT model over the merged weights cannot unmerge (its norm cache is empty:
    KeyError), while peftmath, given the saved norms, recovers the base weight.
    Without the norms peftmath refuses with NotInvertibleError instead of guessing."""
    layers = {"lin": ("linear", {}), "conv": ("conv2d", dict(k=3, padding=1)), "emb": ("embedding", {})}
    pm, ad, state = make_peft(layers, _config(layers))
    records: dict = {}
    merged = ad.merge(state, records=records)
    # PEFT's own merge in this process agrees, and its unmerge works (the norm is cached in memory)
    pm.merge_adapter()
    for key, want in peft_weights(pm, ad.modules).items():
        assert_close(merged[key], want, **TOL_W, what=key)
    adapter_dir = tmp_path / "adapter"
    pm.save_pretrained(adapter_dir)
    pm.unmerge_adapter()
    # "save, new process": the merged state and the norms go to disk
    save_file(merged, tmp_path / "merged.safetensors")
    save_file({f"{k}.weight_norm": np.asarray(v) for k, v in records.items()}, tmp_path / "norms.safetensors")
    del pm, merged, records
    on_disk = load_file(tmp_path / "merged.safetensors")
    norms = {k[: -len(".weight_norm")]: v for k, v in load_file(tmp_path / "norms.safetensors").items()}

    # PEFT, fresh: base model holding the merged weights, adapter loaded, marked as merged
    fresh = build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=0)
    fresh.load_state_dict({k: n2t(v) for k, v in on_disk.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = peft.PeftModel.from_pretrained(fresh, adapter_dir)
    for name in ad.modules:
        peft_layer(pm2, name).merged_adapters.append("default")
    with pytest.raises(KeyError, match="weight_norm"):
        pm2.unmerge_adapter()

    # peftmath: the recorded norm makes the unmerge exact up to rounding
    back = ad.unmerge(on_disk, records=norms)
    for key in state:
        assert_close(back[key], state[key], **TOL_W, what=f"recovered {key}")
    with pytest.raises(NotInvertibleError, match="weight norm"):
        ad.unmerge(on_disk)
