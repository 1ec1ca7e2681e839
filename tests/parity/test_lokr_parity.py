"""LoKr against PEFT 0.21.2: factorization, delta, forward, merge, unmerge and checkpoints both ways.

Layers: Linear with full / low-rank / decompose_both / decompose_factor factors, Conv1d and Conv2d with
a full w2 (Conv1d: PEFT's kron layout quirk), a low-rank w2 and the effective-conv (lokr_t2) form, a
1×1 conv, a grouped conv, rank/alpha patterns; base models in float32 and bfloat16 (PEFT's default fp32
adapter), and a bf16 adapter with ``peft_compat=True``. PEFT's tensors are redrawn from a NumPy seed.
"""

from __future__ import annotations

import pytest

from tests.parity import lycoris_harness as H
from tests.parity.conftest import peft_layer, require_peft

torch, peft = require_peft()

from peftmath.methods import lokr  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: case -> (layers {name: (kind, keywords)}, LoKrConfig fields, expected tensor names of the first module)
CASES = {
    "linear_full": ({"lin": ("linear", dict(in_f=24, out_f=40))}, dict(r=4, alpha=12), ["lokr_w1", "lokr_w2"]),
    "linear_lowrank": ({"lin": ("linear", dict(in_f=96, out_f=64))}, dict(r=2, alpha=5),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "linear_decompose_both": ({"lin": ("linear", dict(in_f=96, out_f=64))}, dict(r=2, alpha=3, decompose_both=True),
                              ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]),
    "linear_factor": ({"lin": ("linear", dict(in_f=128, out_f=128))}, dict(r=4, alpha=6, decompose_factor=32),
                      ["lokr_w1", "lokr_w2"]),
    "linear_factor_not_dividing": ({"lin": ("linear", dict(in_f=128, out_f=96))},
                                   dict(r=2, alpha=6, decompose_factor=3), ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv1d_full_quirk": ({"c1": ("conv1d", dict(in_ch=8, out_ch=12, k=3, padding=1))}, dict(r=8, alpha=5),
                          ["lokr_w1", "lokr_w2"]),
    "conv1d_lowrank": ({"c1": ("conv1d", dict(in_ch=32, out_ch=48, k=3, stride=2))}, dict(r=2, alpha=5),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv1d_effective": ({"c1": ("conv1d", dict(in_ch=32, out_ch=48, k=3))},
                         dict(r=2, alpha=5, use_effective_conv2d=True), ["lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_full": ({"c2": ("conv2d", dict(in_ch=8, out_ch=12, k=3, padding=1))}, dict(r=8, alpha=5),
                    ["lokr_w1", "lokr_w2"]),
    "conv2d_lowrank": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=3, stride=2, padding=1))}, dict(r=2, alpha=7),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_effective": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=(3, 2), dilation=2))},
                         dict(r=2, alpha=7, use_effective_conv2d=True, decompose_both=True),
                         ["lokr_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_1x1_effective": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=1))},
                             dict(r=2, alpha=5, use_effective_conv2d=True), ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_grouped": ({"g": ("conv2d_grouped", dict(in_ch=32, out_ch=24, k=3, groups=2))}, dict(r=2, alpha=3),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "patterns": ({"blk.0.q": ("linear", dict(in_f=96, out_f=64)), "blk.0.v": ("linear", dict(in_f=96, out_f=64)),
                  "conv": ("conv2d", dict(in_ch=32, out_ch=48, k=3))},
                 dict(r=2, alpha=8, rank_pattern={"v": 16}, alpha_pattern={"conv": 3}),
                 ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
}


def _make(case, dtype="float32", *, autocast=True, seed=1):
    """(peft model, peftmath Adapter from PEFT's own state dict, base state dict)."""
    return H.make(CASES[case][:2], peft.LoKrConfig, "lokr_", dtype, autocast=autocast, seed=seed)


# --------------------------------------------------------------------------------------------------
# delta, forward, merge, unmerge
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_forward_merge_unmerge(case, dtype):
    pm, ad, state = _make(case, dtype)
    for name in ad.modules:
        mod = H.check_delta_forward_merge_unmerge(pm, ad, state, name, dtype)
        if name == ad.modules[0]:
            assert sorted(mod.params) == CASES[case][2]


def test_bf16_adapter_peft_compat():
    """autocast_adapter_dtype=False keeps bf16 adapter tensors; PEFT then rounds every intermediate."""
    pm, ad, state = _make("linear_decompose_both", "bfloat16", autocast=False)
    H.check_bf16_adapter_peft_compat(pm, ad, state, "lin", "lokr_w1_a")


def test_rank_dropout_matches_peft_with_the_same_draws():
    """PEFT in train mode draws torch.rand(1) (module dropout) then torch.rand(out) (rows); replaying
    those draws as ``row_mask`` gives PEFT's training forward (mask divided by its mean only with
    rank_dropout_scale)."""
    pm, ad, state = _make("conv2d_lowrank")
    name = "c2"
    layer = peft_layer(pm, name)

    def forward(x, W, mod, **kw):
        return lokr.forward(x, W, mod.params, scaling=mod.scaling, layer=mod.layer, **kw)

    for p, scale in ((0.3, False), (0.6, True)):
        layer.rank_dropout["default"] = p
        layer.module_dropout["default"] = 0.2
        layer.rank_dropout_scale["default"] = scale
        H.check_train_forward(pm, ad, state, name, forward, seed=321, mean_scaled=scale, what=f"train forward p={p}")


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 0, -2):
            assert lokr.factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    for dim in (768, 1024, 3072, 4096, 4097, 11008):
        assert lokr.factorization(dim) == peft_factorization(dim)


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear_decompose_both", "linear_factor", "conv1d_full_quirk", "conv2d_effective",
                                  "conv1d_effective", "patterns"])
def test_peft_checkpoint_loads_in_peftmath(case, tmp_path):
    pm, _, state = _make(case)
    H.check_peft_checkpoint_loads(pm, state, tmp_path, "LOKR",
                                  ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d",
                                   "init_weights", "rank_dropout", "module_dropout", "decompose_both",
                                   "decompose_factor", "rank_dropout_scale"))


@pytest.mark.parametrize("init", [True, "lycoris"])
@pytest.mark.parametrize("case", ["linear_full", "linear_decompose_both", "linear_factor_not_dividing",
                                  "conv1d_full_quirk", "conv1d_effective", "conv2d_effective", "conv2d_grouped",
                                  "patterns"])
def test_peftmath_checkpoint_loads_in_peft(case, init, tmp_path):
    layers, fields, _ = CASES[case]
    cfg = lokr.LoKrConfig(**fields, target_modules=list(layers), init_weights=init)
    H.check_peftmath_checkpoint_loads(layers, cfg, lokr.LoKrModule, tmp_path, init=False)
