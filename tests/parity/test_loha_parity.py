"""LoHa against PEFT 0.21.2: delta, forward, merge, unmerge and checkpoints both ways.

Layers: Linear, Conv1d and Conv2d in the matrix form and the effective-conv (CP) form, a 1×1 conv
(PEFT drops the CP form there), a grouped conv, rank/alpha patterns; base models in float32 and
bfloat16 (PEFT's default fp32 adapter), and a bf16 adapter (``autocast_adapter_dtype=False``) with
``peft_compat=True``. PEFT's tensors are redrawn from a NumPy seed (non-zero ΔW).
"""

from __future__ import annotations

import pytest

from tests.parity import lycoris_harness as H
from tests.parity.conftest import peft_layer, require_peft

torch, peft = require_peft()

from peftmath.methods import loha  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: case -> (layers {name: (kind, keywords)}, LoHaConfig fields)
CASES = {
    "linear": ({"lin": ("linear", dict(in_f=24, out_f=40))}, dict(r=4, alpha=12)),
    "conv1d": ({"c1": ("conv1d", dict(in_ch=6, out_ch=10, k=3, padding=1))}, dict(r=3, alpha=5)),
    "conv1d_effective": ({"c1": ("conv1d", dict(in_ch=6, out_ch=10, k=3, stride=2))},
                         dict(r=3, alpha=5, use_effective_conv2d=True)),
    "conv2d": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=3, stride=2, padding=1))}, dict(r=3, alpha=5)),
    "conv2d_effective": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=3, padding=1, dilation=2))},
                         dict(r=3, alpha=7, use_effective_conv2d=True)),
    "conv2d_1x1_effective": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=1))},
                             dict(r=3, alpha=5, use_effective_conv2d=True)),
    "conv2d_grouped": ({"g": ("conv2d_grouped", dict(in_ch=8, out_ch=12, k=3, groups=2))},
                       dict(r=2, alpha=3, use_effective_conv2d=True)),
    "patterns": ({"blk.0.q": ("linear", {}), "blk.0.v": ("linear", {}), "blk.1.q": ("linear", {}),
                  "conv": ("conv2d", dict(k=3))},
                 dict(r=4, alpha=8, rank_pattern={r"blk\.1\.q": 2, "conv": 5}, alpha_pattern={"v": 3})),
}


def _make(case, dtype="float32", *, autocast=True, seed=1):
    """(peft model, peftmath Adapter from PEFT's own state dict, base state dict)."""
    return H.make(CASES[case], peft.LoHaConfig, "hada_", dtype, autocast=autocast, seed=seed)


# --------------------------------------------------------------------------------------------------
# delta, forward, merge, unmerge
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_forward_merge_unmerge(case, dtype):
    pm, ad, state = _make(case, dtype)
    for name in ad.modules:
        mod = H.check_delta_forward_merge_unmerge(pm, ad, state, name, dtype)
        want_cp = case in ("conv1d_effective", "conv2d_effective", "conv2d_grouped")
        assert ("hada_t1" in mod.params) == want_cp, sorted(mod.params)


def test_bf16_adapter_peft_compat():
    """autocast_adapter_dtype=False keeps bf16 adapter tensors; PEFT then rounds every intermediate."""
    pm, ad, state = _make("linear", "bfloat16", autocast=False)
    H.check_bf16_adapter_peft_compat(pm, ad, state, "lin", "hada_w1_a")


def test_rank_dropout_matches_peft_with_the_same_draws():
    """PEFT in train mode draws torch.rand(1) (module dropout) then torch.rand(out) (rows); replaying
    those draws as ``row_mask`` gives PEFT's training forward."""
    pm, ad, state = _make("conv2d")
    name = "c2"
    layer = peft_layer(pm, name)

    def forward(x, W, mod, **kw):
        return loha.forward(x, W, mod.w1_a, mod.w1_b, mod.w2_a, mod.w2_b, scaling=mod.scaling, layer=mod.layer, **kw)

    for p in (0.3, 0.6):
        layer.rank_dropout["default"] = p
        layer.module_dropout["default"] = 0.2
        H.check_train_forward(pm, ad, state, name, forward, seed=123, mean_scaled=True, what=f"train forward p={p}")


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear", "conv2d_effective", "conv1d_effective", "patterns"])
def test_peft_checkpoint_loads_in_peftmath(case, tmp_path):
    pm, _, state = _make(case)
    H.check_peft_checkpoint_loads(pm, state, tmp_path, "LOHA",
                                  ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d",
                                   "init_weights", "rank_dropout", "module_dropout"))


@pytest.mark.parametrize("case", ["linear", "conv1d", "conv1d_effective", "conv2d_effective", "conv2d_grouped",
                                  "patterns"])
def test_peftmath_checkpoint_loads_in_peft(case, tmp_path):
    layers, fields = CASES[case]
    cfg = loha.LoHaConfig(**fields, target_modules=list(layers), init_weights=False)
    H.check_peftmath_checkpoint_loads(layers, cfg, loha.LoHaModule, tmp_path)
