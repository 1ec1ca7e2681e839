r"""Poly (Polytropon, Ponti et al., 2022, arXiv:2202.13914) and Multi-Head Routing (Caccia et al., 2022,
arXiv:2211.03831): a task-conditioned mixture of LoRA "skills".

Each adapted Linear holds ``n_skills`` LoRA skills, each cut into ``n_splits`` blocks (the heads of MHR), and
a router with one row of logits per task::

    A: (n_splits, n_skills, in/n_splits, r)     B: (n_splits, n_skills, r, out/n_splits)
    Z: (n_tasks, n_splits·n_skills)              the router's logits (``poly_router.module_logits``)
    w_t = σ(Z_t) / (Σ_skills σ(Z_t) + 1e-12)     (n_splits, n_skills), per split normalised over the skills
    A_t[q] = Σ_s w_t[q, s] A[q, s]  -> stacked over the splits: (in, r)   (split q reads input block q)
    B_t[q] = Σ_s w_t[q, s] B[q, s]  -> side by side over the splits: (r, out) (split q writes output block q)
    y = x Wᵀ + b + (x A_t B_t) / r               t = the task id of x's batch row

The adapter's change depends on the task id of each batch row, an input of the forward, so Poly has in general no
fixed weight: merge and unmerge refuse (:class:`~peftmath.errors.UnsupportedError`), except where the change is
the same for every valid input (``n_tasks = 1``; a zero skill bank, e.g. a fresh adapter). For one task (or any fixed
mixing weights) the change is the rank-``r`` LoRA ``ΔW_t = (1/r) B_tᵀ A_tᵀ``: :func:`task_factors` gives its
factors and :func:`fixed_mixture` a LoRA adapter (``lora_alpha = 1``) that merges to exactly that task's
forward; :func:`expert` is one skill alone.

Checkpoint (PEFT's keys): ``<module>.poly_lora_A``, ``<module>.poly_lora_B``,
``<module>.poly_router.module_logits``. The router here is PEFT's evaluation router (sigmoid); in training
PEFT samples a relaxed Bernoulli instead, which is noise, not a weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_positive_int
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, require_kind
from ._contract import Method

Array = Any

__all__ = ["PolyConfig", "mixing_weights", "task_factors", "adapter_output", "forward", "init_module",
           "fixed_mixture", "expert", "PolyModule"]

PEFT_TYPE = "POLY"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
_A, _B, _Z = "poly_lora_A", "poly_lora_B", "poly_router.module_logits"
#: PEFT's ``EPS`` in the router's normalisation
EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Config (specs/poly.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class PolyConfig(TunerConfig):
    """PEFT's ``PolyConfig`` (``peft_type: "POLY"``), PEFT's names and defaults."""

    peft_type: ClassVar[str] = "POLY"
    absent_fields: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")

    r: int = 8
    init_weights: bool = True
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            check_positive_int(source, name, getattr(self, name))
        if self.poly_type != "poly":
            raise ConfigError(f"{source}: field 'poly_type' must be 'poly' (PEFT 0.21.2's only router), "
                              f"got {self.poly_type!r}")
        check_flags(source, self, "init_weights")


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "Poly", SUPPORTED_KINDS, peft="PEFT's Poly wraps nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Shapes and the router (specs/poly.md, "2. Shapes and the router")
# --------------------------------------------------------------------------------------------------
def _check(A: Array, B: Array, Z: Array, where: str) -> tuple[int, int, int, int, int, int]:
    """``(n_splits, n_skills, r, in, out, n_tasks)`` from the three tensors; ShapeError when they disagree."""
    if A.ndim != 4 or B.ndim != 4 or Z.ndim != 2:
        raise ShapeError(f"{where}: poly_lora_A {tuple(A.shape)} and poly_lora_B {tuple(B.shape)} must be 4-D and "
                         f"poly_router.module_logits {tuple(Z.shape)} 2-D")
    ns, nk, din, r = (int(s) for s in A.shape)
    if tuple(int(s) for s in B.shape[:3]) != (ns, nk, r):
        raise ShapeError(f"{where}: poly_lora_B {tuple(B.shape)} must be (n_splits, n_skills, r, out/n_splits) = "
                         f"({ns}, {nk}, {r}, …) to match poly_lora_A {tuple(A.shape)}")
    if int(Z.shape[1]) != ns * nk:
        raise ShapeError(f"{where}: poly_router.module_logits {tuple(Z.shape)} must have n_splits·n_skills = "
                         f"{ns}·{nk} = {ns * nk} columns")
    return ns, nk, r, ns * din, ns * int(B.shape[3]), int(Z.shape[0])


def _task_list(task_ids: Any, n_tasks: int, where: str) -> list[int]:
    """The task ids as Python ints (an int, a sequence or a 1-D array), each in ``[0, n_tasks)``."""
    if isinstance(task_ids, (int, np.integer)) and not isinstance(task_ids, bool):
        ids = [int(task_ids)]
    else:
        if task_ids is None:
            raise ConfigError(f"{where}: Poly needs task_ids (one task id per batch row; PEFT refuses None too)")
        shape = getattr(task_ids, "shape", None)
        if shape is not None and len(shape) != 1:
            raise ShapeError(f"{where}: task_ids must be 1-D (one id per batch row), got shape {tuple(shape)}")
        try:
            ids = [int(t) for t in task_ids]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: task_ids must be integers, got {task_ids!r}") from None
    bad = [t for t in ids if not 0 <= t < n_tasks]
    if bad:
        raise ConfigError(f"{where}: task ids {bad} are outside [0, {n_tasks}) (the router has n_tasks={n_tasks} "
                          f"rows of logits)")
    return ids


def mixing_weights(module_logits: Array, task_ids: Any, n_splits: int) -> Array:
    """PEFT's evaluation router: ``w = σ(Z_t) / (Σ_skills σ(Z_t) + 1e-12)`` ``(batch, n_splits, n_skills)``
    for ``task_ids`` (an int or one id per batch row), in float32 or wider.

    >>> import numpy as np
    >>> mixing_weights(np.zeros((1, 4)), [0], n_splits=1).round(6).tolist()
    [[[0.25, 0.25, 0.25, 0.25]]]
    """
    xp = namespace(module_logits, where="poly.mixing_weights")
    n_tasks, cols = int(module_logits.shape[0]), int(module_logits.shape[1])
    if n_splits < 1 or cols % n_splits:
        raise ShapeError(f"poly.mixing_weights: {cols} logits per task do not split into n_splits={n_splits}")
    ids = _task_list(task_ids, n_tasks, "poly.mixing_weights")
    Z = as_compute(xp, module_logits, compute_dtype(xp, module_logits.dtype))
    rows = xp.stack([Z[t, :] for t in ids], axis=0)
    s = 1.0 / (1.0 + xp.exp(-xp.reshape(rows, (len(ids), n_splits, cols // n_splits))))
    return s / (xp.sum(s, axis=-1, keepdims=True) + EPS)


def task_factors(weights: Array, A: Array, B: Array) -> tuple[Array, Array]:
    """The mixed LoRA of each batch row: ``(A_t (batch, in, r), B_t (batch, r, out))`` from mixing weights
    ``(batch, n_splits, n_skills)`` (:func:`mixing_weights`): split ``q`` of ``A_t`` is ``Σ_s w[q, s] A[q, s]``,
    stacked over the input; split ``q`` of ``B_t`` is ``Σ_s w[q, s] B[q, s]``, side by side over the output."""
    xp = namespace(weights, A, B, where="poly.task_factors")
    cd = compute_dtype(xp, weights.dtype, A.dtype, B.dtype)
    w = as_compute(xp, weights, cd)
    bs, ns, nk = (int(s) for s in w.shape)
    if tuple(int(s) for s in A.shape[:2]) != (ns, nk) or tuple(int(s) for s in B.shape[:2]) != (ns, nk):
        raise ShapeError(f"poly.task_factors: mixing weights {tuple(w.shape)} do not fit poly_lora_A "
                         f"{tuple(A.shape)} / poly_lora_B {tuple(B.shape)} (n_splits, n_skills first)")
    r = int(A.shape[3])
    Am = xp.sum(w[:, :, :, None, None] * as_compute(xp, A, cd)[None, ...], axis=2)  # (bs, ns, in/ns, r)
    Bm = xp.sum(w[:, :, :, None, None] * as_compute(xp, B, cd)[None, ...], axis=2)  # (bs, ns, r, out/ns)
    A_t = xp.reshape(Am, (bs, ns * int(A.shape[2]), r))
    B_t = xp.reshape(xp.permute_dims(Bm, (0, 2, 1, 3)), (bs, r, ns * int(B.shape[3])))
    return A_t, B_t


# --------------------------------------------------------------------------------------------------
# Forward (specs/poly.md, "3. Forward")
# --------------------------------------------------------------------------------------------------
def adapter_output(x: Array, A: Array, B: Array, module_logits: Array, task_ids: Any) -> Array:
    """The adapter's term ``(x A_t B_t) / r`` for ``x (batch, …, in)``, row ``i`` with task ``task_ids[i]``
    (an int: every row), in float32 or wider."""
    xp = namespace(x, A, B, module_logits, where="poly.adapter_output")
    ns, _, r, inn, out, _ = _check(A, B, module_logits, "poly.adapter_output")
    if x.ndim < 2 or int(x.shape[-1]) != inn:
        raise ShapeError(f"poly.adapter_output: x {tuple(x.shape)} must be (batch, …, {inn}) (PEFT multiplies "
                         f"batch row by batch row)")
    w = mixing_weights(module_logits, task_ids, ns)
    bs = int(x.shape[0])
    if int(w.shape[0]) == 1 and bs != 1:
        w = xp.broadcast_to(w, (bs, *w.shape[1:]))
    if int(w.shape[0]) != bs:
        raise ShapeError(f"poly.adapter_output: {int(w.shape[0])} task ids for a batch of {bs} rows of x "
                         f"{tuple(x.shape)}")
    A_t, B_t = task_factors(w, A, B)
    cd = compute_dtype(xp, x.dtype, A_t.dtype)
    x3 = xp.reshape(as_compute(xp, x, cd), (bs, -1, inn))
    y = xp.matmul(xp.matmul(x3, A_t), B_t) / r
    return xp.reshape(y, (*x.shape[:-1], out))


def forward(x: Array, W: Array, A: Array, B: Array, module_logits: Array, task_ids: Any, *,
            bias: Array | None = None, peft_compat: bool = False) -> Array:
    """The adapted Linear ``x Wᵀ + b + (x A_t B_t) / r`` (the task of each batch row of ``x`` from ``task_ids``),
    computed in float32 (float64 for float64 inputs) and rounded once to the result type of ``x`` and ``W``;
    ``peft_compat=True`` rounds the base output first, then adds the rounded term, as PEFT does."""
    xp = namespace(x, W, A, B, module_logits, bias, where="poly.forward")
    lay, _ = Layer.for_weight(None, W).for_input(x, "poly.forward")
    _check_kind(lay, "poly.forward")
    lay.check_bias(bias)
    _, _, _, inn, out, _ = _check(A, B, module_logits, "poly.forward")
    if (out, inn) != lay.weight_shape:
        raise ShapeError(f"poly.forward: poly_lora_A {tuple(A.shape)} and poly_lora_B {tuple(B.shape)} fit a Linear "
                         f"({out}, {inn}), not the base weight {tuple(W.shape)}")
    delta = adapter_output(x, A, B, module_logits, task_ids)
    cd = compute_dtype(xp, delta.dtype, W.dtype)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    base = lay.base_forward(as_compute(xp, x, cd), as_compute(xp, W, cd),
                            None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
        delta = as_compute(xp, as_compute(xp, delta, out_dtype), cd)
    return as_compute(xp, base + delta, out_dtype)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/poly.md, "4. Initialisation")
# --------------------------------------------------------------------------------------------------
def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    if xp is None:
        import array_api_compat.numpy as xp
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


def init_module(config: PolyConfig, layer: Layer, *, seed: int | np.random.Generator | None = 0,
                init_weights: bool | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """One module's tensors as PEFT draws them: each ``A[q, s]`` is the transpose of a Kaiming-uniform
    ``(r, in/n_splits)`` draw (``U(±1/sqrt(in/n_splits))``); ``B`` zero (``init_weights=True``: a no-op) or each
    ``B[q, s]`` the transpose of a Kaiming-uniform ``(out/n_splits, r)`` draw (``U(±1/sqrt(r))``); the logits
    ``U(−1e-3, 1e-3)``. Drawn on the host in that order."""
    _check_kind(layer, "poly.init_module")
    flag = config.init_weights if init_weights is None else init_weights
    ns, nk, r = config.n_splits, config.n_skills, config.r
    if layer.in_features % ns or layer.out_features % ns:
        raise ShapeError(f"poly.init_module: n_splits={ns} must divide in_features={layer.in_features} and "
                         f"out_features={layer.out_features} (PEFT's reshape needs it)")
    din, dout = layer.in_features // ns, layer.out_features // ns
    rng = host_rng(seed)
    b = kaiming_uniform_bound(din)
    A = np.empty((ns, nk, din, r))
    for s in range(nk):  # PEFT's order: skills outside, splits inside
        for q in range(ns):
            A[q, s] = rng.uniform(-b, b, (r, din)).T
    B = np.zeros((ns, nk, r, dout))
    if not flag:
        b = kaiming_uniform_bound(r)
        for s in range(nk):
            for q in range(ns):
                B[q, s] = rng.uniform(-b, b, (dout, r)).T
    Z = rng.uniform(-1e-3, 1e-3, (config.n_tasks, ns * nk))
    return {_A: _put(A, xp, device, dtype), _B: _put(B, xp, device, dtype), _Z: _put(Z, xp, device, dtype)}


# --------------------------------------------------------------------------------------------------
# Fixed mixtures as LoRA (specs/poly.md, "5. Merge: refused; a fixed mixture is a LoRA")
# --------------------------------------------------------------------------------------------------
def _lora_of(A_t: Array, B_t: Array) -> dict[str, Array]:
    xp = namespace(A_t, B_t)
    return {"lora_A.weight": xp.matrix_transpose(A_t), "lora_B.weight": xp.matrix_transpose(B_t)}


def _to_lora(adapter: Any, factors: Mapping[str, tuple[Array, Array]]) -> Any:
    """A LoRA adapter of the same class as ``adapter`` (``r``, ``lora_alpha = 1``: scaling ``1/r``) holding
    ``factors``: module -> ``(A_t (in, r), B_t (r, out))``."""
    from .lora import LoraConfig  # a LoRA is what a fixed mixture is; imported only when one is asked for

    cfg = adapter.config
    lora = LoraConfig(r=cfg.r, lora_alpha=1, target_modules=sorted(factors),
                      base_model_name_or_path=cfg.base_model_name_or_path)
    params = {m: _lora_of(a, b) for m, (a, b) in factors.items()}
    return type(adapter)(lora, params, layer_kinds=getattr(adapter, "layer_kinds", None),
                         model_type=getattr(adapter, "model_type", None))


def _require_poly(adapter: Any, where: str) -> None:
    if getattr(adapter.config, "peft_type", None) != PEFT_TYPE:
        raise ConfigError(f"{where}: expects a Poly adapter, got {getattr(adapter.config, 'peft_type', adapter)!r}")


def fixed_mixture(adapter: Any, task_id: int | None = None, *, weights: Array | None = None) -> Any:
    """The LoRA adapter (same class as ``adapter``, ``r`` = Poly's ``r``, ``lora_alpha = 1``) whose merge equals
    the Poly forward for task ``task_id``: per module ``lora_A = A_tᵀ``, ``lora_B = B_tᵀ`` (:func:`task_factors`
    with that module's router), so ``ΔW = (1/r) B_tᵀ A_tᵀ``. ``weights`` ``(n_splits, n_skills)`` instead of a
    task id fixes the same mixing weights in every module (:func:`expert` is a one-hot row)."""
    _require_poly(adapter, "poly.fixed_mixture")
    if (task_id is None) == (weights is None):
        raise ConfigError("poly.fixed_mixture: give exactly one of task_id (each module's router decides) or "
                          "weights (n_splits, n_skills), the same mixture in every module")
    factors = {}
    for m, p in adapter.params.items():
        A, B, Z = p[_A], p[_B], p[_Z]
        ns, nk, *_ = _check(A, B, Z, f"poly.fixed_mixture: {m}")
        if weights is None:
            w = mixing_weights(Z, [task_id], ns)
        else:
            xp = namespace(A)
            w = xp.asarray(weights, dtype=compute_dtype(xp, A.dtype), device=getattr(A, "device", None))
            if tuple(int(s) for s in w.shape) != (ns, nk):
                raise ShapeError(f"poly.fixed_mixture: {m}: weights {tuple(w.shape)} must be (n_splits, n_skills) = "
                                 f"({ns}, {nk})")
            w = w[None, ...]
        A_t, B_t = task_factors(w, A, B)
        factors[m] = (as_compute(namespace(A), A_t[0, ...], A.dtype), as_compute(namespace(A), B_t[0, ...], A.dtype))
    return _to_lora(adapter, factors)


def expert(adapter: Any, skill: int) -> Any:
    """Skill ``skill`` of every module alone as a LoRA adapter (:func:`fixed_mixture` with weight 1 on that skill
    in every split): ``ΔW = (1/r) B_sᵀ A_sᵀ`` with the splits of skill ``s`` put together."""
    _require_poly(adapter, "poly.expert")
    ns, nk = adapter.config.n_splits, adapter.config.n_skills
    if not 0 <= int(skill) < nk:
        raise ConfigError(f"poly.expert: skill {skill} is outside [0, n_skills={nk})")
    onehot = np.zeros((ns, nk), dtype=np.float64)
    onehot[:, int(skill)] = 1.0
    return fixed_mixture(adapter, weights=onehot)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class PolyModule(ModuleAdapter):
    """Poly on one nn.Linear: ``poly_lora_A (n_splits, n_skills, in/n_splits, r)``, ``poly_lora_B (n_splits,
    n_skills, r, out/n_splits)``, ``poly_router.module_logits (n_tasks, n_splits·n_skills)``."""

    peft_type = "POLY"
    supported_kinds = SUPPORTED_KINDS
    #: no fixed delta: the mixture depends on the task ids given with the input
    additive: ClassVar[bool] = False

    @classmethod
    def initialize(cls, name: str, config: PolyConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """One module's tensors (:func:`init_module`); the base weight is not changed."""
        _check_kind(layer, name)
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        if xp is None and weight is not None:
            xp = namespace(weight)
        return init_module(config, layer, seed=seed, init_weights=flag, xp=xp, device=device, dtype=dtype), None

    @classmethod
    def infer_layer(cls, name: str, config: PolyConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear ``(out, in)`` from the split sizes of ``poly_lora_A`` / ``poly_lora_B``."""
        if _A not in params or _B not in params:
            raise ShapeError(f"{name}: Poly needs {_A}, {_B} and {_Z}, found {sorted(params)}")
        A, B = params[_A], params[_B]
        shape = (int(B.shape[0]) * int(B.shape[-1]), int(A.shape[0]) * int(A.shape[2]))
        return Layer.of(tuple(int(s) for s in weight_shape) if weight_shape is not None else shape,
                        kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        missing = sorted({_A, _B, _Z} - set(self.params))
        extra = sorted(set(self.params) - {_A, _B, _Z})
        if missing or extra:
            raise ShapeError(f"{self.name}: Poly has exactly {_A}, {_B}, {_Z}; missing {missing}, unexpected {extra}")
        self.A, self.B, self.Z = self.params[_A], self.params[_B], self.params[_Z]
        ns, nk, r, inn, out, nt = _check(self.A, self.B, self.Z, self.name)
        if (out, inn) != self.layer.weight_shape:
            raise ShapeError(f"{self.name}: poly_lora_A {tuple(self.A.shape)} and poly_lora_B {tuple(self.B.shape)} "
                             f"fit a Linear ({out}, {inn}), not the base weight {self.layer.weight_shape}")
        cfg = self.config
        if (ns, nk, r, nt) != (cfg.n_splits, cfg.n_skills, cfg.r, cfg.n_tasks):
            raise ShapeError(f"{self.name}: the tensors have n_splits={ns}, n_skills={nk}, r={r}, n_tasks={nt} but "
                             f"the config says n_splits={cfg.n_splits}, n_skills={cfg.n_skills}, r={cfg.r}, "
                             f"n_tasks={cfg.n_tasks}; does the config belong to this checkpoint?")

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.A.shape[3]), "n_skills": int(self.A.shape[1]), "n_splits": int(self.A.shape[0]),
                "n_tasks": int(self.Z.shape[0])}

    def _refuse(self, what: str) -> UnsupportedError:
        return UnsupportedError(
            f"{self.name}: Poly cannot be {what}: its router mixes the n_skills={int(self.A.shape[1])} LoRA skills "
            f"with weights chosen by the task id of each input row (n_tasks={int(self.Z.shape[0])}), so the change "
            f"depends on the input and is no fixed weight (PEFT has no merge for Poly either). Use forward(x, W, "
            f"task_ids=...), or make the mixture of one task a LoRA adapter with "
            f"peftmath.methods.poly.fixed_mixture(adapter, task_id) (one skill: poly.expert(adapter, s)) and merge "
            f"that")

    def _fixed_delta(self, what: str, cd: Any = None) -> Array:
        """``ΔW`` when it is the same for every valid input: one task (``n_tasks = 1``: ``ΔW_0``), or all of ``A`` or
        ``B`` zero (a fresh adapter: ``ΔW = 0`` for every task); else :class:`UnsupportedError` (:meth:`_refuse`)."""
        xp = self.xp
        cd = cd if cd is not None else compute_dtype(xp, self.A.dtype, self.B.dtype)
        if int(self.Z.shape[0]) == 1:
            return as_compute(xp, self.task_delta_weight(0), cd)
        if not bool(xp.any(self.B != 0)) or not bool(xp.any(self.A != 0)):
            return xp.zeros(self.layer.weight_shape, dtype=cd, device=getattr(self.A, "device", None))
        raise self._refuse(what)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW`` where it is fixed (:meth:`_fixed_delta`); refused otherwise (:meth:`task_delta_weight` gives one
        task's)."""
        return self._fixed_delta("written as one delta weight")

    def task_delta_weight(self, task_id: int) -> Array:
        """``ΔW_t = (1/r) B_tᵀ A_tᵀ`` ``(out, in)``: the change for task ``task_id``, in float32 or wider."""
        w = mixing_weights(self.Z, [task_id], int(self.A.shape[0]))
        A_t, B_t = task_factors(w, self.A, self.B)
        return self.xp.matrix_transpose(self.xp.matmul(A_t[0, ...], B_t[0, ...])) / int(self.A.shape[3])

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + ΔW`` where the change is fixed (one task, or a zero skill bank), formed in float32 (float64) and
        rounded once; otherwise :class:`UnsupportedError` (nothing written): see :func:`fixed_mixture`."""
        self.layer.check_weight(weight)
        d = self._fixed_delta("merged", compute_dtype(self.xp, weight.dtype, self.A.dtype, self.B.dtype))
        return MergeResult(apply_delta(self.name, weight, d, copy=copy, safe=safe, layer=self.layer), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W − ΔW`` under the same condition as :meth:`merge` (its inverse up to rounding)."""
        self.layer.check_weight(weight)
        d = self._fixed_delta("unmerged", compute_dtype(self.xp, weight.dtype, self.A.dtype, self.B.dtype))
        return MergeResult(apply_delta(self.name, weight, d, sign=-1, copy=copy, layer=self.layer), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, task_ids: Any = None,
                peft_compat: bool = False, **layer_kwargs: Any) -> Array:
        """:func:`forward` with this module's tensors; ``task_ids``: one id per batch row (an int: all rows); None
        with ``n_tasks = 1`` means task 0 (the only one; PEFT still asks for it)."""
        self.input_layer(x, weight, layer_kwargs)
        if task_ids is None and int(self.Z.shape[0]) == 1:
            task_ids = 0
        return forward(x, weight, self.A, self.B, self.Z, task_ids, bias=bias, peft_compat=peft_compat)


    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``B → c·B`` (the adapter's term is linear in ``B``, for every mixture)."""
        return self if c == 1.0 else self.scale_parameter(_B, lambda b: c * b)


#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = (_A, _B, _Z)
Config = PolyConfig
Module = PolyModule
#: demo rows: one task (the only case with a fixed weight, so the contract tests can merge it), MHR splits
EXAMPLES: dict[str, dict[str, Any]] = {
    "poly-1task-mhr": {"r": 4, "n_skills": 3, "n_splits": 2, "init_weights": False},
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PolyConfig, module=PolyModule, spec="specs/poly.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=PolyModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, forward_only=True,
)

