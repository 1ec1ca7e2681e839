"""Figures of the OFT and BOFT pages, computed with peftmath's own functions at build time."""

import matplotlib.pyplot as plt
import numpy as np

from peftmath.methods import boft, oft


def _dense(blocks):
    k, b, _ = blocks.shape
    R = np.zeros((k * b, k * b))
    for i in range(k):
        R[i * b:(i + 1) * b, i * b:(i + 1) * b] = blocks[i]
    return R


def blocks():
    """The block-diagonal rotation R (4 blocks of 8), and how far RᵀR is from I for the exact Cayley map and
    PEFT's default five-term Neumann series."""
    rng = np.random.default_rng(0)
    b, k = 8, 4
    q = 0.05 * rng.standard_normal((k, b * (b - 1) // 2))
    R_exact = _dense(np.asarray(oft.rotation_blocks(q, use_cayley_neumann=False)))
    R_neu = _dense(np.asarray(oft.rotation_blocks(q)))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    im = axes[0].imshow(R_exact, cmap="RdBu_r", vmin=-1, vmax=1)
    axes[0].set_title(f"R: {k} blocks of {b}×{b} (exact Cayley)", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for ax, R, name in [(axes[1], R_exact, "exact Cayley"), (axes[2], R_neu, "Neumann, 5 terms (PEFT)")]:
        err = np.abs(R.T @ R - np.eye(k * b))
        im = ax.imshow(np.log10(err + 1e-17), cmap="viridis", vmin=-17, vmax=-1)
        ax.set_title(f"log10 |RᵀR − I|, {name}\nmax {err.max():.1e}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout()
    return fig


def angles():
    """Rotating the input side keeps every row's norm and every angle between rows: the Gram matrix W Wᵀ is
    unchanged, while the weights themselves move."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 16))
    R = oft.rotation_blocks(0.3 * rng.standard_normal((4, 6)), use_cayley_neumann=False)   # 4 blocks of 4
    Wm = np.asarray(oft.merge(W, R))
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), gridspec_kw={"width_ratios": [16, 16, 7]})
    v = float(np.abs(W).max())
    axes[0].imshow(W, cmap="RdBu_r", vmin=-v, vmax=v); axes[0].set_title("W (6×16)", fontsize=9)
    axes[1].imshow(Wm, cmap="RdBu_r", vmin=-v, vmax=v); axes[1].set_title("merged W Rᵀ: new weights", fontsize=9)
    diff = np.abs(Wm @ Wm.T - W @ W.T)
    axes[2].imshow(np.log10(diff + 1e-17), cmap="viridis", vmin=-17, vmax=0)
    axes[2].set_title(f"log10 |W'W'ᵀ − WWᵀ|: max {diff.max():.0e}", fontsize=9)
    for ax in axes:
        ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout()
    return fig


def butterfly():
    """BOFT: each butterfly factor B_i = P_i D_i P_iᵀ (a permuted block-diagonal rotation) as a sparsity
    image, and their product, which couples every coordinate."""
    n, b, m = 16, 2, 4                           # 8 blocks of 2; log2(8) + 1 = 4 factors make a dense product
    nb = n // b
    rng = np.random.default_rng(0)
    Q = 0.6 * rng.standard_normal((m, nb, b, b))
    blocks = np.asarray(boft.cayley(Q))          # (m, nb, b, b), orthogonal blocks
    perms = boft.level_perms(n, m, nb, b)
    fig, axes = plt.subplots(1, m + 1, figsize=(11, 2.9))
    for i in range(m):
        one = np.zeros_like(blocks)
        one[:] = np.eye(b)
        one[i] = blocks[i]                       # only factor i is not the identity
        Bi = np.asarray(boft.dense_rotation(one))
        axes[i].imshow(np.abs(Bi) > 1e-12, cmap="Greys", vmin=0, vmax=1)
        axes[i].set_title(f"factor {i + 1}" + ("" if perms[i] is None else " (permuted)"), fontsize=9)
    M = np.asarray(boft.dense_rotation(blocks))
    axes[m].imshow(np.abs(M) > 1e-12, cmap="Greys", vmin=0, vmax=1)
    axes[m].set_title(f"product: {np.count_nonzero(np.abs(M) > 1e-12)}/{n * n} non-zero", fontsize=9)
    for ax in axes:
        ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"BOFT, n = {n}, blocks of {b}: {m} factors × {nb} blocks × {b * (b - 1) // 2} parameter", fontsize=10)
    fig.tight_layout()
    return fig
