"""Pictures of adapters, for people who would rather look than read (``pip install -e ".[plot]"``).

The numbers come from functions that need only NumPy, so they can be tested and reused without a
plotting library; the ``plot_*`` functions draw them with matplotlib, imported on first use (a missing
matplotlib is an :class:`~peftmath.errors.UnsupportedError` that says what to install).

* :func:`spectra` / :func:`plot_spectra`: per adapted module, the singular values of ``ΔW``'s matrix view
  (``(out, in)``; a convolution's kernel flattened into ``in``) and ``‖ΔW‖_F``. For an additive method
  ``ΔW`` is the method's delta weight; for every method, given the base weights, ``ΔW = merge(W) − W``.
  A LoRA of rank ``r`` shows at most ``r`` non-zero singular values; LoHa up to ``r²``; LoKr the product
  of its factors' ranks; OFT/BOFT/IA³ a full spectrum (a rotation or a scale of ``W`` is not low rank).
* :func:`energy_curve` / :func:`plot_energy_curve`: the fraction of ``‖D‖_F²`` kept by the best rank-``k``
  approximation, ``Σ_{i≤k} σ_i² / Σ_i σ_i²`` (Eckart–Young), against ``k``: how ``peftmath extract``
  chooses a rank with ``--energy``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ConfigError, ShapeError, UnsupportedError

__all__ = ["spectra", "energy_curve", "plot_spectra", "plot_energy_curve"]


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UnsupportedError(
            "peftmath.plot needs matplotlib, which is not installed: pip install 'peftmath[plot]' "
            "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _matrix_view(module, D: Any) -> np.ndarray:
    M = np.asarray(module.layer.as_matrix(np.asarray(D, dtype=np.float64), _np_namespace()))
    return M


def _np_namespace():
    import array_api_compat.numpy as xp

    return xp


def spectra(adapter, base: Mapping[str, Any] | None = None, *, modules: list[str] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Singular values and Frobenius norm of each module's weight change.

    Parameters
    ----------
    adapter
        A :class:`peftmath.Adapter`.
    base
        The base state dict (``{"model.layers.0.q_proj.weight": array, ...}``). Without it, only additive
        methods (LoRA, DoRA's ``s·BA`` part, AdaLoRA, LoHa, LoKr, VeRA) can be shown: ``ΔW`` is their delta
        weight. With it, ``ΔW = merge(W) − W`` for every method (DoRA's rescaling, OFT's rotation, IA³'s
        scale included), in float64. A stack of expert matrices (LoRA's ``target_parameters`` on a 3-D
        parameter) gives one entry per expert, ``"<module>[e]"``.
    modules
        The module names to include (default: all of the adapter's).

    Returns
    -------
    dict
        ``{module: {"singular_values": float64 array (descending), "norm": ‖ΔW‖_F, "shape": (out, in)}}``
        in module order.
    """
    names = adapter.modules if modules is None else list(modules)
    unknown = [n for n in names if n not in adapter.modules]
    if unknown:
        raise ConfigError(f"plot: {unknown[0]!r} is not a module of this adapter; it adapts "
                          f"{', '.join(adapter.modules[:5])}{', ...' if len(adapter.modules) > 5 else ''}")
    if not names:
        raise ConfigError("plot: the adapter has no adapted modules (a prompt-learning method changes no weight)")
    out: dict[str, dict[str, Any]] = {}
    if base is None:
        for name in names:
            module = adapter.module(name)
            if not module.additive:
                raise UnsupportedError(
                    f"plot: module {name!r} is {adapter.peft_type}, which changes W by more than an added ΔW; "
                    "pass the base weights (base=..., or --base BASE) to plot merge(W) − W")
            _put(out, name, _matrix_view(module, module.delta_weight()))
        return out
    wide = {k: np.asarray(v, dtype=np.float64) for k, v in base.items()}
    merged = adapter.merge(wide)
    for name in names:
        key = _weight_key(adapter, name, wide)
        module = adapter.module(name, weight_shape=wide[key].shape)
        _put(out, name, _matrix_view(module, np.asarray(merged[key], dtype=np.float64) - wide[key]))
    return out


def _put(out: dict[str, dict[str, Any]], name: str, M: np.ndarray) -> None:
    """``out[name]``: the summary of ``M``; a stack of expert matrices ``(E, m, n)`` (LoRA's
    ``target_parameters``) gives one entry per expert, ``name[e]``."""
    if M.ndim == 3:
        out.update({f"{name}[{e}]": _summary(np.asarray(M[e], dtype=np.float64)) for e in range(M.shape[0])})
    else:
        out[name] = _summary(M)


