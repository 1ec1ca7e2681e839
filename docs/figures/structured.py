"""Figures of the LoHa and LoKr pages, computed with peftmath's own functions at build time."""

import matplotlib.pyplot as plt
import numpy as np

from peftmath.methods import loha, lokr, lora


def hadamard_rank():
    """Singular values of a LoHa ΔW (r = 4: rank up to 16) and of a LoRA with the same number of parameters
    (r = 8: rank 8), on a 64 × 64 layer."""
    rng = np.random.default_rng(0)
    n, r = 64, 4
    w1a, w1b, w2a, w2b = (rng.standard_normal(s) for s in [(n, r), (r, n), (n, r), (r, n)])
    d_loha = loha.delta_weight(w1a, w1b, w2a, w2b, scaling=1.0)
    A, B = rng.standard_normal((2 * r, n)), rng.standard_normal((n, 2 * r))
    d_lora = lora.delta_weight(A, B, scaling=1.0)
    fig, ax = plt.subplots(figsize=(6.8, 3.4))
    for D, label in [(d_loha, f"LoHa r = {r}: (w1a w1b) ⊙ (w2a w2b)"), (d_lora, f"LoRA r = {2 * r} (same parameters)")]:
        s = np.linalg.svd(D, compute_uv=False)
        ax.semilogy(np.arange(1, n + 1), np.maximum(s / s[0], 1e-17), ".-", label=label)
    ax.axvline(r * r, color="k", ls="--", lw=1); ax.text(r * r + 1, 1e-3, "r² = 16", fontsize=8)
    ax.set_ylim(1e-17, 2); ax.set_xlabel("index i"); ax.set_ylabel("σᵢ / σ₁")
    ax.set_title("the Hadamard product of two rank-4 matrices has rank 16", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def kronecker():
    """ΔW = kron(w1, w2): every (i, p) entry of the small factor scales one copy of the large factor."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 4))
    w2 = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6))           # rank 2, (8 × 6)
    params = {"lokr_w1": w1, "lokr_w2": w2}
    D = lokr.delta_weight(params, scaling=1.0, layer="Linear")
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.4), gridspec_kw={"width_ratios": [4, 6, 20]})
    for ax, M, title in [(axes[0], w1, "w1 (4×4)"), (axes[1], w2, "w2 (8×6), rank 2"),
                         (axes[2], D, f"ΔW = kron(w1, w2) ({D.shape[0]}×{D.shape[1]}), rank 4·2 = 8")]:
        v = float(np.abs(M).max())
        ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_title(title, fontsize=9); ax.set_xticks([]); ax.set_yticks([])
    for k in range(1, 4):
        axes[2].axhline(k * 8 - 0.5, color="k", lw=0.6); axes[2].axvline(k * 6 - 0.5, color="k", lw=0.6)
    fig.tight_layout()
    return fig
