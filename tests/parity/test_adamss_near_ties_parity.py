"""AdaMSS's near-tie check against PEFT 0.21.2 (specs/adamss.md, "Near ties"): the bound ``δ`` on the difference
between PEFT's float32 left singular vectors and peftmath's recomputation from ``adamss_newB`` holds on PEFT's own
SVDs, and a well-separated layer passes the check with PEFT's partition and PEFT's merge."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import load_peft_checkpoint, require_peft, t2n

torch, peft = require_peft()
pytest.importorskip("sklearn")

from peft.tuners.adamss.utils import slice_pca  # noqa: E402

from peftmath.methods import adamss  # noqa: E402


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(10, 20, True, 8), (20, 2, True, 8), (16, 40, False, 6), (12, 12, False, 5),
                                   (7, 30, True, 100), (64, 48, False, 16), (48, 64, True, 16)])
def test_the_bound_holds_on_pefts_svd(seed, shape):
    """‖U_PEFT − U‖_F ≤ δ = row_error(...) (columns matched in sign), with room: the derivation's constant is not
    tight, the test asserts at least 2x."""
    i, o, bias, r = shape
    torch.manual_seed(seed)
    lin = torch.nn.Linear(i, o, bias=bias)
    W, b = t2n(lin.weight), (t2n(lin.bias) if bias else None)
    Wb = np.concatenate([W, b[:, None]], axis=1) if bias else W
    VVT, UU = slice_pca(torch.from_numpy(Wb)[None, None], r, "cpu", torch.float32, random_seed=0)
    P, theirs = VVT[0, 0].numpy(), UU[0, 0].numpy().astype(np.float64)
    U, amp, _ = adamss._left_and_amplification(W, b, P, where="lin")
    U = np.asarray(U, dtype=np.float64)
    U *= np.sign(np.sum(U * theirs, axis=0))
    delta = adamss.row_error(o, Wb.shape[1], amp)
    assert np.linalg.norm(U - theirs) <= delta / 2


def test_a_well_separated_layer_passes_and_matches_peft(tmp_path):
    """Output rows drawn around 4 well-separated directions (r = 4: the top singular values are well apart from the
    noise): the partition passes the margin check, is PEFT's (seg_result), and the merge is PEFT's."""
    rng = np.random.default_rng(0)
    out, inn, k = 24, 32, 4
    protos = rng.standard_normal((k, inn))
    W = (protos[np.arange(out) % k] * rng.uniform(0.5, 1.5, (out, 1)) + 0.05 * rng.standard_normal((out, inn)))
    lin = torch.nn.Linear(inn, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.astype(np.float32)))
    model = torch.nn.Sequential()
    model.add_module("lin", lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.AdamssConfig(target_modules=["lin"], r=k, num_subspaces=k,
                                                          init_weights=None))
    layer = pm.base_model.model.lin
    W32, P = t2n(lin.weight), t2n(layer.adamss_newB["default"])
    U, amp, _ = adamss._left_and_amplification(W32, None, P, where="lin")
    delta = adamss.row_error(out, inn, amp)
    labels, tie = adamss.kmeans_margins(np.asarray(U, dtype=np.float32), k, delta)
    assert tie.margin > 10 * tie.bound  # far from any tie
    np.testing.assert_array_equal(adamss.partition(W32, None, P, k), labels)
    for j, rows in layer.seg_result["default"].items():
        np.testing.assert_array_equal(np.flatnonzero(labels == j), rows.numpy())
    ad = load_peft_checkpoint(pm.eval(), tmp_path)
    merged = ad.merge({"lin.weight": W32})["lin.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    np.testing.assert_allclose(merged, t2n(layer.base_layer.weight), atol=1e-6, rtol=1e-6)
