"""inspect's singular values from the factors' QR core (peftmath._linalg.low_rank_singular_values): equal to
the dense float64 SVD of ΔW (issue #20, item 5a)."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath._linalg import low_rank_singular_values
from peftmath.errors import ShapeError
from peftmath.inspect import inspect_adapter, low_rank_factors
from peftmath.layers import Layer
from peftmath.methods.lora import LoraConfig, LoraModule


def dense_sv(B: np.ndarray, A: np.ndarray, s: float) -> np.ndarray:
    """The reference: SVD of the product formed in float64."""
    return np.linalg.svd(s * (B.astype(np.float64) @ A.astype(np.float64)), compute_uv=False)


def assert_same_spectrum(S: np.ndarray, ref: np.ndarray, rank: int) -> None:
    """Same length; the ``rank`` leading values agree to 1e-10 relative; every value within 1e-12·σ₁ (the
    dense SVD's own rounding of the trailing zeros is about eps·σ₁)."""
    assert S.shape == ref.shape and S.dtype == np.float64
    assert np.all(np.diff(S) <= 0)
    top = ref[0] if ref.size and ref[0] > 0 else 1.0
    np.testing.assert_allclose(S[:rank], ref[:rank], rtol=1e-10, atol=1e-12 * top)
    np.testing.assert_allclose(S, ref, rtol=0, atol=1e-12 * top)


@pytest.mark.parametrize("m,n,r", [(40, 30, 4), (30, 40, 4), (64, 64, 1), (17, 5, 8), (5, 17, 8), (6, 6, 6),
                                   (3, 50, 20)])
def test_core_svd_equals_dense_svd(m, n, r):
    """Random factors, m > n and m < n, and r > min(m, n) (the core is then min(m, r) x min(n, r))."""
    rng = np.random.default_rng(m * 1000 + n * 10 + r)
    B, A = rng.standard_normal((m, r)), rng.standard_normal((r, n))
    s = 0.37
    assert_same_spectrum(low_rank_singular_values(B, A, s), dense_sv(B, A, s), min(m, n, r))


def test_rank_deficient_and_zero_factors():
    rng = np.random.default_rng(3)
    B = rng.standard_normal((50, 6))
    B[:, 3:] = B[:, :3] @ rng.standard_normal((3, 3))  # rank 3
    A = rng.standard_normal((6, 40))
    S = low_rank_singular_values(B, A, 2.0)
    assert_same_spectrum(S, dense_sv(B, A, 2.0), 3)
    assert np.all(S[3:] <= 1e-12 * S[0])
    # LoRA's default init: B = 0, a zero delta
    assert np.array_equal(low_rank_singular_values(np.zeros((8, 4)), A[:4], 1.0), np.zeros(8))
    # a wide spread of singular values: the small ones keep their relative accuracy
    U, _ = np.linalg.qr(rng.standard_normal((60, 5)))
    V, _ = np.linalg.qr(rng.standard_normal((45, 5)))
    sig = np.array([1e3, 1.0, 1e-2, 1e-4, 1e-6])
    S = low_rank_singular_values(U * sig, V.T, 1.0)
    np.testing.assert_allclose(S[:5], sig, rtol=1e-8)


def test_layouts_and_dtypes_of_the_factors():
    """Fortran order, strided views, float32 and bfloat16 factors: the values of the float64 product."""
    rng = np.random.default_rng(5)
    B = np.asfortranarray(rng.standard_normal((30, 4)))
    A = rng.standard_normal((8, 25))[::2]  # a strided view, (4, 25)
    assert_same_spectrum(low_rank_singular_values(B, A, 1.5), dense_sv(B, A, 1.5), 4)
    B32, A32 = B.astype(np.float32), A.astype(np.float32)
    assert_same_spectrum(low_rank_singular_values(B32, A32, 1.5), dense_sv(B32, A32, 1.5), 4)
    bf16 = pm.io.safetensors.DTYPES["BF16"]
    Bh, Ah = B.astype(bf16), A.astype(bf16)
    assert_same_spectrum(low_rank_singular_values(Bh, Ah, 1.5), dense_sv(Bh, Ah, 1.5), 4)


def test_mismatched_factors_are_refused():
    with pytest.raises(ShapeError, match=r"B \(5, 3\) and A \(4, 6\)"):
        low_rank_singular_values(np.ones((5, 3)), np.ones((4, 6)))


def _write(tmp_path, modules: dict, cfg: LoraConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {}
    for j, (m, (shape, kind)) in enumerate(modules.items()):
        p, _ = LoraModule.initialize(m, cfg, Layer.of(shape, kind), seed=seed + j)
        p = {k: np.asarray(v) for k, v in p.items()}
        for k in p:  # trained-looking factors: B non-zero too
            if "lora_B" in k or "lora_embedding_B" in k:
                p[k] = rng.standard_normal(p[k].shape).astype(p[k].dtype)
        params[m] = p
    ad = pm.Adapter(cfg, params, layer_kinds={m: k for m, (_, k) in modules.items() if k})
    pm.save_adapter(ad, tmp_path / "ad")
    return tmp_path / "ad", params


MODULES = {"q_proj": ((24, 16), "Linear"), "embed_tokens": ((40, 16), "Embedding"),
           "conv": ((12, 6, 3, 3), "Conv2d"), "c_attn": ((16, 48), "Conv1D"), "tiny": ((3, 2), "Linear")}


def test_inspect_uses_the_factors_and_matches_the_dense_svd(tmp_path, monkeypatch):
    """Every LoRA module (Linear, Embedding, Conv2d, Conv1D, a rank above min(m, n)): the top singular values
    and ‖ΔW‖_F are the dense float64 SVD's of s·B A from the checkpoint's own arrays; no dense ΔW is formed."""
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=sorted(MODULES), init_lora_weights="gaussian")
    path, params = _write(tmp_path, MODULES, cfg)

    def no_dense(self, **kw):
        raise AssertionError("inspect formed the dense delta of a LoRA module")

    monkeypatch.setattr(LoraModule, "delta_weight", no_dense)
    info = inspect_adapter(path, top=5)
    s = 6 / 4
    by_name = {e["module"]: e for e in info["modules"]}
    for m, p in params.items():
        A = p.get("lora_A.weight", p.get("lora_embedding_A"))
        B = p.get("lora_B.weight", p.get("lora_embedding_B"))
        ref = dense_sv(B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1), s)
        e = by_name[m]
        assert e["singular_values_exact"] is True
        np.testing.assert_allclose(e["top_singular_values"], ref[:5], rtol=1e-10, atol=1e-12 * ref[0])
        np.testing.assert_allclose(e["delta_norm"], np.sqrt(np.sum(ref**2)), rtol=1e-12)
    assert len(by_name["tiny"]["top_singular_values"]) == 2  # min(3, 2) values, r = 4 above it


def test_dora_keeps_the_dense_delta(tmp_path):
    """DoRA's ΔW is not the low-rank product: inspect takes the SVD of the module's delta weight."""
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="gaussian", use_dora=True)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((10, 8)).astype(np.float32)
    p, _ = LoraModule.initialize("q_proj", cfg, Layer.of(W.shape), weight=W, seed=0)
    p = {k: np.asarray(v) for k, v in p.items()}
    p["lora_B.weight"] = rng.standard_normal(p["lora_B.weight"].shape).astype(np.float32)
    ad = pm.Adapter(cfg, {"q_proj": p})
    mod = ad.module("q_proj")
    assert low_rank_factors(mod) is None
    pm.save_adapter(ad, tmp_path / "d")
    e = inspect_adapter(tmp_path / "d", top=3)["modules"][0]
    ref = np.linalg.svd(np.asarray(mod.delta_weight(), dtype=np.float64), compute_uv=False)
    np.testing.assert_allclose(e["top_singular_values"], ref[:3], rtol=1e-12)
