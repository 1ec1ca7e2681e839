r"""PSOFT: efficient orthogonal fine-tuning with principal subspace adaptation (Wu et al., ICLR 2026).

PSOFT rotates the weight's principal subspace: with the top-``r`` singular triplets of the frozen weight,
``W ≈ V diag(S) Uh`` (``V (out, r)``, ``Uh (r, in)``), fixed factors ``A (r, in)`` and ``B (out, r)`` are built
from them and an ``r × r`` matrix ``R`` is trained between them::

    ΔW = s · B (R − I) A                         s = psoft_alpha / r
    psoft_init:  A = Uh,              B = V diag(S / s)        ΔW = V diag(S) (R − I) Uh
    pissa_init:  A = diag(√(S/s)) Uh, B = V diag(√(S/s))       ΔW = V diag(√S) (R − I) diag(√S) Uh
    R = diag(vector_b) · Cayley(Q) · diag(vector_a)             Q skew-symmetric from psoft_R.weight
        (psoft_orth=False: R = psoft_R.weight itself)

Only ``R``'s parameters are saved. ``A`` and ``B`` are recomputed from the base weight when the adapter is
loaded — by PEFT with ``torch.linalg.svd`` (or ``torch.svd_lowrank``, seeded) — and the adapter's meaning
depends on the **signs** of the singular vectors that routine returns (a sign flip of ``v_i, u_i`` turns
``R`` into ``D R D``). peftmath therefore computes the basis exactly as PEFT does on the CPU: torch's SVD of
the float32 weight (specs/psoft.md, "3. The principal basis"); torch must be installed. Merging replaces the
principal part of ``W``, so merge returns the basis as its record and unmerge needs it. PEFT supports
nn.Linear only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import BackendError, backend_for, get_backend, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_nonnegative_int, check_positive_int
from ..errors import ConfigError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape, require_kind
from ._contract import Method

Array = Any

__all__ = ["PsoftConfig", "parameter_shapes", "init_weights", "skew", "rotation", "principal_basis",
           "pack_basis", "unpack_basis", "factors", "delta_weight", "forward", "PsoftModule"]

PEFT_TYPE = "PSOFT"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
_W, _A, _B = "psoft_R.weight", "psoft_R.vector_a", "psoft_R.vector_b"


# --------------------------------------------------------------------------------------------------
# Config (specs/psoft.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class PsoftConfig(TunerConfig):
    """PEFT's ``PsoftConfig`` (``peft_type: "PSOFT"``), PEFT's names, defaults and checks."""

    peft_type: ClassVar[str] = "PSOFT"

    r: int = 32
    psoft_alpha: int | float = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        if isinstance(self.psoft_alpha, bool) or not isinstance(self.psoft_alpha, (int, float)) \
                or not self.psoft_alpha > 0:
            raise ConfigError(f"{source}: field 'psoft_alpha' must be a positive number, got {self.psoft_alpha!r}")
        check_fraction(source, "psoft_dropout", self.psoft_dropout)
        check_choice(source, "ab_svd_init", self.ab_svd_init, ("psoft_init", "pissa_init"))
        check_choice(source, "psoft_svd", self.psoft_svd, ("full", "lowrank"))
        check_nonnegative_int(source, "psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter)
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ConfigError(f"{source}: field 'random_seed' must be an integer, got {self.random_seed!r}")
        check_flags(source, self, "fan_in_fan_out", "psoft_orth", "psoft_mag_a", "psoft_mag_b",
                    "use_cayley_neumann", "init_weights")
        if self.use_cayley_neumann:  # PEFT checks (and uses) the terms only then
            check_positive_int(source, "num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        eps_ = self.cayley_neumann_eps
        if eps_ is not None and (isinstance(eps_, bool) or not isinstance(eps_, (int, float)) or not 0 < eps_ < 1):
            raise ConfigError(f"{source}: field 'cayley_neumann_eps' must be null or in (0, 1), got {eps_!r}")

    @property
    def scaling(self) -> float:
        """``s = psoft_alpha / r``."""
        return self.psoft_alpha / self.r


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "PSOFT", SUPPORTED_KINDS, peft="PEFT adapts nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Shapes and initialisation (specs/psoft.md, "2. Shapes and initialisation")
# --------------------------------------------------------------------------------------------------
def parameter_shapes(r: int, *, orth: bool = True, mag_a: bool = True, mag_b: bool = True) -> dict[str, tuple]:
    """``{suffix: shape}``: ``psoft_R.weight`` ``(r(r−1)/2,)`` (``orth``) or ``(r, r)``, and the vectors ``(r,)``.

    >>> parameter_shapes(4)
    {'psoft_R.weight': (6,), 'psoft_R.vector_a': (4,), 'psoft_R.vector_b': (4,)}
    """
    out: dict[str, tuple] = {_W: (r * (r - 1) // 2,) if orth else (r, r)}
    if mag_a:
        out[_A] = (r,)
    if mag_b:
        out[_B] = (r,)
    return out


def init_weights(config: PsoftConfig, *, seed: int | np.random.Generator | None = 0, init: bool | None = None,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> dict[str, Array]:
    """PEFT's initialisation: ``init_weights=True``: ``Q = 0`` (``R = I``; not orth: ``I``), so ``ΔW = 0``;
    False: the skew entries ``N(0, 0.1²)`` (not orth: ``I + N(0, 0.1²)``). The vectors start at 1 either way."""
    rng = host_rng(seed)
    flag = config.init_weights if init is None else init
    r = config.r
    host = {}
    for key, shape in parameter_shapes(r, orth=config.psoft_orth, mag_a=config.psoft_mag_a,
                                       mag_b=config.psoft_mag_b).items():
        if key != _W:
            host[key] = np.ones(shape)
        elif config.psoft_orth:
            host[key] = np.zeros(shape) if flag else rng.normal(0.0, 0.1, shape)
        else:
            host[key] = np.eye(r) if flag else np.eye(r) + 0.1 * rng.standard_normal(shape)
    xp = xp if xp is not None else np
    b = backend_for(xp)
    arrays = {k: b.from_host(np.ascontiguousarray(v, dtype=np.float32), xp, device) for k, v in host.items()}
    return arrays if dtype is None else {k: xp.astype(v, dtype) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------------
# The rotation R (specs/psoft.md, "4. The transformation R")
# --------------------------------------------------------------------------------------------------
def skew(q: Array, r: int) -> Array:
    """The skew-symmetric ``Q = U − Uᵀ`` ``(r, r)`` with ``U[triu_indices(r, 1)] = q`` (row by row, torch's and
    NumPy's order), gathered from ``q`` (no scatter in the array API).

    >>> import numpy as np
    >>> skew(np.array([1.0, 2.0, 3.0]), 3).tolist()
    [[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]
    """
    xp = namespace(q, where="psoft.skew")
    n = r * (r - 1) // 2
    if tuple(q.shape) != (n,):
        raise ShapeError(f"psoft.skew: psoft_R.weight has shape {tuple(q.shape)}, expected ({n},) for r={r}")
    slot = {pair: k for k, pair in enumerate((i, j) for i in range(r) for j in range(i + 1, r))}
    index = [slot.get((i, j), n) for i in range(r) for j in range(r)]  # n: the appended zero
    padded = xp.concat([q, xp.zeros((1,), dtype=q.dtype, device=array_api_compat.device(q))])
    upper = xp.reshape(xp.take(padded, xp.asarray(index, device=array_api_compat.device(q))),
                       (r, r))
    return upper - xp.matrix_transpose(upper)


def rotation(weight: Array, vector_a: Array | None = None, vector_b: Array | None = None, *, r: int,
             orth: bool = True, use_cayley_neumann: bool = False, num_cayley_neumann_terms: int = 5,
             cayley_neumann_eps: float | None = None, dtype: Any = None) -> Array:
    """``R = diag(vector_b) · C · diag(vector_a)`` ``(r, r)`` in ``dtype`` (float32; float64 for float64):

    * ``orth``: ``C = (I + Q)(I − Q)⁻¹`` (the Cayley transform of ``Q = skew(weight)``, orthogonal), or with
      ``use_cayley_neumann`` PEFT's truncated series ``I + 2(Q + … + Q^m) + Q^{m+1}``, ``m = max(T − 2, 2)``
      (``T`` terms; ``T = 2``: ``I + 2Q``; ``T = 1``: ``I``), ``Q`` first scaled to Frobenius norm ``eps`` where it exceeds ``eps =
      cayley_neumann_eps`` (``Q·eps/(‖Q‖_F + 1e-12)``);
    * not ``orth``: ``C = weight``.

    >>> import numpy as np
    >>> R = rotation(np.array([0.3, -0.2, 0.5]), r=3)
    >>> bool(np.allclose(R.T @ R, np.eye(3)))
    True
    """
    xp = namespace(weight, vector_a, vector_b, where="psoft.rotation")
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype)
    w = as_compute(xp, weight, cd)
    if not orth:
        check_shape("psoft.rotation", _W, w, (r, r))
        C = w
    else:
        Q = skew(w, r)
        eye = xp.eye(r, dtype=cd, device=array_api_compat.device(w))
        if use_cayley_neumann:
            if cayley_neumann_eps is not None:  # a value-dependent scale, kept lazy (xp.where)
                norm = xp.sqrt(xp.sum(Q * Q))
                shrink = xp.isfinite(norm) & (norm > cayley_neumann_eps)
                Q = Q * xp.where(shrink, cayley_neumann_eps / (norm + 1e-12), xp.ones_like(norm))
            C = _neumann(xp, Q, eye, num_cayley_neumann_terms)
        else:  # (I + Q)(I − Q)⁻¹ = (I − Q)⁻¹(I + Q) (the factors commute): one solve
            C = backend_for(xp).solve(eye - Q, eye + Q, where="psoft.rotation")
    if vector_b is not None:
        C = as_compute(xp, vector_b, cd)[:, None] * C
    if vector_a is not None:
        C = C * as_compute(xp, vector_a, cd)[None, :]
    return C


def _neumann(xp: Any, Q: Array, eye: Array, terms: int) -> Array:
    """PEFT's Cayley–Neumann sum, its terms added in PEFT's order."""
    R = eye
    if terms > 1:
        R = R + 2.0 * Q
        if terms > 2:
            power = xp.matmul(Q, Q)
            R = R + 2.0 * power
            for _ in range(3, terms - 1):
                power = xp.matmul(power, Q)
                R = R + 2.0 * power
            R = R + xp.matmul(power, Q)
    return R


# --------------------------------------------------------------------------------------------------
# The principal basis (specs/psoft.md, "3. The principal basis")
# --------------------------------------------------------------------------------------------------
def _torch(where: str) -> Any:
    try:
        get_backend("torch")
        import torch
    except (BackendError, ImportError) as exc:
        raise UnsupportedError(
            f"{where}: PSOFT's factors A and B are not saved; PEFT rebuilds them from torch's SVD of the base "
            f"weight, and the adapter's numbers depend on the signs of the singular vectors that routine "
            f"returns. peftmath reproduces them with torch (CPU): install torch (pip install torch)") from exc
    return torch


def _basis_on_host(W32: Any, r: int, svd: str, niter: int, seed: int) -> Any:
    """The packed basis ``[V (out·r), S (r), Uh (r·in)]`` of the float32 torch matrix ``W32``, as PEFT computes it
    (``torch.linalg.svd``, or ``torch.svd_lowrank`` under a forked RNG seeded with ``seed``)."""
    import torch

    with torch.no_grad():
        if svd == "full":
            U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
            V, S, Uh = U[:, :r], S[:r], Vh[:r, :]
        else:
            fork = {"devices": []} if W32.device.type == "cpu" else {"devices": [W32.device],
                                                                     "device_type": W32.device.type}
            with torch.random.fork_rng(**fork):
                torch.manual_seed(seed)
                U, S, Vt = torch.svd_lowrank(W32, q=r, niter=niter)
            V, S, Uh = U[:, :r], S[:r], Vt[:, :r].t()
        return torch.cat([V.reshape(-1), S, Uh.reshape(-1)])


def principal_basis(weight: Array, r: int, *, svd: str = "full", niter: int = 10, seed: int = 0,
                    on_device: bool = False, where: str = "psoft") -> Array:
    """The packed basis ``[V, S, Uh]`` (:func:`unpack_basis`) of ``weight`` ``(out, in)``: the top ``r`` singular
    triplets of ``weight`` cast to float32, computed by torch on the CPU (``torch.linalg.svd``; ``svd="lowrank"``:
    ``torch.svd_lowrank(q=r, niter)`` with the RNG seeded by ``seed``), returned in ``weight``'s namespace and
    device as float32. ``on_device`` (``peft_compat``): a torch ``weight`` on another device is decomposed there,
    as PEFT does. Lazy on dask (one task on the whole matrix)."""
    torch = _torch(where)
    out, inn = (int(s) for s in weight.shape)
    if not 0 < r <= min(out, inn):
        raise ShapeError(f"{where}: PSOFT's r={r} must be in [1, min(out, in)] = [1, {min(out, inn)}] for the "
                         f"{out}x{inn} weight (PEFT refuses it too)")
    if svd not in ("full", "lowrank"):
        raise ConfigError(f"{where}: psoft_svd must be 'full' or 'lowrank', got {svd!r}")
    xp = namespace(weight, where=where)
    size = r * (out + inn + 1)

    def decompose(t: Any) -> Any:
        try:
            return _basis_on_host(t, r, svd, niter, seed)
        except RuntimeError as exc:  # torch's LinAlgError: a non-finite weight, or no convergence
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{where}: the base weight {out}x{inn} has NaN or infinite entries; PSOFT's "
                                     f"basis is its SVD, which does not exist then") from exc
            raise NotInvertibleError(f"{where}: torch's SVD of the {out}x{inn} base weight failed "
                                     f"({str(exc).splitlines()[0]})") from exc

    if array_api_compat.is_torch_array(weight):
        t = weight.detach()
        t = t.to(torch.float32) if on_device else t.to(device="cpu", dtype=torch.float32)
        return decompose(t).to(weight.device)

    def host(block: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.require(block, np.float32, ["C", "W"]))  # a writeable copy where needed
        return decompose(t).numpy()

    if array_api_compat.is_dask_array(weight):
        import dask.array as da

        whole = weight.rechunk((-1, -1))
        return da.map_blocks(host, whole, dtype=np.float32, chunks=((size,),), drop_axis=1)
    be = backend_for(xp)
    return be.from_host(host(be.to_host(weight)), xp, array_api_compat.device(weight))


def pack_basis(xp: Any, V: Array, S: Array, Uh: Array) -> Array:
    """``[V (out·r), S (r), Uh (r·in)]`` in one vector (the merge record)."""
    return xp.concat([xp.reshape(V, (-1,)), S, xp.reshape(Uh, (-1,))])


def unpack_basis(basis: Array, out: int, inn: int, r: int, *, where: str = "psoft") -> tuple[Array, Array, Array]:
    """``(V (out, r), S (r,), Uh (r, in))`` from :func:`pack_basis`'s vector; :class:`ShapeError` for a vector of
    another module."""
    xp = namespace(basis, where=where)
    if tuple(basis.shape) != (r * (out + inn + 1),):
        raise ShapeError(f"{where}: the PSOFT basis (merge record) has shape {tuple(basis.shape)}, expected "
                         f"({r * (out + inn + 1)},) = r*(out+in+1) for r={r}, a {out}x{inn} layer")
    a, b = out * r, out * r + r
    return xp.reshape(basis[:a], (out, r)), basis[a:b], xp.reshape(basis[b:], (r, inn))


def factors(basis: Array, out: int, inn: int, r: int, *, scaling: float, ab_svd_init: str = "psoft_init",
            dtype: Any = None, where: str = "psoft") -> tuple[Array, Array]:
    """PEFT's frozen ``(A (r, in), B (out, r))`` from the basis: psoft_init ``A = Uh``, ``B = V diag(S/s)``;
    pissa_init ``A = diag(√(S/s)) Uh``, ``B = V diag(√(S/s))``."""
    xp = namespace(basis, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, basis.dtype)
    V, S, Uh = (as_compute(xp, a, cd) for a in unpack_basis(basis, out, inn, r, where=where))
    s = S / scaling
    if ab_svd_init == "psoft_init":
        return Uh, V * s[None, :]
    root = xp.sqrt(s)
    return root[:, None] * Uh, V * root[None, :]


# --------------------------------------------------------------------------------------------------
# Delta weight and forward (specs/psoft.md, "5. Delta weight and forward")
# --------------------------------------------------------------------------------------------------
def _left(xp: Any, B: Array, R: Array, scaling: float) -> Array:
    """``s · B (R − I)`` ``(out, r)``: ``ΔW``'s left factor (``ΔW = left @ A``)."""
    eye = xp.eye(int(R.shape[0]), dtype=R.dtype, device=array_api_compat.device(R))
    return scaling * xp.matmul(B, R - eye)


def delta_weight(basis: Array, R: Array, out: int, inn: int, *, scaling: float, ab_svd_init: str = "psoft_init",
                 dtype: Any = None) -> Array:
    """``ΔW = s · B (R − I) A`` ``(out, in)`` from the packed basis and ``R`` (:func:`rotation`).

    >>> import numpy as np
    >>> basis = pack_basis(np, np.eye(2)[:, :1], np.array([3.0]), np.eye(2)[:1])   # W's top triplet: 3·e1 e1ᵀ
    >>> delta_weight(basis, np.array([[2.0]]), 2, 2, scaling=1.0).tolist()         # R = 2: the 3 becomes 6
    [[3.0, 0.0], [0.0, 0.0]]
    """
    xp = namespace(basis, R, where="psoft.delta_weight")
    cd = dtype if dtype is not None else compute_dtype(xp, basis.dtype, R.dtype)
    r = int(R.shape[0])
    A, B = factors(basis, out, inn, r, scaling=scaling, ab_svd_init=ab_svd_init, dtype=cd)
    return xp.matmul(_left(xp, B, as_compute(xp, R, cd), scaling), A)


def forward(x: Array, weight: Array, basis: Array, R: Array, *, scaling: float, ab_svd_init: str = "psoft_init",
            bias: Array | None = None, layer: Layer | None = None) -> Array:
    """``x Wᵀ + b + s · ((x Aᵀ)(R − I)ᵀ) Bᵀ`` in float32 (float64 for float64 inputs), rounded once."""
    xp = namespace(x, weight, basis, where="psoft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "psoft.forward")
    _check_kind(lay, "psoft.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype)
    r = int(R.shape[0])
    A, B = factors(basis, lay.out_features, lay.in_features, r, scaling=scaling, ab_svd_init=ab_svd_init, dtype=cd)
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    xa = xp.matmul(xc, xp.matrix_transpose(A))
    return as_compute(xp, y + xp.matmul(xa, xp.matrix_transpose(_left(xp, B, as_compute(xp, R, cd), scaling))),
                      out_dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/psoft.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class PsoftModule(ModuleAdapter):
    """PSOFT on one nn.Linear: ``psoft_R.weight`` (and the vectors). ``ΔW`` depends on the base weight (its
    principal basis): merge returns the basis as its record, unmerge needs it."""

    peft_type = "PSOFT"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: it needs the base weight's principal basis
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: PsoftConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The base weight shape is required: PSOFT's tensors are ``r``-sized only."""
        if weight_shape is None:
            raise ShapeError(f"{name}: PSOFT's tensors ({sorted(params)}) are r x r only and do not determine the "
                             f"base layer; pass the base weight shape (weight_shape=...)")
        return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        cfg = self.config
        want = parameter_shapes(cfg.r, orth=cfg.psoft_orth, mag_a=cfg.psoft_mag_a, mag_b=cfg.psoft_mag_b)
        if set(self.params) != set(want):
            raise ShapeError(f"{self.name}: PSOFT with psoft_orth={cfg.psoft_orth}, psoft_mag_a={cfg.psoft_mag_a}, "
                             f"psoft_mag_b={cfg.psoft_mag_b} has {sorted(want)}, found {sorted(self.params)}")
        for key, shape in want.items():
            check_shape(self.name, key, self.params[key], shape)
        self.r = cfg.r
        if self.r > min(self.layer.out_features, self.layer.in_features):
            raise ShapeError(f"{self.name}: PSOFT's r={self.r} exceeds min(out, in) of the "
                             f"{self.layer.out_features}x{self.layer.in_features} layer (PEFT refuses it too)")
        self.scaling = cfg.scaling

    def describe(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.config.psoft_alpha, "scaling": self.scaling,
                "ab_svd_init": self.config.ab_svd_init, "orth": self.config.psoft_orth}

    def rotation(self, dtype: Any = None) -> Array:
        """``R`` ``(r, r)`` (:func:`rotation`) with this module's parameters and the config's options."""
        cfg = self.config
        return rotation(self.params[_W], self.params.get(_A), self.params.get(_B), r=self.r, orth=cfg.psoft_orth,
                        use_cayley_neumann=cfg.use_cayley_neumann,
                        num_cayley_neumann_terms=cfg.num_cayley_neumann_terms,
                        cayley_neumann_eps=cfg.cayley_neumann_eps, dtype=dtype)

    def basis(self, weight: Array, *, peft_compat: bool = False) -> Array:
        """The packed principal basis of ``weight`` (:func:`principal_basis`) with the config's SVD options."""
        cfg = self.config
        return principal_basis(weight, self.r, svd=cfg.psoft_svd, niter=cfg.psoft_svd_lowrank_niter,
                               seed=cfg.random_seed, on_device=peft_compat, where=self.name)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: PSOFT's ΔW = s·B(R − I)A is built on the base weight's principal "
                               f"subspace (A and B are not saved); use merge or forward with the base weight")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W' = W + s·B(R − I)A`` (a rank-``r`` update, no ``out × in`` temporary on backends with ``addmm_``);
        the record is ``W``'s principal basis (``r·(out + in + 1)`` numbers). ``peft_compat``: the basis on the
        weight's own device (PEFT's) and ``ΔW`` rounded to the weight's dtype before the sum (PEFT's two
        roundings)."""
        self.layer.check_weight(weight)
        record = self.basis(weight, peft_compat=peft_compat)
        return MergeResult(self._apply(weight, record, 1, copy=copy, safe=safe, peft_compat=peft_compat), bias,
                           record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W = W' − s·B(R − I)A`` with the merge's ``record`` (the basis of the original ``W``); without it
        :class:`NotInvertibleError`: merging rotated ``W``'s principal part and its basis cannot be recovered
        from ``W'`` with PEFT's signs."""
        self.layer.check_weight(weight)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: unmerging PSOFT needs the principal basis of the original weight (merge returns it as "
                f"MergeResult.record; Adapter.merge keeps it when given records={{}}); the merged weight has another "
                f"SVD, so A and B cannot be rebuilt from it (PEFT unmerges with the A and B it cached at load)")
        return MergeResult(self._apply(weight, record, -1, copy=copy, safe=False, peft_compat=peft_compat), bias)

    def _apply(self, weight: Array, basis: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.params[_W].dtype)
        out, inn = self.layer.out_features, self.layer.in_features
        A, B = factors(basis, out, inn, self.r, scaling=self.scaling, ab_svd_init=self.config.ab_svd_init, dtype=cd,
                       where=self.name)
        L = _left(xp, B, self.rotation(cd), self.scaling)

        def kernel(M: Array) -> bool:
            return backend_for(xp).addmm_(M, L, A, float(sign))

        return apply_delta(self.name, weight, lambda: xp.matmul(L, A), sign=sign, copy=copy, safe=safe,
                           round_delta_to=weight.dtype if peft_compat else None, layer=self.layer,
                           inplace_kernel=kernel, xp=xp)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.basis(weight), self.rotation(), scaling=self.scaling,
                       ab_svd_init=self.config.ab_svd_init, bias=bias, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: PsoftConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh ``R`` parameters (:func:`init_weights`); the base weight is not changed (A and B are rebuilt from
        it whenever they are needed)."""
        _check_kind(layer, name)
        if config.r > min(layer.out_features, layer.in_features):
            raise ShapeError(f"{name}: PSOFT's r={config.r} exceeds min(out, in) of the {layer.weight_shape} layer")
        if xp is None and weight is not None:
            xp = namespace(weight)
        return init_weights(config, seed=seed, init=init, xp=xp, device=device, dtype=dtype), None


#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = (_W, _A, _B)
Config = PsoftConfig
Module = PsoftModule
#: demo / documentation examples: row label -> config fields (non-trivial: random R, alpha != r)
EXAMPLES = {
    "PSOFT": dict(r=3, psoft_alpha=6, init_weights=False),
    "PSOFT (PiSSA init, Cayley-Neumann)": dict(r=2, psoft_alpha=2, ab_svd_init="pissa_init", use_cayley_neumann=True,
                                               init_weights=False),
    "PSOFT (free R)": dict(r=2, psoft_alpha=4, psoft_orth=False, psoft_mag_a=False, psoft_mag_b=False,
                           init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PsoftConfig, module=PsoftModule, spec="specs/psoft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED_KINDS, additive=True, init_field="init_weights",
    examples=EXAMPLES, needs_record_for=lambda config: True,
    requires=("torch",),  # PEFT's SVD signs define the adapter: torch's CPU SVD reproduces them
)
