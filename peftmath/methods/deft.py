r"""DEFT: decompositional efficient fine-tuning (residual projection and injection), with PaRa as its special case.

For a frozen ``W`` (logical ``(out, in)``), DEFT learns a projection direction ``P (out, r)`` and an injection
``R (r, in)`` and uses::

    W' = (I − Q Hᵀ) W + s·Q R            ΔW = W' − W = Q (s·R − Hᵀ W)          (r ≤ out)

    relu (default):  Q = P,        H = relu(P)      (a non-orthogonal projector P relu(P)ᵀ)
    qr:              Q = qr(P).Q,  H = Q            (the orthogonal projector Q Qᵀ)
    para=True:       no R:  ΔW = −Q Hᵀ W             (PaRa: pure subspace removal)

with ``s = alpha / r`` when ``alpha`` is set (else 1). ``ΔW`` depends on ``W`` through the ``r × in`` factor
``M = Hᵀ W``: merge returns ``M`` as its record (as PEFT caches it) and unmerge with it is exact up to rounding.
Without the record, the relu projector's ``M`` is recovered from ``W'`` by an ``r × r`` solve when
``I − HᵀQ`` is well conditioned; the qr projector is idempotent (``I − QᵀQ = 0``) and the removed component is
gone, so that is refused. PEFT supports nn.Linear and transformers Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, eps, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_number, check_positive_int
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape, require_kind

Array = Any

__all__ = ["DeftConfig", "scaling_for", "projector_factors", "removed_factor", "delta_weight", "forward",
           "recover_factor", "init_weights", "DeftModule"]

PEFT_TYPE = "DEFT"
_P, _R = "deft_P", "deft_R"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
#: the largest amplification ``max(1, σ_max)/σ_min·u`` of ``I − HᵀQ`` an unmerge without the record accepts
UNMERGE_AMPLIFICATION_LIMIT = 1e-3


# --------------------------------------------------------------------------------------------------
# Config (specs/deft.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class DeftConfig(TunerConfig):
    """PEFT's ``DeftConfig`` (``peft_type: "DEFT"``), PEFT's names and defaults.

    ``r``: the rank (capped at each layer's ``out``; the saved ``deft_P`` holds the capped rank);
    ``decomposition_method``: ``"relu"`` or ``"qr"``; ``alpha``: the injection scale ``alpha / r`` (None or
    0: 1, as PEFT); ``para``: no injection (PaRa); ``init_weights`` / ``init_scale``: how ``R`` starts.
    """

    peft_type: ClassVar[str] = "DEFT"

    r: int = 8
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: int | float | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    bias: str = "none"

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_choice(source, "decomposition_method", self.decomposition_method, ("relu", "qr"))
        check_number(source, "init_scale", self.init_scale)
        if self.alpha is not None:
            check_number(source, "alpha", self.alpha)
        check_number(source, "deft_dropout", self.deft_dropout)
        check_flags(source, self, "para", "fan_in_fan_out", "init_weights")
        check_choice(source, "bias", self.bias, ("none", "all", "deft_only"))


def scaling_for(alpha: float | None, r: int) -> float:
    """The injection scale ``s``: ``alpha / r`` for a non-zero ``alpha``, else 1 (PEFT's ``if config.alpha``).

    >>> scaling_for(16, 8), scaling_for(None, 8), scaling_for(0, 8)
    (2.0, 1.0, 1.0)
    """
    return float(alpha) / int(r) if alpha else 1.0


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "DEFT", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# The projector (specs/deft.md, "3. The projector")
# --------------------------------------------------------------------------------------------------
def projector_factors(P: Array, method: str, *, dtype: Any = None, where: str = "deft") -> tuple[Array, Array]:
    """``(Q, H)`` with the projector ``Q Hᵀ``: relu ``(P, relu(P))``, qr ``(Q, Q)`` with ``Q`` the reduced
    Householder QR factor of ``P`` (``xp.linalg.qr``: LAPACK's signs, as torch's), in ``dtype``.

    >>> import numpy as np
    >>> Q, H = projector_factors(np.array([[1.0], [-2.0]]), "relu")
    >>> H.tolist()
    [[1.0], [0.0]]
    """
    xp = namespace(P, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, P.dtype)
    Pc = as_compute(xp, P, cd)
    if method == "relu":
        return Pc, xp.maximum(Pc, xp.zeros((), dtype=cd))
    if method == "qr":
        try:
            Q, _ = xp.linalg.qr(Pc, mode="reduced")
        except NotImplementedError as exc:  # dask: a QR of a matrix chunked along its columns
            raise UnsupportedError(
                f"{where}: DEFT's qr projector needs the QR of deft_P {tuple(P.shape)}, which this array library "
                f"cannot compute for this layout ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); for dask, "
                f"keep deft_P in one chunk along its columns (P.rechunk({{1: -1}})) or use NumPy") from exc
        return Q, Q
    raise ConfigError(f"{where}: decomposition_method must be 'relu' or 'qr', got {method!r}")


def removed_factor(weight: Array, H: Array, layer: Layer, *, dtype: Any = None) -> Array:
    """``M = Hᵀ W`` ``(r, in)``: the only part of ``ΔW`` that depends on ``W`` (PEFT's merge cache).

    A skinny product (``r ≪ out``) whose BLAS call is fast in one orientation only, and NumPy and torch map the
    same ``matmul`` to opposite ones (measured on Linear(4096, 4096), r = 2: NumPy ``(Wᵀ H)ᵀ`` ~35-70 ms,
    ``Hᵀ W`` ~190-280 ms; torch the reverse, ``Hᵀ W`` ~55-90 ms, ``(Wᵀ H)ᵀ`` ~380 ms): torch tensors take
    ``Hᵀ W``, every other library ``(Wᵀ H)ᵀ``. The same numbers either way."""
    xp = namespace(weight, H)
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype, H.dtype)
    Hc, Wm = as_compute(xp, H, cd), as_compute(xp, layer.as_matrix(weight, xp), cd)
    if array_api_compat.is_torch_array(Wm):
        return xp.matmul(xp.matrix_transpose(Hc), Wm)
    return xp.matrix_transpose(xp.matmul(xp.matrix_transpose(Wm), Hc))


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/deft.md, "4. Delta weight")
# --------------------------------------------------------------------------------------------------
def _injection_minus(xp: Any, R: Array | None, M: Array, scaling: float, cd: Any) -> Array:
    """``D = s·R − M`` ``(r, in)`` (``−M`` for PaRa)."""
    return -M if R is None else as_compute(xp, R, cd) * scaling - M


def delta_weight(weight: Array, P: Array, R: Array | None, *, method: str = "relu", scaling: float = 1.0,
                 layer: Any = None, record: Array | None = None, dtype: Any = None, where: str = "deft") -> Array:
    """``ΔW = Q (s·R − Hᵀ W)`` in ``weight``'s stored layout and the compute dtype; ``R=None`` is PaRa
    (``−Q Hᵀ W``). ``record`` is ``M = Hᵀ W`` of an earlier merge (then ``weight`` is not read).

    >>> import numpy as np
    >>> W = np.eye(2); P = np.array([[1.0], [0.0]])
    >>> (W + delta_weight(W, P, None)).tolist()   # PaRa removes the first row's subspace
    [[0.0, 0.0], [0.0, 1.0]]
    """
    xp = namespace(weight, P, R, where=where)
    lay = Layer.for_weight(layer, weight)
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype, P.dtype)
    Q, H = projector_factors(P, method, dtype=cd, where=where)
    M = removed_factor(weight, H, lay, dtype=cd) if record is None else as_compute(xp, record, cd)
    return lay.from_matrix(xp.matmul(Q, _injection_minus(xp, R, M, scaling, cd)), xp)


# --------------------------------------------------------------------------------------------------
# Forward (specs/deft.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, P: Array, R: Array | None, *, method: str = "relu", scaling: float = 1.0,
            bias: Array | None = None, layer: Any = None) -> Array:
    """``y = z + ((s·x Rᵀ) − z H) Qᵀ + b`` with ``z = x Wᵀ`` (no ``out × in`` matrix is formed), in float32
    (float64 for float64 inputs), rounded once to the output dtype; ``R=None`` is PaRa.

    >>> import numpy as np
    >>> forward(np.ones((1, 2)), np.eye(2), np.array([[1.0], [0.0]]), None).tolist()
    [[0.0, 1.0]]
    """
    xp = namespace(x, weight, P, R, bias, where="deft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "deft.forward")
    _check_kind(lay, "deft.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, P.dtype)
    Q, H = projector_factors(P, method, dtype=cd, where="deft.forward")
    xc = as_compute(xp, x, cd)
    z = lay.base_forward(xc, as_compute(xp, weight, cd), None, xp)
    inner = -xp.matmul(z, H)
    if R is not None:
        inner = inner + xp.matmul(xc, xp.matrix_transpose(as_compute(xp, R, cd))) * scaling
    y = z + xp.matmul(inner, xp.matrix_transpose(Q))
    if bias is not None:
        y = y + as_compute(xp, bias, cd)
    return as_compute(xp, y, out_dtype)


# --------------------------------------------------------------------------------------------------
# Unmerge without the record (specs/deft.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def recover_factor(merged: Array, Q: Array, H: Array, R: Array | None, *, scaling: float, layer: Layer,
                   method: str = "relu", where: str = "deft") -> Array:
    """``M = Hᵀ W`` from the merged ``W' = W + Q (s·R − M)``: ``Hᵀ W' = (I − G) M + G s·R`` with ``G = HᵀQ``, so
    ``M = (I − G)⁻¹ (Hᵀ W' − G s·R)`` (``R=None``: ``(I − G)⁻¹ Hᵀ W'``). Refused
    (:class:`NotInvertibleError`) for the qr projector (``G = QᵀQ = I``) and when ``max(1, σ_max)/σ_min·u`` of
    ``I − G`` (how much the solve amplifies the rounding of ``W'``) exceeds :data:`UNMERGE_AMPLIFICATION_LIMIT`."""
    xp = namespace(merged, Q, where=where)
    cd = Q.dtype
    r = int(Q.shape[1])
    G = xp.matmul(xp.matrix_transpose(H), Q)
    A = xp.eye(r, dtype=cd, device=array_api_compat.device(Q)) - G
    sv = xp.linalg.svdvals(A)
    smax, smin = float(xp.max(sv)), float(xp.min(sv))
    # an error u·|Hᵀ W'| in the right-hand side grows by 1/σ_min, the solve's own by cond(I − G)
    amplification = float("inf") if smin == 0 else max(1.0, smax) / smin * eps(cd)
    if method == "qr" or not amplification <= UNMERGE_AMPLIFICATION_LIMIT:
        why = ("the qr projector Q Qᵀ is idempotent (I - QᵀQ = 0)" if method == "qr" else
               f"I - Hᵀ Q (r={r}) is {'singular' if amplification == float('inf') else 'nearly singular'} "
               f"(singular values {smin:.3g} .. {smax:.3g}: an unmerge would amplify rounding by {amplification:.3g})")
        raise NotInvertibleError(
            f"{where}: DEFT's merge removed the component Hᵀ W of the base weight and {why}, so the original "
            f"weight cannot be recovered from the merged one. Unmerge with the merge's record (MergeResult.record; "
            f"Adapter.merge keeps it when given records={{}}); nothing was changed")
    N = removed_factor(merged, H, layer, dtype=cd)
    if R is not None:
        N = N - xp.matmul(G, as_compute(xp, R, cd) * scaling)
    return backend_for(xp).solve(A, N, where=where)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/deft.md, "2. Shapes and initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(layer: Layer, r: int, *, method: str = "relu", para: bool = False, init_weights: bool = True,
                 init_scale: float = 1.0, alpha: float | None = None, weight: Array | None = None,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None, dtype: Any = None,
                 where: str = "deft") -> dict[str, Array]:
    """``{"deft_P": (out, r'), "deft_R": (r', in)}`` with ``r' = min(r, out)``: ``P ~ N(0, 0.02²)``; ``R = Hᵀ W / s``
    (``init_weights=True``: ``ΔW = 0``, needs ``weight``) or ``N(0, (0.02·init_scale)²)``; no ``R`` for PaRa.
    Drawn on the host from ``seed`` (PEFT's distributions, not its numbers)."""
    _check_kind(layer, where)
    if xp is None and weight is not None:
        xp = namespace(weight)
    if xp is None:
        import array_api_compat.numpy as xp
    rng = host_rng(seed)
    r_eff = min(int(r), layer.out_features)
    back = backend_for(xp)
    target = dtype if dtype is not None else xp.float32

    def put(host: np.ndarray) -> Array:
        out = back.from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
        return out if out.dtype == target else xp.astype(out, target)

    P = put(rng.normal(0.0, 0.02, (layer.out_features, r_eff)))
    if para:
        return {_P: P}
    if not init_weights:
        return {_P: P, _R: put(rng.normal(0.0, 0.02 * float(init_scale), (r_eff, layer.in_features)))}
    if weight is None:
        raise ConfigError(f"{where}: DEFT's identity initialisation sets R = H^T W / s from the base weight; pass "
                          f"the base weight (or init_weights=False)")
    _, H = projector_factors(P, method, dtype=xp.float32, where=where)
    R = removed_factor(weight, H, layer, dtype=xp.float32) / scaling_for(alpha, r_eff)
    return {_P: P, _R: R if R.dtype == target else xp.astype(R, target)}


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (specs/deft.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class DeftModule(ModuleAdapter):
    """DEFT on one nn.Linear or transformers Conv1D: ``deft_P (out, r)`` and (not PaRa) ``deft_R (r, in)``.
    Additive with a ``ΔW`` that depends on ``W``; merge returns ``M = Hᵀ W`` as its record."""

    peft_type = "DEFT"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: it needs the base weight (merge / forward take it)
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: DeftConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer from ``weight_shape`` (and ``kind``), else from ``P (out, r)`` and ``R (r, in)`` and the
        config's ``fan_in_fan_out``; PaRa's ``P`` alone does not give ``in``, so it needs ``weight_shape``."""
        if _P not in params:
            raise ShapeError(f"{name}: DEFT needs {_P} (and {_R} unless para), found {sorted(params)}")
        out = int(params[_P].shape[0])
        if weight_shape is None:
            if _R not in params:
                raise ShapeError(f"{name}: a PaRa (para=true) DEFT module stores only {_P}, which does not give the "
                                 f"layer's input size; pass the base weight shape (weight_shape=...)")
            shape = (out, int(params[_R].shape[-1]))
        else:
            shape = tuple(int(s) for s in weight_shape)
            if kind is not None or len(shape) != 2:
                return Layer.of(shape, kind)
            if shape[0] == out and (shape[1] != out or not config.fan_in_fan_out):
                return Layer(LayerKind.LINEAR, shape)
            return Layer(LayerKind.CONV1D_TRANSPOSED, shape)
        return Layer(LayerKind.CONV1D_TRANSPOSED, shape[::-1]) if config.fan_in_fan_out else Layer(LayerKind.LINEAR,
                                                                                                  shape)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        allowed = {_P} if self.config.para else {_P, _R}
        missing, extra = sorted(allowed - set(self.params)), sorted(set(self.params) - allowed)
        if missing or extra:
            raise ShapeError(f"{self.name}: DEFT (para={self.config.para}) has exactly {sorted(allowed)}; missing "
                             f"{missing}, unexpected {extra}")
        self.P, self.R = self.params[_P], self.params.get(_R)
        out, inn = self.layer.out_features, self.layer.in_features
        r = int(self.P.shape[1]) if self.P.ndim == 2 else -1
        if not 1 <= r <= out:
            raise ShapeError(f"{self.name}: {_P} has shape {tuple(self.P.shape)}, expected ({out}, r) with "
                             f"1 <= r <= {out} (PEFT caps r at out_features)")
        check_shape(self.name, _P, self.P, (out, r))
        if self.R is not None:
            check_shape(self.name, _R, self.R, (r, inn))
        self.method = self.config.decomposition_method
        self.scaling = scaling_for(self.config.alpha, r)

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.P.shape[1]), "decomposition_method": self.method, "scaling": self.scaling,
                "para": self.R is None}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: DEFT's ΔW = Q (s·R − Hᵀ W) depends on the base weight (it removes a "
                               f"subspace of W); use merge or forward with the base weight")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W' = W + Q (s·R − M)`` with ``M = Hᵀ W`` (the record), formed in float32 (float64) and rounded once
        (``peft_compat=True``: ``ΔW`` rounded to ``W``'s dtype first, as PEFT)."""
        self.layer.check_weight(weight)
        cd = compute_dtype(self.xp, weight.dtype, self.P.dtype)
        _, H = projector_factors(self.P, self.method, dtype=cd, where=self.name)
        record = removed_factor(weight, H, self.layer, dtype=cd)
        return MergeResult(self._apply(weight, record, 1, copy=copy, safe=safe, peft_compat=peft_compat), bias, record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W = W' − Q (s·R − M)`` with the merge's record ``M``; without it ``M`` is recovered from ``W'``
        (:func:`recover_factor`: relu only, refused where ill-conditioned)."""
        self.layer.check_weight(weight)
        if record is None:
            cd = compute_dtype(self.xp, weight.dtype, self.P.dtype)
            Q, H = projector_factors(self.P, self.method, dtype=cd, where=self.name)
            record = recover_factor(weight, Q, H, self.R, scaling=self.scaling, layer=self.layer, method=self.method,
                                    where=self.name)
        else:
            check_shape(self.name, "the DEFT merge record (H^T W)", record,
                        (int(self.P.shape[1]), self.layer.in_features))
        return MergeResult(self._apply(weight, record, -1, copy=copy, safe=False, peft_compat=peft_compat), bias)

    def _apply(self, weight: Array, record: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± Q D`` with ``D = s·R − M`` ``(r, in)``: a rank-``r`` update (the backend's ``addmm_`` on the
        weight's matrix view, no ``out × in`` temporary), or ``W ± ΔW`` formed out of place."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.P.dtype)
        Q, _ = projector_factors(self.P, self.method, dtype=cd, where=self.name)
        D = _injection_minus(xp, self.R, as_compute(xp, record, cd), self.scaling, cd)

        def kernel(M: Array) -> bool:
            return backend_for(xp).addmm_(M, Q, D, float(sign))

        return apply_delta(self.name, weight, lambda: self.layer.from_matrix(xp.matmul(Q, D), xp), sign=sign,
                           copy=copy, safe=safe, round_delta_to=weight.dtype if peft_compat else None,
                           layer=self.layer, inplace_kernel=kernel, xp=xp)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.P, self.R, method=self.method, scaling=self.scaling, bias=bias, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: DeftConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """:func:`init_weights` with the config's fields (``init`` overrides ``init_weights``); the base weight
        is not changed."""
        params = init_weights(layer, config.r, method=config.decomposition_method, para=config.para,
                              init_weights=config.init_weights if init is None else bool(init),
                              init_scale=config.init_scale, alpha=config.alpha, weight=weight, seed=seed, xp=xp,
                              device=device, dtype=dtype, where=name)
        return params, None


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries)
PARAMETER_SUFFIXES = (_P, _R)
Config = DeftConfig
Module = DeftModule
#: demo / documentation examples: row label -> config fields (non-trivial: random injection, alpha != r)
EXAMPLES = {
    "DEFT relu": dict(r=2, alpha=3, init_weights=False),
    "DEFT qr": dict(r=2, decomposition_method="qr", init_weights=False),
    "DEFT PaRa": dict(r=1, para=True),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=DeftConfig, module=DeftModule, spec="specs/deft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=DeftModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, needs_record_for=lambda config: True,
)
