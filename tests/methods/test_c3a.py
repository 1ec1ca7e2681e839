"""C3A's math against independent float64 computations: the circulant blocks built entry by entry with
``np.roll``, the FFT forward against the dense product, merge / unmerge round trips on several layouts
and dtypes, initialisation bounds, the pattern rule and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import c3a
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced


def circulant_reference(K: np.ndarray) -> np.ndarray:
    """``ΔW`` in float64, block by block: row ``k`` of block ``(i, j)`` is ``K[i, j]`` rolled right by ``k``."""
    m, n, b = K.shape
    out = np.zeros((m * b, n * b))
    for i in range(m):
        for j in range(n):
            block = np.stack([np.roll(K[i, j].astype(np.float64), k) for k in range(b)])
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = block
    return out / (n * b)


def _module(K, dtype=np.float32):
    m, n, b = K.shape
    return c3a.C3AModule("blk", c3a.C3AConfig(block_size=b), {"c3a_kernel": K.astype(dtype)},
                         Layer(LayerKind.LINEAR, (m * b, n * b)))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 4), (3, 2, 5), (1, 4, 8), (4, 1, 3)])
def test_delta_weight_is_the_circulant(shape):
    K = np.random.default_rng(sum(shape)).standard_normal(shape)
    np.testing.assert_allclose(c3a.delta_weight(K), circulant_reference(K), rtol=1e-15, atol=0)
    d32 = c3a.delta_weight(K.astype(np.float32))
    assert d32.dtype == np.float32
    np.testing.assert_allclose(d32, circulant_reference(K.astype(np.float32)), rtol=2**-23)


@pytest.mark.parametrize("shape", [(2, 3, 4), (3, 2, 5), (1, 2, 16), (2, 2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fft_forward_equals_dense_product(shape, dtype):
    rng = np.random.default_rng(7)
    K = rng.standard_normal(shape).astype(dtype)
    m, n, b = shape
    x = rng.standard_normal((2, 3, n * b)).astype(dtype)
    want = x.astype(np.float64) @ circulant_reference(K).T
    got = c3a.block_circular(x, K)
    assert got.dtype == dtype and got.shape == (2, 3, m * b)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


#: memory layouts of the base weight (the in-place contract's permuted view and strided slice)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_merge_unmerge(layout, dtype):
    rng = np.random.default_rng(3)
    K = rng.standard_normal((3, 2, 4))
    mod = _module(K, dtype)
    W = LAYOUTS[layout](rng.standard_normal((12, 8)).astype(dtype))
    bias = rng.standard_normal(12).astype(dtype)
    x = rng.standard_normal((5, 8)).astype(dtype)
    dw = circulant_reference(K.astype(dtype))
    want = x.astype(np.float64) @ (W.astype(np.float64) + dw).T + bias
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(mod.forward(x, W, bias), want, atol=64 * eps * np.abs(want).max())
    res = mod.merge(W, bias)
    merged = res.weight
    assert res.bias is bias
    np.testing.assert_allclose(merged, W.astype(np.float64) + dw, atol=2 * eps * 4)
    back = mod.unmerge(merged).weight
    np.testing.assert_allclose(back, W, atol=4 * eps * 4)
    before = W.copy()
    inplace = LAYOUTS[layout](W.copy())
    out = mod.merge(inplace, copy=False).weight
    assert out is inplace
    np.testing.assert_array_equal(inplace, merged)
    np.testing.assert_array_equal(W, before)  # copy=True left the input alone


def test_torch_and_read_only():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    K = rng.standard_normal((2, 2, 3)).astype(np.float32)
    W = rng.standard_normal((6, 6)).astype(np.float32)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    ref = _module(K)
    modt = c3a.C3AModule("blk", c3a.C3AConfig(block_size=3), {"c3a_kernel": torch.from_numpy(K)},
                         Layer(LayerKind.LINEAR, (6, 6)))
    np.testing.assert_allclose(modt.forward(torch.from_numpy(x), torch.from_numpy(W)).numpy(), ref.forward(x, W),
                               atol=1e-6)
    np.testing.assert_allclose(modt.merge(torch.from_numpy(W)).weight.numpy(), ref.merge(W).weight, atol=1e-7)
    ro = W.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError):
        ref.merge(ro, copy=False)
    np.testing.assert_array_equal(ref.merge(ro).weight, ref.merge(W).weight)


def test_bfloat16_peft_compat_rounds_like_peft():
    """``peft_compat``: C(K) rounded to the weight's dtype, divided by ``in`` there, then added (emulated here
    with ml_dtypes' bfloat16); the default rounds the float32 sum once."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(5)
    K = rng.standard_normal((2, 2, 4)).astype(np.float32)
    W = rng.standard_normal((8, 8)).astype(bf16)
    mod = _module(K)
    circ = (circulant_reference(K) * 8).astype(np.float32).astype(bf16)
    dw = (circ.astype(np.float32) / np.float32(8)).astype(bf16)
    want = (W.astype(np.float32) + dw.astype(np.float32)).astype(bf16)
    got = mod.merge(W, peft_compat=True).weight
    assert got.dtype == bf16
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    once = (W.astype(np.float64) + circulant_reference(K)).astype(np.float32).astype(bf16)
    np.testing.assert_array_equal(mod.merge(W).weight.astype(np.float32), once.astype(np.float32))


