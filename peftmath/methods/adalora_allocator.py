r"""AdaLoRA's rank allocator (PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``) as pure
functions (specs/adalora.md, "Rank allocation").

:func:`allocate` takes the parameters, their gradients, the step and the previous
:class:`AllocatorState` and returns the new state, the masks, the budget and the threshold;
:func:`budget_schedule` is the cubic budget, :func:`triplet_scores` the sensitivity scores,
:func:`apply_masks` zeroes the pruned ``E_i``, :func:`resize_by_rank_pattern` is what PEFT does when it
saves, and :func:`orthogonal_regularizer` the loss term ``R``. Every name is also importable from
:mod:`peftmath.methods.adalora`.

The config is any object with AdaLoRA's schedule fields (``total_step``, ``tinit``, ``tfinal``,
``deltaT``, ``beta1``, ``beta2``, ``target_r``) and a ``validate`` method, normally an
:class:`~peftmath.methods.adalora.AdaLoraConfig`; this module does not import the method module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import array_api_compat

from .._array import namespace
from ..errors import ConfigError, ShapeError
from ._base import check_shape

if TYPE_CHECKING:
    from .adalora import AdaLoraConfig

Array = Any

__all__ = [
    "AllocatorState",
    "Allocation",
    "budget_schedule",
    "kthvalue",
    "triplet_scores",
    "allocate",
    "apply_masks",
    "resize_by_rank_pattern",
    "rank_pattern_for_config",
    "orthogonal_regularizer",
    "lookup_mask",
]


#: the tensors of one AdaLoRA module, in the order the allocator scores them
TENSORS = ("lora_A", "lora_E", "lora_B")


@dataclass(frozen=True)
class AllocatorState:
    """What the allocator carries from one step to the next (PEFT's ``RankAllocator`` attributes).

    ``ipt``, ``exp_avg_ipt`` and ``exp_avg_unc`` map a module name to ``{"lora_A", "lora_E", "lora_B"}``
    arrays of the parameters' shapes (the last sensitivity ``I``, its EMA ``Ī`` and the uncertainty
    EMA ``Ū``); empty at the start and again after the final mask. ``rank_pattern`` holds the latest
    masks (module -> bool array ``(r,)``), frozen from step ``total_step - tfinal`` on.
    """

    ipt: dict = field(default_factory=dict)
    exp_avg_ipt: dict = field(default_factory=dict)
    exp_avg_unc: dict = field(default_factory=dict)
    rank_pattern: dict | None = None


class Allocation(NamedTuple):
    """What :func:`allocate` returns: unpack as ``state, masks, budget, threshold``."""

    state: AllocatorState
    #: module -> bool array (r,) to apply with :func:`apply_masks`; None on steps that mask nothing
    masks: dict | None
    #: the total rank budget of this step
    budget: int
    #: the masking threshold θ (E_i is zeroed where S_i <= θ); None when no new threshold was computed
    threshold: float | None


def _check_schedule(config: AdaLoraConfig) -> None:
    config.validate(source="adalora.allocate")
    if not isinstance(config.deltaT, int) or isinstance(config.deltaT, bool) or config.deltaT <= 0:
        raise ConfigError(f"adalora.allocate: deltaT must be a positive integer, got {config.deltaT!r}")
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"adalora.allocate: {name} must be in (0, 1), got {value!r} (PEFT asserts this too)")


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """``(budget, mask now?)`` at ``step`` (PEFT's ``RankAllocator.budget_schedule``).

    * ``t <= tinit``: ``init_bgt``, no mask (warm-up);
    * ``tinit < t <= T - tfinal``: ``int((init_bgt - target_bgt) · (1 - (t - ti)/(T - tf - ti))³ + target_bgt)``,
      mask when ``t % deltaT == 0`` (cubic decrease);
    * ``t > T - tfinal``: ``target_bgt``, mask (the frozen pattern).

    >>> from peftmath.methods.adalora import AdaLoraConfig
    >>> cfg = AdaLoraConfig(total_step=10, tinit=2, tfinal=3, deltaT=2)
    >>> [budget_schedule(t, init_bgt=24, target_bgt=16, config=cfg) for t in (2, 3, 4, 7, 8)]
    [(24, False), (20, False), (17, True), (16, False), (16, True)]
    """
    ti, tf, T = config.tinit, config.tfinal, config.total_step
    if step <= ti:
        return init_bgt, False
    if step > T - tf:
        return target_bgt, True
    coeff = 1 - (step - ti) / (T - tf - ti)
    return int((init_bgt - target_bgt) * (coeff**3) + target_bgt), step % config.deltaT == 0


def kthvalue(x: Array, k: int) -> Array:
    """The ``k``-th smallest element of the 1-D array ``x`` (1-based, ``torch.kthvalue``'s value).

    >>> import numpy as np
    >>> float(kthvalue(np.array([3.0, 1.0, 2.0, 1.0]), 2)), float(kthvalue(np.array([3.0, 1.0, 2.0]), 3))
    (1.0, 3.0)
    """
    xp = namespace(x)
    n = int(x.shape[0])
    if not 1 <= k <= n:
        raise ShapeError(f"kthvalue: k={k} is out of range for {n} values (1 <= k <= {n})")
    return xp.sort(x)[k - 1]


def _sensitivity(params: Mapping[str, Mapping[str, Array]], grads: Mapping[str, Mapping[str, Array]],
                 state: AllocatorState, beta1: float, beta2: float) -> AllocatorState:
    ipt, avg, unc = {}, {}, {}
    for module, p in params.items():
        if module not in grads:
            raise ShapeError(f"adalora.allocate: no gradients for module {module!r}")
        ipt[module], avg[module], unc[module] = {}, {}, {}
        for suffix in TENSORS:
            value, grad = p[suffix], grads[module].get(suffix)
            if grad is None:
                raise ShapeError(f"adalora.allocate: {module}: no gradient for {suffix}")
            check_shape(module, f"gradient of {suffix}", grad, tuple(value.shape))
            xp = namespace(value, grad, where=module)
            i = xp.abs(value * grad)
            prev_avg = state.exp_avg_ipt.get(module, {}).get(suffix)
            prev_unc = state.exp_avg_unc.get(module, {}).get(suffix)
            a = (1 - beta1) * i if prev_avg is None else beta1 * prev_avg + (1 - beta1) * i
            u = (1 - beta2) * xp.abs(i - a) if prev_unc is None else beta2 * prev_unc + (1 - beta2) * xp.abs(i - a)
            ipt[module][suffix], avg[module][suffix], unc[module][suffix] = i, a, u
    return AllocatorState(ipt, avg, unc, state.rank_pattern)


def triplet_scores(exp_avg_ipt: Mapping[str, Mapping[str, Array]],
                   exp_avg_unc: Mapping[str, Mapping[str, Array]]) -> dict[str, Array]:
    """Module -> ``S`` (r,): ``S_i = s(E)_i + (mean_j s(A)_{i,j} + mean_k s(B)_{k,i})`` with the
    element score ``s = Ī ⊙ Ū`` (summed in PEFT's order)."""
    out = {}
    for module, avg in exp_avg_ipt.items():
        unc = exp_avg_unc[module]
        xp = namespace(avg["lora_E"])
        score = {s: avg[s] * unc[s] for s in TENSORS}
        r = int(score["lora_E"].shape[0])
        out[module] = xp.reshape(score["lora_E"], (r,)) + (xp.mean(score["lora_A"], axis=1)
                                                           + xp.mean(score["lora_B"], axis=0))
    return out


def _mask_to_budget(scores: Mapping[str, Array], budget: int, init_bgt: int) -> tuple[dict, float]:
    xp = namespace(*scores.values())
    k = init_bgt - budget
    if k <= 0:  # PEFT's torch.kthvalue raises here; nothing needs pruning
        return {m: xp.logical_not(s <= -math.inf) for m, s in scores.items()}, -math.inf
    theta = kthvalue(xp.concat([scores[m] for m in scores]), k)
    return {m: xp.logical_not(s <= theta) for m, s in scores.items()}, float(theta)


def allocate(
    step: int,
    params: Mapping[str, Mapping[str, Array]],
    grads: Mapping[str, Mapping[str, Array]] | None,
    state: AllocatorState | None,
    config: AdaLoraConfig,
) -> Allocation:
    """One call of PEFT's ``AdaLoraModel.update_and_allocate(step)``, without side effects.

    Parameters
    ----------
    step
        The global step ``t`` (PEFT calls it after ``optimizer.step()``).
    params, grads
        Module -> ``{"lora_A": (r, in), "lora_E": (r, 1), "lora_B": (out, r)}``: the current
        parameters and their gradients (``grads`` is unused, and may be None, from ``T - tfinal`` on).
    state
        The previous :class:`AllocatorState` (None at the start).
    config
        ``total_step`` ``T``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``target_r``.

    Returns
    -------
    Allocation ``(state, masks, budget, threshold)``.

    Notes
    -----
    With ``init_bgt = Σ r`` over the modules and ``target_bgt = target_r · #modules``:

    1. ``t < T - tf``: for every parameter ``p`` with gradient ``g``: ``I = |p ⊙ g|``,
       ``Ī ← β1 Ī + (1-β1) I``, ``Ū ← β2 Ū + (1-β2) |I - Ī|`` (with the new ``Ī``). If the schedule
       masks at ``t`` (:func:`budget_schedule`): ``θ = kthvalue(all S, init_bgt - budget)`` over the
       :func:`triplet_scores` of every module and ``mask_i = not (S_i <= θ)``.
    2. ``t == T - tf``: no update; a forced mask to ``target_bgt`` with the current EMAs, which then
       become the frozen ``rank_pattern``; the EMAs are reset.
    3. ``t > T - tf``: the frozen masks are returned again (PEFT re-applies them every step).

    The masks zero ``E_i`` through :func:`apply_masks`. Unlike PEFT, a step whose budget equals
    ``init_bgt`` (``k = 0``) masks nothing instead of failing in ``torch.kthvalue``.
    """
    _check_schedule(config)
    state = state if state is not None else AllocatorState()
    for module, p in params.items():
        for suffix in TENSORS:
            if suffix not in p:
                raise ShapeError(f"adalora.allocate: {module}: missing {suffix}")
    init_bgt = sum(int(p["lora_A"].shape[0]) for p in params.values())
    target_bgt = config.target_r * len(params)
    final = config.total_step - config.tfinal
    budget, mask_now = budget_schedule(step, init_bgt=init_bgt, target_bgt=target_bgt, config=config)
    if step < final:
        if grads is None:
            raise ShapeError(f"adalora.allocate: step {step} < total_step - tfinal = {final} needs gradients")
        new = _sensitivity(params, grads, state, config.beta1, config.beta2)
        if not mask_now:
            return Allocation(new, None, budget, None)
        masks, theta = _mask_to_budget(triplet_scores(new.exp_avg_ipt, new.exp_avg_unc), budget, init_bgt)
        return Allocation(AllocatorState(new.ipt, new.exp_avg_ipt, new.exp_avg_unc, masks), masks, budget, theta)
    if step == final:
        missing = sorted(set(params) - set(state.exp_avg_ipt))
        if missing:
            raise ConfigError(
                f"adalora.allocate: the final mask at step {step} needs the sensitivity of every module, "
                f"but the state has none for {missing[:3]}; call allocate on the earlier steps first"
            )
        scores = triplet_scores({m: state.exp_avg_ipt[m] for m in params}, {m: state.exp_avg_unc[m] for m in params})
        masks, theta = _mask_to_budget(scores, budget, init_bgt)
        return Allocation(AllocatorState(rank_pattern=masks), masks, budget, theta)
    if state.rank_pattern is None:
        raise ConfigError(
            f"adalora.allocate: step {step} > total_step - tfinal = {final} re-applies the frozen rank pattern, "
            f"but the state has none; call allocate at step {final} first"
        )
    return Allocation(state, state.rank_pattern, budget, None)


def mask_list(mask: Any) -> list[bool]:
    """A rank mask (bool array or list) as a list of Python bools."""
    if isinstance(mask, (list, tuple)):
        return [bool(v) for v in mask]
    n = int(mask.shape[0])
    return [bool(mask[i]) for i in range(n)]


def apply_masks(params: Mapping[str, Mapping[str, Array]], masks: Mapping[str, Any]) -> dict[str, dict[str, Array]]:
    """New parameters with ``E_i = 0`` wherever ``masks[module][i]`` is False (PEFT's ``masked_fill_``).

    ``masks`` maps a module (or its ``"<module>.lora_E"`` key, as in a config's ``rank_pattern``)
    to a bool array or list of length r. Modules without a mask are passed through.
    """
    out = {}
    for module, p in params.items():
        mask = lookup_mask(masks, module)
        p = dict(p)
        if mask is not None:
            E = p["lora_E"]
            xp = namespace(E)
            r = int(E.shape[0])
            if isinstance(mask, (list, tuple)):
                mask = xp.asarray(mask_list(mask), dtype=xp.bool, device=array_api_compat.device(E))
            if tuple(mask.shape) != (r,):
                raise ShapeError(f"{module}: rank mask has {tuple(mask.shape)} entries, lora_E has r={r}")
            p["lora_E"] = xp.where(xp.reshape(mask, (r, 1)), E, xp.zeros_like(E))
        out[module] = p
    return out


def resize_by_rank_pattern(params: Mapping[str, Mapping[str, Array]],
                           rank_pattern: Mapping[str, Any]) -> dict[str, dict[str, Array]]:
    """What PEFT does when it saves: keep the rows of ``lora_A`` and ``lora_E`` and the columns of
    ``lora_B`` whose mask entry is True (``AdaLoraModel.resize_state_dict_by_rank_pattern``).

    >>> import numpy as np
    >>> p = {"q": {"lora_A": np.arange(6.0).reshape(3, 2), "lora_E": np.ones((3, 1)), "lora_B": np.eye(3)}}
    >>> out = resize_by_rank_pattern(p, {"q.lora_E": [True, False, True]})
    >>> out["q"]["lora_A"], out["q"]["lora_B"].shape
    (array([[0., 1.],
           [4., 5.]]), (3, 2))
    """
    out = {}
    for module, p in params.items():
        mask = lookup_mask(rank_pattern, module)
        p = dict(p)
        if mask is not None:
            keep = mask_list(mask)
            r = int(p["lora_A"].shape[0])
            if len(keep) != r:
                raise ShapeError(f"{module}: rank mask has {len(keep)} entries but lora_A has r={r} rows")
            if sum(keep) != r:
                xp = namespace(p["lora_A"])
                idx = xp.asarray([i for i, k in enumerate(keep) if k], dtype=xp.int64,
                                 device=array_api_compat.device(p["lora_A"]))
                p["lora_A"] = xp.take(p["lora_A"], idx, axis=0)
                p["lora_E"] = xp.take(p["lora_E"], idx, axis=0)
                p["lora_B"] = xp.take(p["lora_B"], idx, axis=1)
        out[module] = p
    return out


def rank_pattern_for_config(masks: Mapping[str, Any]) -> dict[str, list[bool]]:
    """Masks by module as the config's ``rank_pattern`` as PEFT saves it: ``{"<module>.lora_E": [bool]}``.

    >>> import numpy as np
    >>> rank_pattern_for_config({"layers.0.q": np.array([True, False])})
    {'layers.0.q.lora_E': [True, False]}
    """
    return {(m if m.endswith(".lora_E") else f"{m}.lora_E"): mask_list(v) for m, v in masks.items()}


def orthogonal_regularizer(params: Mapping[str, Mapping[str, Array]]) -> Array:
    """AdaLoRA's regulariser ``R = mean over {A, B} of every module of ‖C − I‖_F``, with ``C = A Aᵀ``
    for ``lora_A`` and ``C = Bᵀ B`` for ``lora_B`` (both r × r); PEFT adds ``orth_reg_weight · R``
    to the loss. Returns a 0-d array in the parameters' dtype (0 for no modules).

    >>> import numpy as np
    >>> p = {"q": {"lora_A": np.eye(2, 3), "lora_E": np.zeros((2, 1)), "lora_B": 2 * np.eye(3, 2)}}
    >>> float(orthogonal_regularizer(p))    # (‖0‖ + ‖3 I₂‖) / 2
    2.1213203435596424
    """
    arrays = [a for p in params.values() for a in (p["lora_A"], p["lora_B"])]
    if not arrays:
        return 0.0
    xp = namespace(*arrays)
    total = None
    for p in params.values():
        for suffix in ("lora_A", "lora_B"):
            P = p[suffix]
            C = xp.matmul(P, xp.matrix_transpose(P)) if suffix == "lora_A" else xp.matmul(xp.matrix_transpose(P), P)
            eye = xp.eye(int(C.shape[0]), dtype=C.dtype, device=array_api_compat.device(C))
            term = xp.sqrt(xp.sum((C - eye) ** 2))
            total = term if total is None else total + term
    return total / len(arrays)


def lookup_mask(pattern: Mapping[str, Any] | None, module_name: str) -> Any:
    """The entry of ``module_name`` in a rank pattern keyed ``"<module>"``, ``"<module>.lora_E"`` or, as PEFT
    keeps it in memory, ``"<module>.lora_E.<adapter>"``; None when there is none.

    >>> lookup_mask({"q.lora_E.default": [True]}, "q"), lookup_mask({"k.lora_E": [False]}, "q")
    ([True], None)
    """
    if not pattern:
        return None
    for key in (module_name, f"{module_name}.lora_E"):
        if key in pattern:
            return pattern[key]
    prefix = f"{module_name}.lora_E."
    for key, value in pattern.items():  # PEFT's in-memory keys carry the adapter name: "<m>.lora_E.default"
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            return value
    return None
