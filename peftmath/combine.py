r"""Weighted combination of adapters: PEFT's ``add_weighted_adapter``, with the math stated.

For LoRA sources ``i`` with user weight ``w_i``, scaling ``s_i`` and factors ``A_i``, ``B_i``
(``ΔW_i = s_i B_i A_i``), per module (only the sources that adapt it):

=======================  ==============  =========================================================
type                     space           result
=======================  ==============  =========================================================
``cat``                  exact           ``A = [w₁s₁A₁; w₂s₂A₂; …]``, ``B = [B₁, B₂, …]``: ``BA = Σ wᵢ ΔWᵢ``
``linear``               factors         ``A = Σ αᵢAᵢ``, ``B = Σ βᵢBᵢ`` with ``αᵢ = sign(cᵢ)√|cᵢ|``, ``βᵢ = √|cᵢ|``,
                                         ``cᵢ = wᵢsᵢ``; ``BA`` has cross terms ``βᵢαⱼBᵢAⱼ`` (``i ≠ j``) and is
                                         **not** ``Σ wᵢ ΔWᵢ`` unless there is one source
``ties``, ``dare_linear``,  factors      the same with the COMBINE of that name on A and on B separately
``dare_ties``,
``magnitude_prune``
``svd``                  deltas          ``Δ = Σ wᵢ ΔWᵢ``, then the best rank-``k`` approximation ``U_k S_k V_kᵀ``:
                                         ``B = U_k S_k``, ``A = V_kᵀ``
``ties_svd``, ``dare_*_svd``,  deltas    COMBINE on the ``ΔWᵢ`` with weights ``wᵢ``, then the truncated SVD
``magnitude_prune_svd``
=======================  ==============  =========================================================

The COMBINE functions (PEFT's ``utils/merge_utils.py``), for tensors ``τᵢ`` and weights ``cᵢ``:

* task arithmetic: ``Σ cᵢτᵢ``;
* magnitude pruning keeps the ``⌊density·n⌋`` entries of largest ``|τ|`` (ties: the earlier index, in
  C order); random pruning keeps each entry with probability ``density`` and divides by ``density``
  (DARE) — the masks are drawn on the host from ``seed``, so they are the same on every backend;
* ties: prune by magnitude, take the majority sign ``σ = sign(Σᵢ τ'ᵢ)`` ("total") or
  ``sign(Σᵢ sign(τ'ᵢ))`` ("frequency") of the **unweighted** pruned tensors (``σ = +1`` where the sum is
  ``≥ 0``), keep ``cᵢτ'ᵢ`` where ``sign(τ'ᵢ) = σ`` and average over the kept ones (disjoint merge);
  ``dare_ties`` prunes at random instead.

The new adapter has ``r = lora_alpha = k`` (``k`` = the common rank, the sum of ranks for ``cat``, or
``svd_rank`` / the largest rank for the SVD types) and no rank or alpha pattern, so its scaling is 1.

**Where PEFT 0.21.2 departs from this** (``peft_compat=True`` reproduces it):

* the combined config inherits ``use_rslora`` from the first source, so its scaling is ``k/√k = √k``
  instead of 1 and the combined delta is ``√k`` times too large (PEFT PR #3449, not in 0.21.2);
* the SVD types fail on Conv1d and Conv3d layers (PEFT issue #3769); peftmath flattens every conv kernel
  to the ``(out, in·prod(k))`` matrix. With ``peft_compat=True`` such a module raises, as PEFT does.

DoRA and ``lora_bias`` sources are refused: PEFT's combination of them is wrong (issue #3761) and a
combined magnitude or bias has no definition here.

IA³ adapters combine as PEFT's ``IA3Model.add_weighted_adapter`` does: ``l = Σ wᵢ lᵢ`` (a linear
combination of the scaling vectors, not a product).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._array import as_compute, compute_dtype, namespace
from .adapter import Adapter
from .backends import backend_for, host_rng
from .errors import ConfigError, ShapeError, UnsupportedError
from .layers import LayerKind

Array = Any

__all__ = [
    "combine",
    "task_arithmetic",
    "magnitude_prune_tensor",
    "random_prune_tensor",
    "majority_sign_mask",
    "disjoint_merge",
    "COMBINATION_TYPES",
]

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + FACTOR_TYPES + SVD_TYPES
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# --------------------------------------------------------------------------------------------------
# The COMBINE functions
# --------------------------------------------------------------------------------------------------
def _stack(tensors: Sequence[Array]) -> tuple[Any, Array]:
    xp = namespace(*tensors)
    return xp, xp.stack(list(tensors), axis=0)


def _weights(xp: Any, weights: Sequence[float], like: Array) -> Array:
    w = xp.asarray(list(weights), dtype=like.dtype, device=array_api_compat.device(like))
    return xp.reshape(w, (len(weights),) + (1,) * (like.ndim - 1))


def task_arithmetic(tensors: Sequence[Array], weights: Sequence[float]) -> Array:
    """``Σ cᵢ τᵢ``."""
    xp, stacked = _stack(tensors)
    return xp.sum(stacked * _weights(xp, weights, stacked), axis=0)


def magnitude_prune_tensor(tensor: Array, density: float) -> Array:
    """Keep the ``⌊density·n⌋`` entries of largest magnitude (ties: the earlier C-order index), zero the rest."""
    xp = namespace(tensor)
    if density >= 1:
        return tensor
    flat = xp.reshape(tensor, (-1,))
    n = flat.shape[0]
    k = int(density * n)
    order = xp.argsort(xp.abs(flat), descending=True, stable=True)
    rank = xp.argsort(order, stable=True)  # rank[j] = position of entry j in the descending order
    keep = rank < k
    return xp.reshape(xp.where(keep, flat, xp.zeros_like(flat)), tensor.shape)


def random_prune_tensor(tensor: Array, density: float, *, rng: np.random.Generator, rescale: bool = True,
                        mask_source: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Array:
    """Keep each entry with probability ``density`` (host-drawn mask), divided by ``density`` if ``rescale``."""
    xp = namespace(tensor)
    if density >= 1:
        return tensor
    shape = tuple(tensor.shape)
    host = mask_source(shape) if mask_source is not None else (rng.random(shape) < density)
    mask = backend_for(xp).from_host(np.asarray(host, dtype=bool), xp, array_api_compat.device(tensor))
    pruned = xp.where(mask, tensor, xp.zeros_like(tensor))
    return pruned / density if rescale else pruned


def majority_sign_mask(stacked: Array, method: str = "total") -> Array:
    """``sign(τᵢ) == σ`` with ``σ = +1`` where ``Σᵢ τᵢ`` ("total") or ``Σᵢ sign(τᵢ)`` ("frequency") is ``≥ 0``."""
    xp = namespace(stacked)
    sign = xp.sign(stacked)
    if method == "total":
        magnitude = xp.sum(stacked, axis=0)
    elif method == "frequency":
        magnitude = xp.sum(sign, axis=0)
    else:
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    one = xp.ones_like(magnitude)
    majority = xp.where(magnitude >= 0, one, -one)
    return sign == majority[None, ...]


def disjoint_merge(weighted: Array, mask: Array) -> Array:
    """``Σᵢ (cᵢτᵢ)[mᵢ] / max(Σᵢ mᵢ, 1)``: the mean over the sources that agree with the majority sign."""
    xp = namespace(weighted, mask)
    total = xp.sum(xp.where(mask, weighted, xp.zeros_like(weighted)), axis=0)
    count = xp.sum(xp.astype(mask, weighted.dtype), axis=0)
    return total / xp.maximum(count, xp.ones_like(count))


def _combine_tensors(kind: str, tensors: list[Array], weights: list[float], density: float | None,
                     sign_method: str, rng: np.random.Generator, mask_source: Any) -> Array:
    if kind == "linear" or kind == "svd" or kind == "cat":
        return task_arithmetic(tensors, weights)
    base = kind.removesuffix("_svd")
    if base == "magnitude_prune":
        return task_arithmetic([magnitude_prune_tensor(t, density) for t in tensors], weights)
    if base == "dare_linear":
        return task_arithmetic([random_prune_tensor(t, density, rng=rng, mask_source=mask_source) for t in tensors],
                               weights)
    if base in ("ties", "dare_ties"):
        if base == "ties":
            pruned = [magnitude_prune_tensor(t, density) for t in tensors]
        else:
            pruned = [random_prune_tensor(t, density, rng=rng, mask_source=mask_source) for t in tensors]
        xp, stacked = _stack(pruned)
        mask = majority_sign_mask(stacked, sign_method)
        return disjoint_merge(stacked * _weights(xp, weights, stacked), mask)
    raise ConfigError(f"unknown combination_type {kind!r}; use one of {COMBINATION_TYPES}")


# --------------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------------
def _quantile(xp: Any, values: Array, q: float) -> Array:
    """Linear-interpolation quantile (``torch.quantile``'s default) of a 1-D array."""
    v = xp.sort(values)
    pos = q * (v.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.shape[0] - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _merge_targets(configs: list[Any], field: str) -> Any:
    values = [getattr(c, field, None) for c in configs]
    if all(v is None for v in values):
        return None
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1 or (None in values and kinds):
        raise ConfigError(f"combine: every adapter's {field} must be of one type (all lists or all regex strings), "
                          f"got {[type(v).__name__ for v in values]}")
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    merged: list[str] = []
    for v in values:
        merged.extend(x for x in v if x not in merged)
    return sorted(merged)


def combine(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | np.random.Generator | None = None,
    peft_compat: bool = False,
    mask_source: Callable[[tuple[int, ...]], np.ndarray] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Adapter:
    """A new adapter combining ``adapters`` with ``weights`` (see the module docstring for each type).

    Returns an :class:`~peftmath.adapter.Adapter` whose ``truncation_error`` maps each module to the
    relative Frobenius error ``‖Δ − BA‖ / ‖Δ‖`` of the SVD types (empty for the others). DARE masks are
    drawn from ``seed`` on the host (``mask_source(shape) -> bool array`` overrides them, e.g. to feed
    the masks of another implementation). ``progress(1)``, when given, is called after each module of a
    LoRA combination.
    """
    adapters = list(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"combine: weights must be numbers, got {list(weights)!r}") from None
    if not adapters:
        raise ConfigError("combine: no adapters given")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"combine: weights must be finite numbers, got {weights}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ConfigError(f"combine: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise ConfigError(f"combine: svd_rank must be a positive integer, got {svd_rank!r}")
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed < 0:
        raise ConfigError(f"combine: seed must be a non-negative integer, got {seed}")
    if len(weights) != len(adapters):
        raise ConfigError(f"combine: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    types = {a.peft_type for a in adapters}
    if len(types) > 1:
        raise ConfigError(f"combine: adapters of different methods ({', '.join(sorted(types))}) cannot be combined")
    peft_type = types.pop()
    for name in sorted({m for a in adapters for m in a.params}):  # one library and device, per module
        namespace(*(t for a in adapters for t in a.params.get(name, {}).values()), where=f"combine: module {name}")
    how = adapters[0].description.combine  # the method's description says how (or that PEFT does not)
    if how == "scale":
        return _combine_ia3(adapters, weights)
    if how != "low_rank":
        raise UnsupportedError(f"combine: {peft_type} adapters cannot be combined (PEFT combines LoRA and IA3 only)")
    for a in adapters:
        if a.description.needs_record(a.config) or a.config.lora_bias:
            what = _uncombinable(a.config)
            raise UnsupportedError(
                f"combine: {what} adapters cannot be combined: their merge is not W + ΔW with a ΔW that could be "
                f"summed (a magnitude, a bias, replaced rows or a truncated base), and PEFT 0.21.2's result for DoRA "
                f"and lora_bias is wrong (PEFT issue #3761)"
            )
    kind = "linear" if len(adapters) == 1 else combination_type
    if kind not in COMBINATION_TYPES:
        raise ConfigError(f"combine: unknown combination_type {combination_type!r}; use one of {COMBINATION_TYPES}")
    if kind.removesuffix("_svd") in _PRUNING:
        if density is None or not 0 < density <= 1:
            raise ConfigError(f"combine: {kind} needs a density in (0, 1], got {density!r}")
    ranks = [max([a.config.r, *(a.config.rank_pattern or {}).values()]) for a in adapters]
    if kind in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ConfigError(f"combine: {kind} needs adapters of one rank, got ranks {ranks}; use 'cat' or an SVD type")
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    configs = [a.config for a in adapters]
    first = configs[0]
    config = first.replace(
        r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={},
        target_modules=_merge_targets(configs, "target_modules"),
        use_rslora=first.use_rslora if peft_compat else False,
        # the result is a plain LoRA: dense factors, no training-time state of a variant
        use_bdlora=None, velora_config=None, monteclora_config=None,
    )
    rng = host_rng(seed)
    modules = sorted({m for a in adapters for m in a.params})
    params: dict[str, dict[str, Array]] = {}
    errors: dict[str, float] = {}
    kinds: dict[str, LayerKind] = {}
    for name in modules:
        sources = [(a.module(name), w) for a, w in zip(adapters, weights) if name in a.params]
        layers = {m.layer for m, _ in sources}
        if len(layers) > 1:
            raise ShapeError(f"{name}: the adapters disagree on the layer ({', '.join(sorted(map(str, layers)))})")
        layer = sources[0][0].layer
        kinds[name] = layer.kind
        if kind == "cat":
            params[name] = _cat(name, sources, new_rank)
        elif kind in FACTOR_TYPES:
            params[name] = _factor_space(kind, sources, density, majority_sign_method, rng, mask_source)
        else:
            params[name], errors[name] = _svd_space(kind, name, sources, new_rank, density, majority_sign_method, rng,
                                                    mask_source, svd_clamp, svd_full_matrices, peft_compat)
        if progress is not None:
            progress(1)
    out = Adapter(config, params, layer_kinds=kinds)
    out.truncation_error = errors
    return out


def _keys(mod: Any) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if mod.layer.kind is LayerKind.EMBEDDING else \
        ("lora_A.weight", "lora_B.weight")


def _cat(name: str, sources: list, new_rank: int) -> dict[str, Array]:
    mod0 = sources[0][0]
    xp = mod0.xp
    a_key, b_key = _keys(mod0)
    dtype = mod0.A.dtype
    As = [as_compute(xp, m.A, dtype) * (w * m.scaling) for m, w in sources]
    Bs = [as_compute(xp, m.B, dtype) for m, _ in sources]
    A = xp.concat(As, axis=0)
    B = xp.concat(Bs, axis=1)
    pad = new_rank - A.shape[0]
    if pad > 0:  # sources absent from this module, or rank patterns: zero rows / columns
        dev = array_api_compat.device(A)
        A = xp.concat([A, xp.zeros((pad, *A.shape[1:]), dtype=A.dtype, device=dev)], axis=0)
        B = xp.concat([B, xp.zeros((B.shape[0], pad, *B.shape[2:]), dtype=B.dtype, device=dev)], axis=1)
    return {a_key: A, b_key: B}


def _factor_space(kind: str, sources: list, density, sign_method, rng, mask_source) -> dict[str, Array]:
    mod0 = sources[0][0]
    a_key, b_key = _keys(mod0)
    alphas, betas = [], []
    for m, w in sources:
        c = w * m.scaling
        root = math.sqrt(abs(c))
        alphas.append(root if c >= 0 else -root)
        betas.append(root)
    A = _combine_tensors(kind, [m.A for m, _ in sources], alphas, density, sign_method, rng, mask_source)
    B = _combine_tensors(kind, [m.B for m, _ in sources], betas, density, sign_method, rng, mask_source)
    xp = mod0.xp
    return {a_key: as_compute(xp, A, mod0.A.dtype), b_key: as_compute(xp, B, mod0.A.dtype)}


def _svd_space(kind, name, sources, k, density, sign_method, rng, mask_source, clamp, full_matrices, peft_compat):
    mod0 = sources[0][0]
    layer, xp = mod0.layer, mod0.xp
    if peft_compat and layer.kind in (LayerKind.CONV1D, LayerKind.CONV3D):
        raise UnsupportedError(
            f"{name}: PEFT 0.21.2's SVD combination fails on {layer.kind.value} layers (issue #3769); "
            f"use peft_compat=False for the consistent result"
        )
    # each source's own ΔW, before any factor its layer applies again on top of its scaling (an attention's
    # out-projection: PEFT counts it twice, and the combined adapter's module does so once more)
    deltas = [m.delta_weight() / getattr(m, "change_factor", 1.0) for m, _ in sources]
    delta = _combine_tensors(kind, deltas, [w for _, w in sources], density, sign_method, rng, mask_source)
    M = layer.as_matrix(delta, xp)  # (out, in·prod(kernel)); Conv1D and Embedding transposed back
    rows, cols = M.shape
    if k > min(rows, cols):
        raise ShapeError(
            f"{name}: svd_rank {k} exceeds min(out, in) = {min(rows, cols)} of its {rows}x{cols} delta; "
            f"choose svd_rank <= {min(rows, cols)}"
        )
    cd = compute_dtype(xp, M.dtype)
    Mc = as_compute(xp, M, cd)
    full = full_matrices
    if array_api_compat.is_dask_array(Mc):
        # dask has the reduced SVD only, of an array chunked along one axis (tall-and-skinny QR): the
        # leading k <= min(rows, cols) singular vectors used below are the same as the full SVD's
        Mc, full = Mc.rechunk({1: -1} if rows >= cols else {0: -1}), False
    U, S, Vh = xp.linalg.svd(Mc, full_matrices=full)
    U = U[:, :k] * S[None, :k]
    Vh = Vh[:k, :]
    if clamp is not None:
        q = _quantile(xp, xp.concat([xp.reshape(U, (-1,)), xp.reshape(Vh, (-1,))]), clamp)
        U, Vh = xp.clip(U, -q, q), xp.clip(Vh, -q, q)
    approx = xp.matmul(U, Vh)
    ref = as_compute(xp, M, cd)
    norm = float(xp.linalg.vector_norm(xp.reshape(ref, (-1,))))
    err = float(xp.linalg.vector_norm(xp.reshape(ref - approx, (-1,)))) / norm if norm else 0.0
    a_key, b_key = _keys(mod0)
    dtype = mod0.A.dtype
    B = xp.reshape(U, (layer.out_features, k) + (1,) * len(layer.kernel_size))
    A = xp.reshape(Vh, (k, *mod0.A.shape[1:]))
    return {a_key: as_compute(xp, A, dtype), b_key: as_compute(xp, B, dtype)}, err


def _combine_ia3(adapters: list[Adapter], weights: list[float]) -> Adapter:
    """IA³: ``l = Σ wᵢ lᵢ`` per module over the adapters that adapt it."""
    configs = [a.config for a in adapters]
    config = configs[0].replace(target_modules=_merge_targets(configs, "target_modules"),
                                feedforward_modules=_merge_targets(configs, "feedforward_modules"))
    params: dict[str, dict[str, Array]] = {}
    for name in sorted({m for a in adapters for m in a.params}):
        present = [(a.params[name]["ia3_l"], w) for a, w in zip(adapters, weights) if name in a.params]
        shapes = {tuple(v.shape) for v, _ in present}
        if len(shapes) > 1:
            raise ShapeError(f"{name}: the IA3 vectors have different shapes {sorted(shapes)}")
        params[name] = {"ia3_l": task_arithmetic([v for v, _ in present], [w for _, w in present])}
    out = Adapter(config, params)
    out.truncation_error = {}
    return out


def _uncombinable(config: Any) -> str:
    """The LoRA features that make ``config``'s adapter not combinable, by name (for the refusal)."""
    named = [("DoRA", getattr(config, "use_dora", False)), ("lora_bias", getattr(config, "lora_bias", False)),
             ("KaSA", getattr(config, "kasa_config", None) is not None),
             ("trainable-token (trainable_token_indices)", bool(getattr(config, "trainable_token_indices", None)))]
    return " and ".join(n for n, on in named if on) or "record-keeping"

