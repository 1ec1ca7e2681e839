"""BOFT parity with Hugging Face PEFT 0.21.2: forward, merge, unmerge (Linear, Conv2d 1x1 and kxk) and
checkpoints both ways.

PEFT on a machine without its CUDA extension forces ``boft_n_butterfly_factor`` to 1. For ``m > 1``
two independent oracles are used: (a) a dense float64 ``M`` built from PEFT's own
``block_butterfly_perm`` / ``perm2mat`` / ``cayley_batch``, and (b) PEFT's real ``m > 1`` code path,
with the CUDA extension replaced by a torch ``block_diag`` (``FastBlockDiag`` only assembles the block
diagonal; everything else — validation, permutations, products, checkpoint shapes — is PEFT's).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_merge_as_peft,
    check_unmerge_as_peft,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    to_adapter,
)

torch, peft = require_peft()

from peft.tuners.boft import layer as boft_layer  # noqa: E402
from torch import nn  # noqa: E402

import peftmath as pm  # noqa: E402
from peftmath.methods import boft  # noqa: E402

MODULES = ("lin", "conv1", "conv3")
CONV_KW = {"conv1": dict(stride=1, padding=0), "conv3": dict(stride=2, padding=1)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)
        self.conv1 = nn.Conv2d(8, 3, 1)
        self.conv3 = nn.Conv2d(4, 5, 2, stride=2, padding=1)  # n = 4·2·2 = 16


def base_model(seed=0):
    model = Tiny()
    redraw(model, seed=seed)  # every weight and bias N(0, 1)
    return model


class _TorchBlockDiag:
    """Stand-in for PEFT's CUDA ``FastBlockDiag``: (N, D, H, H) -> (N, D·H, D·H)."""

    @staticmethod
    def apply(x):
        return torch.stack([torch.block_diag(*torch.unbind(level)) for level in x])


@pytest.fixture
def fake_cuda_extension(monkeypatch):
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(boft_layer, "FastBlockDiag", _TorchBlockDiag)


