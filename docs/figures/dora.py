"""Figures of the DoRA page, computed with peftmath's own functions at build time."""

import matplotlib.pyplot as plt
import numpy as np

from peftmath.methods import dora, lora


def rescale():
    """In 2-D: the rows of W, of the LoRA weight W + s·BA, and of DoRA's merged weight (same directions as
    W + s·BA, lengths m)."""
    W = np.array([[1.6, 0.4], [0.3, 1.1], [-0.9, 0.8]])                 # Linear(2, 3): three rows in the plane
    A = np.array([[0.35, -0.5]]); B = np.array([[0.6], [1.0], [-0.4]])  # r = 1
    s = 1.0
    V = lora.merge(W, A, B, scaling=s)                                  # the LoRA-adapted weight
    m = np.linalg.norm(W, axis=1) * np.array([1.25, 0.7, 1.0])          # learned lengths
    Wd = dora.merge(W, A, B, m, scaling=s).weight
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2), sharex=True, sharey=True)
    for ax, title in zip(axes, ["LoRA: W → W + s·BA", "DoRA: direction of W + s·BA, length m"]):
        for o, c in enumerate(colors):
            ax.annotate("", W[o], (0, 0), arrowprops=dict(arrowstyle="->", color=c, alpha=0.35, lw=2))
            new = V[o] if ax is axes[0] else Wd[o]
            ax.annotate("", new, (0, 0), arrowprops=dict(arrowstyle="->", color=c, lw=2))
            if ax is axes[1]:
                t = np.linspace(0, 2 * np.pi, 200)
                ax.plot(m[o] * np.cos(t), m[o] * np.sin(t), ":", color=c, lw=0.8)
                ax.plot(*np.stack([np.zeros(2), V[o]], 1), "--", color=c, lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal"); ax.axhline(0, color="0.8", lw=0.5); ax.axvline(0, color="0.8", lw=0.5)
    axes[0].set_xlim(-2.2, 2.4); axes[0].set_ylim(-0.6, 2.4)
    axes[0].text(-2.1, 2.2, "faint: rows of W", fontsize=8)
    axes[1].text(-2.1, 2.2, "dashed: W + s·BA; dotted: ‖row‖ = m", fontsize=8)
    fig.tight_layout()
    return fig


def gradient():
    """For one row: the gradient through the normalised direction (orthogonal to V) and the detached one."""
    V = np.array([1.5, 0.5]); m = 2.0; gW = np.array([0.4, 0.9])       # dL/dW' for this row
    n = np.linalg.norm(V)
    full = m / n * (gW - V * (V @ gW) / n ** 2)                        # through ‖V‖
    detached = m / n * gW                                              # ‖V‖ a constant (DoRA)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for vec, label, c in [(V, "V = W + s·BA", "0.3"), (full, "gradient, norm not detached", "#c44e52"),
                          (detached, "gradient, norm detached (DoRA)", "#4c72b0")]:
        ax.annotate("", vec, (0, 0), arrowprops=dict(arrowstyle="->", color=c, lw=2))
        ax.plot([], [], color=c, label=label)
    ax.set_aspect("equal"); ax.set_xlim(-0.4, 1.8); ax.set_ylim(-0.9, 1.2)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("∂L/∂V for one row", fontsize=10)
    fig.tight_layout()
    return fig