@pytest.mark.parametrize("init,bound", [("xavier_uniform", math.sqrt(6 / 28)), (False, math.sqrt(6 / 28)),
                                        ("kaiming_uniform", math.sqrt(1 / 16)), (True, 0.0)])
def test_initialisation(init, bound):
    k = c3a.init_weights(12, 16, 4, init_weights=init, seed=0)
    assert k.shape == (3, 4, 4) and k.dtype == np.float32
    assert np.abs(k).max() <= bound
    if bound:
        assert np.abs(k).max() > 0.8 * bound and abs(float(k.mean())) < 0.2 * bound
    g = c3a.init_weights(12, 16, 4, init_weights="gaussian", seed=1)
    assert 0.5 < float(g.std()) < 1.5


def test_pattern_rule_and_config():
    cfg = c3a.C3AConfig(block_size=8, block_size_pattern={"lin0": 5, "q": 2})
    assert c3a.block_size_for(cfg, "lin0") == 5  # PEFT falls back to the full name as a key
    assert c3a.block_size_for(cfg, "a.b.q") == 2 and c3a.block_size_for(cfg, "aq") == 8
    assert "exclude_modules" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="exclude_modules"):
        c3a.C3AConfig(exclude_modules=["x"]).validate()
    with pytest.raises(ConfigError, match="init_weights"):
        c3a.C3AConfig(init_weights="orthogonal").validate()
    with pytest.raises(ConfigError, match="block_size"):
        c3a.C3AConfig(block_size=0).validate()


def test_refusals():
    K = np.zeros((2, 2, 3), dtype=np.float32)
    with pytest.raises(ShapeError, match="block_size=5"):
        c3a.kernel_shape(10, 12, 5)
    with pytest.raises(ShapeError, match="does not fit"):
        c3a.C3AModule("m", c3a.C3AConfig(block_size=3), {"c3a_kernel": K}, Layer(LayerKind.LINEAR, (6, 9)))
    with pytest.raises(UnsupportedError):
        c3a.C3AModule("m", c3a.C3AConfig(block_size=3), {"c3a_kernel": K}, Layer(LayerKind.EMBEDDING, (6, 6)))
    with pytest.raises(ShapeError, match="unexpected"):
        c3a.C3AModule("m", c3a.C3AConfig(block_size=3), {"c3a_kernel": K, "x": K}, Layer(LayerKind.LINEAR, (6, 6)))
    with pytest.raises(ShapeError, match="block_size"):
        c3a.C3AModule.initialize("m", c3a.C3AConfig(block_size=4), Layer(LayerKind.LINEAR, (6, 8)))


def test_adapter_end_to_end(tmp_path):
    """create_adapter -> save -> load: the pattern picks each module's block size, the merge survives the
    checkpoint bit for bit, and the trainable count is the kernels' size."""
    cfg = c3a.C3AConfig(target_modules=["a", "b"], block_size=4, block_size_pattern={"b": 2})
    state = {"a.weight": np.ones((8, 12), np.float32), "b.weight": np.zeros((6, 4), np.float32)}
    ad = pm.create_adapter(state, cfg, seed=0)
    assert ad.params["a"]["c3a_kernel"].shape == (2, 3, 4) and ad.params["b"]["c3a_kernel"].shape == (3, 2, 2)
    merged = ad.merge(state)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "c3a"))
    for key in state:
        np.testing.assert_array_equal(again.merge(state)[key], merged[key])
        assert np.abs(merged[key] - state[key]).max() > 0  # PEFT's default init is not a no-op
    assert ad.num_trainable_parameters() == 8 * 12 // 4 + 6 * 4 // 2