def make_peft(seed=1, base=None, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.BOFTConfig(target_modules=list(MODULES), **{"boft_block_size": 4, **config})
        pmodel = peft.get_peft_model(base if base is not None else base_model(), cfg)
    redraw(pmodel, {"boft_R": (0.0, 0.2), "boft_s": (1.0, 0.2)}, seed=seed)
    return pmodel


def inputs(seed=5):
    rng = np.random.default_rng(seed)
    return {"lin": rng.standard_normal((3, 2, 16)).astype(np.float32),
            "conv1": rng.standard_normal((2, 8, 4, 3)).astype(np.float32),
            "conv3": rng.standard_normal((2, 4, 5, 6)).astype(np.float32)}


def check_layers(pmodel, ad, tag):
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            got = ad.forward(name, xs[name], state, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{tag} {name} forward")
            errors[f"{name} forward"] = float(np.abs(got - want).max())
        peft_merged = check_merge_as_peft(ad, pmodel, state, MODULES, tag)
        merged = ad.merge(state)
        for name in MODULES:  # BOFT leaves the bias alone (PEFT too): bit for bit
            np.testing.assert_array_equal(merged[f"{name}.bias"], state[f"{name}.bias"])
        check_unmerge_as_peft(ad, pmodel, state, peft_merged, MODULES, tag)
    return errors


@pytest.mark.parametrize("config", [dict(), dict(boft_block_size=0, boft_block_num=2), dict(boft_block_size=8)])
def test_forward_merge_unmerge_m1(config):
    pmodel = make_peft(**config)
    check_layers(pmodel, to_adapter(pmodel), str(config))


@pytest.mark.parametrize("config", [dict(boft_block_size=2, boft_n_butterfly_factor=3),
                                    dict(boft_block_size=4, boft_n_butterfly_factor=2),
                                    dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3)])
def test_butterfly_m_gt_1_against_peft_code_path(config, fake_cuda_extension):
    pmodel = make_peft(**config)
    assert peft_layer(pmodel, "lin").boft_R["default"].shape[0] == config["boft_n_butterfly_factor"]
    check_layers(pmodel, to_adapter(pmodel), str(config))


@pytest.mark.parametrize("n,b,m", [(16, 2, 3), (16, 4, 2), (32, 4, 3), (24, 2, 2)])
def test_butterfly_against_dense_peft_helpers(n, b, m):
    """M from PEFT's own permutation and Cayley helpers, dense, in float64."""
    L = boft_layer.BOFTLayer
    nb = n // b
    rng = np.random.default_rng(n + b + m)
    Q = rng.normal(0.0, 0.3, (m, nb, b, b))
    Qt = torch.from_numpy(Q)
    blocks = L.cayley_batch(None, Qt.reshape(m * nb, b, b)).reshape(m, nb, b, b)
    M = torch.eye(n, dtype=torch.float64)
    for i in range(m):
        perm = L.block_butterfly_perm(None, n, int(nb / 2**i), int(b / 2), m - 1)
        assert list(perm.tolist()) == boft.butterfly_perm(n, int(nb / 2**i), b // 2, m - 1)
        P = L.perm2mat(None, perm).double()
        M = P @ torch.block_diag(*blocks[i]) @ P.T @ M
    M = M.numpy()
    np.testing.assert_allclose(boft.dense_rotation(boft.cayley(Q)), M, atol=1e-13)
    W = rng.standard_normal((5, n))
    s = rng.normal(1, 0.2, (5, 1))
    merged = boft.merge(W, Q, s)
    np.testing.assert_allclose(merged, (M @ W.T).T * s, atol=1e-12)
    np.testing.assert_allclose(boft.unmerge(merged, Q, s), W, atol=1e-12)
    x = rng.standard_normal((3, n))
    np.testing.assert_allclose(boft.forward(x, W, Q, s), (x @ M @ W.T) * s.T, atol=1e-12)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert set(ad.params["conv3"]) == {"boft_R", "boft_s"} and ad.params["conv3"]["boft_s"].shape == (1, 5)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            np.testing.assert_allclose(ad.forward(name, xs[name], state, **CONV_KW.get(name, {})), want, atol=1e-5)
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", xs, atol=1e-6)


def test_butterfly_checkpoint_saved_with_extension_loads(tmp_path, fake_cuda_extension):
    """An m=3 checkpoint (as PEFT writes it with its CUDA extension) loads and evaluates in peftmath."""
    pmodel = make_peft(boft_block_size=2, boft_n_butterfly_factor=3)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.params["lin"]["boft_R"].shape == (3, 8, 2, 2)
    check_layers(pmodel, ad, "m=3 checkpoint")


def test_cpu_peft_forces_one_level_and_peftmath_reads_it(tmp_path):
    """Without the extension PEFT stores one level whatever the config says; peftmath accepts that file."""
    pmodel = make_peft(boft_block_size=2, boft_n_butterfly_factor=3)
    assert peft_layer(pmodel, "lin").boft_R["default"].shape[0] == 1
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.config.boft_n_butterfly_factor == 3
    with pytest.warns(UserWarning, match="butterfly"):
        assert ad.module("lin", weight_shape=(6, 16)).m == 1
    check_layers(pmodel, ad, "cpu m forced")


@pytest.mark.parametrize("config", [dict(boft_block_size=3), dict(boft_block_size=4, boft_n_butterfly_factor=4),
                                    dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=4),
                                    dict(boft_block_size=0, boft_block_num=16, boft_n_butterfly_factor=2)])
def test_rejections_agree_with_peft(config, fake_cuda_extension):
    """Settings PEFT rejects (with its extension present) are rejected by peftmath too, and vice versa."""
    n = 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft.get_peft_model(nn.Sequential(nn.Linear(n, 4)), peft.BOFTConfig(target_modules=["0"], **config))
            peft_ok = True
        except ValueError:
            peft_ok = False
    kw = {"boft_block_size": config.get("boft_block_size", 4), **config}
    try:
        boft.butterfly_layout(n, **{k: v for k, v in kw.items() if k.startswith("boft_")})
        ours_ok = True
    except pm.errors.ConfigError:
        ours_ok = False
    assert ours_ok == peft_ok