def _weight_key(adapter, name: str, base: Mapping[str, Any]) -> str:
    key = adapter.weight_keys(name, base)[0]  # <m>.weight, a raw parameter, an attention's in_proj_weight
    if key not in base:
        raise ShapeError(f"plot: the base has no weight {key!r} for module {name!r}")
    return key


def _summary(M: np.ndarray) -> dict[str, Any]:
    s = np.linalg.svd(M, compute_uv=False)
    return {"singular_values": s, "norm": float(np.sqrt(np.sum(s ** 2))), "shape": tuple(M.shape)}


def energy_curve(singular_values: Any) -> np.ndarray:
    """``e[k-1] = Σ_{i≤k} σ_i² / Σ_i σ_i²`` for ``k = 1 … len(σ)``: the fraction of ``‖D‖_F²`` that the
    best rank-``k`` approximation keeps (Eckart–Young). All ones for a zero matrix (nothing to lose)."""
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)).ravel())[::-1]
    if s.size == 0:
        raise ShapeError("plot: energy_curve needs at least one singular value")
    if not np.all(np.isfinite(s)):
        raise ConfigError("plot: energy_curve got a NaN or infinite singular value")
    e = np.cumsum(s ** 2)
    return np.ones_like(e) if e[-1] == 0 else e / e[-1]


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"plot: cannot write {path!r}: folder {parent!r} does not exist")
    return path


def plot_spectra(adapter, path: str | os.PathLike, *, base: Mapping[str, Any] | None = None,
                 modules: list[str] | None = None, max_modules: int = 12, dpi: int = 110) -> dict[str, dict]:
    """Draw :func:`spectra` to ``path`` (PNG, SVG or PDF by its suffix) and return the numbers.

    Left: the singular values of each module's ``ΔW`` (log scale; up to ``max_modules`` modules, those
    with the largest ``‖ΔW‖_F``). Right: ``‖ΔW‖_F`` of every module, one bar each. For
    ``peftmath inspect ADAPTER --plot FILE``.
    """
    path = _check_path(path)
    data = spectra(adapter, base, modules=modules)
    plt = _pyplot()
    names = list(data)
    shown = sorted(names, key=lambda n: -data[n]["norm"])[:max_modules]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name in shown:
        s = data[name]["singular_values"]
        floor = max(float(s[0]) * 1e-12, np.finfo(np.float64).tiny) if s.size and s[0] > 0 else 1e-300
        left.semilogy(np.arange(1, s.size + 1), np.maximum(s, floor), marker=".", label=_short(name))
    left.set_xlabel("index i")
    left.set_ylabel("singular value σᵢ of ΔW")
    left.set_title(f"{adapter.peft_type}: spectra of ΔW ({len(shown)} of {len(names)} modules)")
    left.legend(fontsize=7, loc="upper right")
    right.barh(range(len(names)), [data[n]["norm"] for n in names], color="#4c72b0")
    right.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("‖ΔW‖_F")
    right.set_title("per module")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return data


def plot_energy_curve(singular_values: Mapping[str, Any], path: str | os.PathLike, *, rank: int | None = None,
                      energy: float | None = None, dpi: int = 110) -> dict[str, np.ndarray]:
    """Draw :func:`energy_curve` for each module (``{module: singular values of D = W_tuned − W_base}``)
    against the rank ``k``, with the chosen ``rank`` and ``energy`` as guides, to ``path``; return the
    curves. For ``peftmath extract ... --plot FILE``."""
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"plot: energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise ConfigError(f"plot: rank must be at least 1, got {rank}")
    if not singular_values:
        raise ConfigError("plot: no modules to draw")
    path = _check_path(path)
    curves = {name: energy_curve(s) for name, s in singular_values.items()}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, e in curves.items():
        ax.plot(np.arange(1, e.size + 1), e, label=_short(name))
    if rank is not None:
        ax.axvline(rank, color="k", linestyle="--", linewidth=1, label=f"rank {rank}")
    if energy is not None:
        ax.axhline(energy, color="gray", linestyle=":", linewidth=1, label=f"energy {energy:g}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k")
    ax.set_ylabel("fraction of ‖D‖²_F kept")
    ax.set_title("energy of the best rank-k approximation")
    if len(curves) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return curves


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
