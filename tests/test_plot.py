"""peftmath.plot: the numbers against independent computations; the pictures when matplotlib is there."""

import sys

import numpy as np
import pytest

import peftmath as pm
from peftmath import plot
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods.oft import OFTConfig


def _base(rng):
    return {"m.q.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "m.c.weight": rng.standard_normal((6, 4, 3, 3)).astype(np.float32)}


def _lora(base, r=2, alpha=6):
    cfg = pm.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "c"], init_lora_weights=False)
    return pm.create_adapter(base, cfg, seed=0)


def test_lora_spectra_are_those_of_s_BA_in_float64():
    base = _base(np.random.default_rng(0))
    ad = _lora(base, r=2, alpha=6)
    s = 6 / 2
    got = plot.spectra(ad)
    for name in ("m.q", "m.c"):
        A = np.asarray(ad.params[name]["lora_A.weight"], np.float64)
        B = np.asarray(ad.params[name]["lora_B.weight"], np.float64)
        D = s * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)          # (out, in·∏k)
        ref = np.linalg.svd(D, compute_uv=False)
        np.testing.assert_allclose(got[name]["singular_values"], ref, rtol=1e-5, atol=1e-6)
        assert got[name]["shape"] == D.shape
        assert got[name]["norm"] == pytest.approx(np.linalg.norm(D), rel=1e-5)
        assert np.count_nonzero(got[name]["singular_values"] > 1e-5 * ref[0]) == 2   # rank r


def test_with_base_the_change_is_merge_minus_w_and_agrees_with_the_delta():
    base = _base(np.random.default_rng(1))
    ad = _lora(base)
    without, with_base = plot.spectra(ad), plot.spectra(ad, base)
    for name in without:
        np.testing.assert_allclose(with_base[name]["singular_values"], without[name]["singular_values"],
                                   rtol=1e-5, atol=1e-6)


def test_a_rotation_needs_the_base_and_then_gives_w_r_minus_w():
    rng = np.random.default_rng(2)
    base = _base(rng)
    ad = pm.create_adapter({"m.q.weight": base["m.q.weight"]},
                           OFTConfig(r=0, oft_block_size=4, target_modules=["q"], init_weights=False,
                                     use_cayley_neumann=False), seed=0)
    with pytest.raises(UnsupportedError, match="pass the base weights"):
        plot.spectra(ad)
    got = plot.spectra(ad, base)["m.q"]
    W = base["m.q.weight"].astype(np.float64)
    D = np.asarray(ad.merge({"m.q.weight": W})["m.q.weight"]) - W
    np.testing.assert_allclose(got["singular_values"], np.linalg.svd(D, compute_uv=False), rtol=1e-9, atol=1e-12)
    # the exact Cayley map is orthogonal, so the rows of W + D = W R keep their norms (PEFT's default
    # Neumann series is only close to orthogonal: 1e-3 here)
    np.testing.assert_allclose(np.linalg.norm(W + D, axis=1), np.linalg.norm(W, axis=1), rtol=1e-5)


def test_unknown_module_and_inputs_unchanged():
    base = _base(np.random.default_rng(3))
    ad = _lora(base)
    keep = {k: v.copy() for k, v in base.items()}
    with pytest.raises(ConfigError, match="'m.nope' is not a module"):
        plot.spectra(ad, modules=["m.nope"])
    plot.spectra(ad, base)
    for k in base:
        assert np.array_equal(base[k], keep[k]) and base[k].dtype == np.float32


def test_energy_curve_is_eckart_young():
    rng = np.random.default_rng(4)
    D = rng.standard_normal((12, 7)) @ np.diag([5, 3, 2, 1, 0.5, 0.1, 0.01])
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    e = plot.energy_curve(rng.permutation(S))                  # order does not matter
    total = np.linalg.norm(D) ** 2
    for k in range(1, len(S) + 1):
        Dk = (U[:, :k] * S[:k]) @ Vh[:k]
        assert e[k - 1] == pytest.approx(1 - np.linalg.norm(D - Dk) ** 2 / total, abs=1e-12)
    assert np.all(np.diff(e) >= 0) and e[-1] == 1.0
    np.testing.assert_array_equal(plot.energy_curve(np.zeros(3)), np.ones(3))
    with pytest.raises(ConfigError, match="NaN"):
        plot.energy_curve([1.0, np.nan])
    with pytest.raises(ShapeError):
        plot.energy_curve([])


def test_missing_matplotlib_is_a_clear_peftmath_error(monkeypatch, tmp_path):
    ad = _lora(_base(np.random.default_rng(5)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    with pytest.raises(UnsupportedError, match=r"pip install 'peftmath\[plot\]'"):
        plot.plot_spectra(ad, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_plot_files(tmp_path):
    pytest.importorskip("matplotlib")
    base = _base(np.random.default_rng(6))
    ad = _lora(base)
    data = plot.plot_spectra(ad, tmp_path / "s.png", base=base)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data) == {"m.c", "m.q"}
    curves = plot.plot_energy_curve({k: v["singular_values"] for k, v in data.items()}, tmp_path / "e.svg",
                                    rank=2, energy=0.9)
    assert (tmp_path / "e.svg").read_text().lstrip().startswith("<?xml")
    assert curves["m.q"][1] == pytest.approx(1.0)              # rank 2: two values hold all the energy
    with pytest.raises(ConfigError, match="does not exist"):
        plot.plot_spectra(ad, tmp_path / "missing" / "s.png")
    with pytest.raises(ConfigError, match="energy"):
        plot.plot_energy_curve({"m": [1.0]}, tmp_path / "x.png", energy=1.5)
