"""Figures of the LoRA page, computed with peftmath's own functions at build time."""

import matplotlib.pyplot as plt
import numpy as np

from peftmath.layers import Layer
from peftmath.methods import lora
from peftmath.plot import energy_curve


def _show(ax, M, title, vmax):
    ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]); ax.set_yticks([])


def bottleneck():
    """ΔW (out × in) = s · B (out × r) · A (r × in), drawn to scale, with W beside it."""
    out, inn, r, s = 24, 18, 2, 2.0
    init = lora.init_weights(Layer.of((out, inn)), r, init_lora_weights=False, seed=0)   # both factors non-zero
    A, B = init.A.astype(np.float64), init.B.astype(np.float64)
    dW = lora.delta_weight(A, B, scaling=s)
    W = np.random.default_rng(1).standard_normal((out, inn)) * 0.3
    vmax = float(np.abs(dW).max())
    fig = plt.figure(figsize=(9.5, 3.2))
    unit = 0.8 / (inn + inn + r + inn + 6)          # width per column in figure fraction
    h = 0.75
    x = 0.03
    for M, title, in [(W, f"W  ({out}×{inn}), frozen"), (dW, f"ΔW = s·BA  ({out}×{inn}), rank ≤ {r}")]:
        ax = fig.add_axes([x, 0.1, unit * M.shape[1], h])
        _show(ax, M, title, float(np.abs(M).max())); x += unit * (M.shape[1] + 2.5)
    fig.text(x - unit * 1.25, 0.47, "=", fontsize=18, ha="center")
    fig.text(0.03 + unit * (inn + 1.25), 0.47, "+", fontsize=18, ha="center")
    axb = fig.add_axes([x, 0.1, unit * r * 1.0, h]); _show(axb, B, f"B\n({out}×{r})", vmax)
    x += unit * (r + 1.5)
    fig.text(x - unit * 0.75, 0.47, "·", fontsize=18, ha="center")
    axa = fig.add_axes([x, 0.1 + h - h * r / out, unit * inn, h * r / out]); _show(axa, A, f"A  ({r}×{inn})", vmax)
    fig.text(0.03, 0.01, f"trained: r·(in + out) = {r * (inn + out)} numbers instead of in·out = {inn * out}",
             fontsize=9)
    return fig


def spectrum():
    """A full fine-tuning update with a decaying spectrum, its best rank-8 LoRA, and the energy kept."""
    rng = np.random.default_rng(0)
    out, inn, r = 256, 192, 8
    U, _ = np.linalg.qr(rng.standard_normal((out, inn)))
    V, _ = np.linalg.qr(rng.standard_normal((inn, inn)))
    sv = 1.0 / np.arange(1, inn + 1) ** 1.2                       # a decaying spectrum, as measured updates show
    D = (U * sv) @ V.T
    Uu, S, Vh = np.linalg.svd(D, full_matrices=False)
    B, A = Uu[:, :r] * np.sqrt(S[:r]), np.sqrt(S[:r])[:, None] * Vh[:r]   # the best rank-r factors (Eckart–Young)
    dW = lora.delta_weight(A, B, scaling=1.0)
    S_lora = np.linalg.svd(dW, compute_uv=False)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    k = np.arange(1, inn + 1)
    a1.semilogy(k, S, label="full update D")
    a1.semilogy(k, np.maximum(S_lora, 1e-17), ".", ms=3, label=f"LoRA ΔW = BA, r = {r}")
    a1.set_ylim(1e-4, 2); a1.set_xlabel("index i"); a1.set_ylabel("singular value σᵢ"); a1.legend(fontsize=8)
    a1.set_title("the spectrum of ΔW stops at r", fontsize=10)
    e = energy_curve(S)
    a2.plot(k, e); a2.axvline(r, color="k", ls="--", lw=1)
    a2.set_xscale("log"); a2.set_ylim(0, 1.02); a2.set_xlabel("rank k"); a2.set_ylabel("fraction of ‖D‖²_F kept")
    a2.set_title(f"rank {r} keeps {e[r - 1]:.0%} of the energy", fontsize=10)
    fig.tight_layout()
    return fig


def scaling():
    """‖s·BA‖ after one Adam-like step on B (entries ±η) as r grows, for s = α/r and s = α/√r."""
    inn, out, alpha, eta = 1024, 1024, 16.0, 1e-3
    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    rng = np.random.default_rng(0)
    rows = {"α/r (LoRA)": [], "α/√r (rsLoRA)": []}
    for r in ranks:
        A = lora.init_weights(Layer.of((out, inn)), r, seed=r).A.astype(np.float64)   # Kaiming-uniform
        B = eta * rng.choice([-1.0, 1.0], size=(out, r))             # Adam's first step: ±lr per entry
        for label, rs in (("α/r (LoRA)", False), ("α/√r (rsLoRA)", True)):
            dW = lora.delta_weight(A, B, scaling=lora.scaling(alpha, r, use_rslora=rs))
            rows[label].append(np.linalg.norm(dW) / np.sqrt(out * inn))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for label, ys in rows.items():
        ax.loglog(ranks, ys, "o-", label=label)
    ax.set_xlabel("rank r"); ax.set_ylabel("RMS entry of ΔW after one step")
    ax.set_title("the update's size as the rank grows", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
