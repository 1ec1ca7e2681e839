"""Figures of the AdaLoRA and prefix-tuning pages, computed with peftmath's own functions at build time."""

import matplotlib.pyplot as plt
import numpy as np

from peftmath.methods import adalora, prefix_tuning


def budget():
    """AdaLoRA on a toy model of 6 modules (init_r = 8, target_r = 3): the total budget over training
    (budget_schedule), and the rank each module keeps (allocate with random gradients whose scale differs by
    module: the allocator moves rank towards the sensitive modules)."""
    rng = np.random.default_rng(0)
    names = [f"layer{i}" for i in range(6)]
    weight = {n: 0.3 + i for i, n in enumerate(names)}           # gradient scale: later modules matter more
    params = {n: {"lora_A": rng.standard_normal((8, 16)), "lora_E": rng.standard_normal((8, 1)),
                  "lora_B": rng.standard_normal((16, 8))} for n in names}
    cfg = adalora.AdaLoraConfig(init_r=8, target_r=3, total_step=200, tinit=20, tfinal=40, deltaT=5)
    state, steps, budgets, ranks = None, [], [], {n: [] for n in names}
    for t in range(1, 201):
        grads = {n: {k: weight[n] * rng.standard_normal(v.shape) for k, v in p.items()} for n, p in params.items()}
        state, masks, bud, _ = adalora.allocate(t, params, grads, state, cfg)
        if masks is not None:
            params = adalora.apply_masks(params, masks)
        steps.append(t); budgets.append(bud)
        for n in names:
            ranks[n].append(int(np.count_nonzero(np.asarray(params[n]["lora_E"]))))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.plot(steps, budgets, color="k")
    a1.axvspan(0, cfg.tinit, color="0.9"); a1.axvspan(cfg.total_step - cfg.tfinal, cfg.total_step, color="0.9")
    a1.set_xlabel("step"); a1.set_ylabel("total rank budget"); a1.set_title("budget: warm-up, cubic decrease, frozen", fontsize=10)
    for n in names:
        a2.plot(steps, ranks[n], label=f"{n} (gradient ×{weight[n]:.1f})")
    a2.set_xlabel("step"); a2.set_ylabel("rank kept"); a2.set_title("rank per module", fontsize=10)
    a2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def attention():
    """Attention probabilities of one head with a prefix of 3 virtual tokens and 5 real tokens (causal),
    read off scaled_dot_product_attention by giving each key a one-hot value."""
    rng = np.random.default_rng(2)
    S, T = 5, 3
    d = S + T
    q = rng.standard_normal((1, 1, S, d)); k = rng.standard_normal((1, 1, S, d))
    pk = rng.standard_normal((1, 1, T, d)) * 1.5
    eye = np.eye(T + S)
    probs = prefix_tuning.scaled_dot_product_attention(
        q, k, eye[T:][None, None], prefix=(pk, eye[:T][None, None]), causal=True)[0, 0]
    base = prefix_tuning.scaled_dot_product_attention(q, k, eye[T:][None, None], causal=True)[0, 0, :, T:]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [S, T + S]})
    for ax, P, title, cols in [(axes[0], base, "without prefix", [f"x{j}" for j in range(S)]),
                               (axes[1], probs, f"with a prefix of {T} virtual tokens",
                                [f"p{j}" for j in range(T)] + [f"x{j}" for j in range(S)])]:
        ax.imshow(P, cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(range(len(cols)), cols, fontsize=8); ax.set_yticks(range(S), [f"x{i}" for i in range(S)], fontsize=8)
        ax.set_xlabel("key"); ax.set_ylabel("query"); ax.set_title(title, fontsize=10)
    axes[1].axvline(T - 0.5, color="w", lw=1)
    fig.tight_layout()
    return fig
