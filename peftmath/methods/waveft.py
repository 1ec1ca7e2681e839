r"""WaveFT: parameter-efficient fine-tuning in the wavelet domain (Bilican et al., 2025).

Like FourierFT, each adapted layer learns ``k = n_frequency`` real coefficients at fixed random positions
of a grid (PEFT's ``torch.randperm``, the same positions as FourierFT for the same seed and shape); the
weight change is their one-level inverse 2-D discrete wavelet transform, scaled::

    S = zeros(H, W);  S[r_j + r0, s_j + c0] = c_j           (H, W) = the layer padded by the filter length
    [[cA, cH], [cV, cD]] = S's four quadrants
    ΔW = α · crop( IDWT₂(cA, cH, cV, cD) )                 (out, in)

With ``use_idwt=False`` the coefficients are ``ΔW`` itself (a sparse change, ``ΔW = α·S``). The inverse
transform is linear and local: ``ΔW`` is the sum of ``k`` atoms, each an ``L×L`` patch of filter products
(``L``: the filter length), gathered into the grid once. Additive (``W ± ΔW``), so unmerge is exact up to the rounding of the sums.
PEFT supports nn.Linear and transformers' Conv1D; the tensor is ``waveft_spectrum`` ``(k,)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, is_immutable, namespace
from ..backends import backend_for, host_rng
from ..config import (TunerConfig, check_choice, check_flags, check_number, check_pattern, check_positive_int,
                      get_pattern_key)
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, layer_of_weight_shape, require_kind, write_weight
from ._sparse import add_at

Array = Any

__all__ = ["WaveFTConfig", "n_frequency_for", "reconstruction_filters", "positions", "init_weights",
           "delta_weight", "forward", "WaveFTModule"]

PEFT_TYPE = "WAVEFT"
_KEY = "waveft_spectrum"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
#: the names PEFT 0.21.2's WaveFTConfig accepts (its WAVELET_REDUCTIONS keys)
PEFT_FAMILIES = (tuple(f"db{n}" for n in range(1, 39)) + tuple(f"sym{n}" for n in range(2, 21))
                 + tuple(f"coif{n}" for n in range(1, 18)))
#: the families peftmath computes: Daubechies db1..db10 (PEFT's filter table stops at db10) and sym2 / sym3,
#: which are the same filters as db2 / db3
SUPPORTED_FAMILIES = tuple(f"db{n}" for n in range(1, 11)) + ("sym2", "sym3")


# --------------------------------------------------------------------------------------------------
# Config (specs/waveft.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class WaveFTConfig(TunerConfig):
    """PEFT's ``WaveFTConfig`` (``peft_type: "WAVEFT"``), PEFT's names and defaults."""

    peft_type: ClassVar[str] = "WAVEFT"

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "n_frequency", self.n_frequency)
        check_number(source, "scaling", self.scaling)
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool) \
                or self.random_loc_seed < 0:
            raise ConfigError(f"{source}: field 'random_loc_seed' must be a non-negative integer, "
                              f"got {self.random_loc_seed!r}")
        check_choice(source, "wavelet_family", self.wavelet_family, PEFT_FAMILIES)
        check_flags(source, self, "use_idwt", "fan_in_fan_out", "proportional_parameters", "init_weights")
        check_choice(source, "bias", self.bias, ("none", "all", "waveft_only"))
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check_pattern(source, "n_frequency_pattern", self.n_frequency_pattern)
        for key, value in self.n_frequency_pattern.items():
            check_positive_int(source, f"n_frequency_pattern[{key!r}]", value)


def n_frequency_for(config: WaveFTConfig, module_name: str, layer_sizes: dict[str, tuple[int, int]] | None = None) -> int:
    """PEFT's WaveFT rule for a new adapter: with ``proportional_parameters``, the budget
    ``n_frequency × (number of layers)`` shared in proportion to each layer's ``out·in`` (rounded, at least 1;
    ``layer_sizes`` maps every adapted module to its ``(out, in)``); else ``n_frequency_pattern`` by LoRA's
    pattern rule (``(.*\\.)?key$``); else ``n_frequency``. A loaded adapter's ``k`` is its spectrum's length.

    >>> cfg = WaveFTConfig(n_frequency=8, n_frequency_pattern={"q": 4})
    >>> n_frequency_for(cfg, "q"), n_frequency_for(cfg, "a.k")
    (4, 8)
    >>> cfg = WaveFTConfig(n_frequency=10, proportional_parameters=True)
    >>> n_frequency_for(cfg, "a", {"a": (20, 10), "b": (2, 20)})
    17
    """
    if config.proportional_parameters and layer_sizes:
        total = sum(o * i for o, i in layer_sizes.values())
        o, i = layer_sizes[module_name]
        return max(1, round(o * i / total * config.n_frequency * len(layer_sizes)))
    key = get_pattern_key(list(config.n_frequency_pattern or {}), module_name)
    return config.n_frequency if key is None else config.n_frequency_pattern[key]


# --------------------------------------------------------------------------------------------------
# Filters and positions (specs/waveft.md, "2. Shapes, positions and filters")
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def reconstruction_filters(family: str, where: str = "waveft") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(rec_lo, rec_hi)`` of a Daubechies wavelet in PyWavelets' convention, computed in float64 by spectral
    factorisation: ``rec_lo ∝ (1 + z)^N · Π (z − z_k)`` over the roots ``|z_k| < 1`` of
    ``P(y) = Σ_{k<N} C(N−1+k, k) yᵏ`` with ``y = (2 − z − 1/z)/4``, normalised to ``Σ rec_lo = √2``;
    ``rec_hi[i] = (−1)ⁱ rec_lo[L−1−i]``.

    >>> lo, hi = reconstruction_filters("db2")
    >>> [round(v, 6) for v in lo]
    [0.482963, 0.836516, 0.224144, -0.12941]
    """
    if family not in SUPPORTED_FAMILIES:
        peft_note = ("PEFT 0.21.2 accepts the name but has no filter for it either (its table stops at db10, "
                     "sym10, coif5), so it fails when it builds ΔW"
                     if not (family.startswith("sym") and int(family[3:]) <= 10
                             or family.startswith("coif") and int(family[4:]) <= 5) else
                     "peftmath computes only the Daubechies filters (db1..db10; sym2 and sym3 equal db2 and db3)")
        raise UnsupportedError(f"{where}: wavelet_family={family!r} is not supported: {peft_note}")
    n = int(family[3:]) if family.startswith("sym") else int(family[2:])
    from math import comb

    p = [comb(n - 1 + k, k) for k in range(n)]  # P(y), ascending powers
    lo = np.array([1.0])
    for _ in range(n):
        lo = np.convolve(lo, [1.0, 1.0])
    for y in np.roots(p[::-1]) if n > 1 else []:
        b = 2.0 - 4.0 * y  # z² − b z + 1 = 0
        z = (b - np.sqrt(b * b - 4.0 + 0j)) / 2.0
        z = z if abs(z) < 1 else 1.0 / z
        lo = np.convolve(lo, [1.0, -z])
    lo = np.real(lo)
    lo = lo * (np.sqrt(2.0) / lo.sum())
    L = lo.size
    hi = np.array([(-1) ** i * lo[L - 1 - i] for i in range(L)])
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


def positions(out_features: int, in_features: int, k: int, seed: int, where: str = "waveft") -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the ``k`` coefficients: PEFT's ``torch.randperm(out·in, manual_seed(seed))[:k]``,
    the same positions as FourierFT's (:func:`peftmath.methods.fourierft.spectral_indices`, which reproduces
    PyTorch's CPU generator)."""
    from .fourierft import spectral_indices  # noqa: PLC0415  (the shared reproduction of torch.randperm)

    return spectral_indices(out_features, in_features, k, seed, where)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/waveft.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(k: int, *, init_weights: bool = True, seed: int | np.random.Generator | None = 0, xp: Any = None,
                 device: Any = None, dtype: Any = None) -> Array:
    """The spectrum ``(k,)``: zeros (PEFT's default, ``ΔW = 0``) or ``0.01·N(0, 1)``.

    >>> init_weights(2).tolist()
    [0.0, 0.0]
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"WaveFT init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    host = np.zeros(k) if init_weights else 0.01 * host_rng(seed).standard_normal(k)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/waveft.md, "4. Delta weight")
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _atoms(out_features: int, in_features: int, k: int, seed: int, family: str, use_idwt: bool):
    """The host plan of ``ΔW = Σ_j c_j·A_j`` (``A_j``: coefficient ``j``'s atom, an ``L×L`` patch of filter
    products after the transform's crops; one cell without the transform): per repeat level, which
    coefficient lands on each distinct cell (``k``: none) with which weight, ``(levels, n_cells)`` each; the
    distinct cells ``cells`` (flat, row-major, int64) themselves. The dense grid map is :func:`_grid`."""
    rows, cols = positions(out_features, in_features, k, seed)
    j = np.arange(k)
    if not use_idwt:
        y, x, w, jj = rows[None, :], cols[None, :], np.ones((1, k)), j[None, :]
    else:
        lo, hi = (np.asarray(f) for f in reconstruction_filters(family))
        L = lo.size
        H, W = out_features + L - 2, in_features + L - 2
        H, W = H + H % 2, W + W % 2
        R, C = rows + (H - out_features) // 2, cols + (W - in_features) // 2
        h2, w2 = H // 2, W // 2
        pad = (2 * L - 3) // 2
        top = (2 * h2 + L - 2 - 2 * pad - out_features) // 2
        left = (2 * w2 + L - 2 - 2 * pad - in_features) // 2
        # filter bank [lo⊗lo, hi⊗lo, lo⊗hi, hi⊗hi] on quadrants [cA, cH, cV, cD]: the row filter is hi in the
        # right half (cH, cD), the column filter hi in the bottom half (cV, cD)
        frow = np.where((C >= w2)[:, None], hi[None, :], lo[None, :])  # (k, L)
        fcol = np.where((R >= h2)[:, None], hi[None, :], lo[None, :])
        p = np.arange(L)
        y = (2 * (R % h2))[:, None, None] + p[None, :, None] - pad - top  # (k, L, 1)
        x = (2 * (C % w2))[:, None, None] + p[None, None, :] - pad - left  # (k, 1, L)
        y, x = np.broadcast_to(y, (k, L, L)).reshape(-1), np.broadcast_to(x, (k, L, L)).reshape(-1)
        w = (frow[:, :, None] * fcol[:, None, :]).reshape(-1)
        jj = np.repeat(j, L * L)
        keep = (y >= 0) & (y < out_features) & (x >= 0) & (x < in_features) & (w != 0)
        y, x, w, jj = y[keep], x[keep], w[keep], jj[keep]
    flat = (np.asarray(y) * in_features + np.asarray(x)).reshape(-1)
    w, jj = np.asarray(w, dtype=np.float64).reshape(-1), np.asarray(jj).reshape(-1)
    order = np.argsort(flat, kind="stable")
    cells, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
    levels = int(counts.max()) if cells.size else 1
    which = np.full((levels, cells.size), k, dtype=np.int64)
    weight = np.zeros((levels, cells.size))
    for level in range(levels):
        has = counts > level
        which[level, has] = jj[order[first[has] + level]]
        weight[level, has] = w[order[first[has] + level]]
    return which, weight, cells


@functools.lru_cache(maxsize=4)
def _grid(out_features: int, in_features: int, k: int, seed: int, family: str, use_idwt: bool) -> np.ndarray:
    """The grid map of :func:`delta_weight`'s dense gather: cell -> its number in ``_atoms``' ``cells``
    (``n_cells``: an empty cell), int32 ``(out·in,)``."""
    cells = _atoms(out_features, in_features, k, seed, family, use_idwt)[2]
    grid = np.full(out_features * in_features, cells.size, dtype=np.int32)
    grid[cells] = np.arange(cells.size, dtype=np.int32)
    return grid


def delta_weight(spectrum: Array, out_features: int, in_features: int, *, scaling: float = 25.0,
                 random_loc_seed: int = 777, wavelet_family: str = "db1", use_idwt: bool = True, dtype: Any = None,
                 where: str = "waveft") -> Array:
    """``ΔW`` ``(out, in)``: PEFT's ``scaling · crop(IDWT₂(quadrants of the padded coefficient grid))`` (or
    ``scaling·S`` with ``use_idwt=False``), as the sum of the coefficients' atoms: per cell of ``ΔW``, the
    few ``c_j·lo/hi[p]·lo/hi[q]`` that land there (host plan, :func:`_atoms`), written into zeros by one
    integer-array assignment (one gather through the cached grid map where the namespace has no such
    assignment: array-api-strict, JAX, dask).
    In ``dtype`` (default float32, float64 for a float64 spectrum); the filters are float64 numbers.

    >>> import numpy as np
    >>> dw = delta_weight(np.array([1.0]), 2, 2, scaling=1.0, random_loc_seed=0)   # one Haar atom
    >>> bool(np.allclose(np.abs(dw), 0.5))
    True
    """
    xp = namespace(spectrum, where=where)
    key = (out_features, in_features, int(spectrum.shape[0]) if spectrum.ndim == 1 else -1, int(random_loc_seed),
           wavelet_family, bool(use_idwt))
    values = _cell_values(xp, spectrum, key, scaling, dtype, where)
    dev = array_api_compat.device(values)
    if not is_immutable(values):  # zeros, then the nonzero cells by integer-array assignment (NumPy, torch, CuPy)
        dw = xp.zeros((out_features * in_features,), dtype=values.dtype, device=dev)
        try:
            dw[xp.asarray(_atoms(*key)[2], device=dev)] = values
            return xp.reshape(dw, (out_features, in_features))
        except (TypeError, IndexError, NotImplementedError):  # array-api-strict: the gather below
            del dw
    values = xp.concat([values, xp.zeros((1,), dtype=values.dtype, device=dev)])
    grid = xp.asarray(_grid(*key), device=dev)
    return xp.reshape(xp.take(values, grid, axis=0), (out_features, in_features))


def _cell_values(xp: Any, spectrum: Array, key: tuple, scaling: float, dtype: Any, where: str) -> Array:
    """``ΔW``'s value on each of ``_atoms(*key)``' distinct cells, ``(n_cells,)`` in ``dtype`` (default float32,
    float64 for a float64 spectrum): per repeat level, one gather of the scaled coefficients times the
    filter products, summed."""
    out_features, in_features, k, seed, family, use_idwt = key
    if k < 1:
        raise ShapeError(f"{where}: {_KEY} must be a vector (k,), got shape {tuple(spectrum.shape)}")
    positions(out_features, in_features, k, seed, where)  # checks k and the size
    if use_idwt:
        reconstruction_filters(family, where)
    which, weight, _ = _atoms(*key)
    cd = dtype if dtype is not None else compute_dtype(xp, spectrum.dtype)
    dev = array_api_compat.device(spectrum)
    padded = xp.concat([as_compute(xp, spectrum, cd) * scaling, xp.zeros((1,), dtype=cd, device=dev)])
    cells = None
    for level in range(which.shape[0]):
        part = xp.take(padded, xp.asarray(which[level], device=dev), axis=0) * \
            xp.asarray(weight[level], dtype=cd, device=dev)
        cells = part if cells is None else cells + part
    return cells


# --------------------------------------------------------------------------------------------------
# Forward (specs/waveft.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, spectrum: Array, *, bias: Array | None = None, layer: Any = None,
            **options: Any) -> Array:
    """``base(x) + x ΔWᵀ`` in float32 (float64 for float64 inputs), rounded once to the output dtype;
    ``options`` are :func:`delta_weight`'s (scaling, random_loc_seed, wavelet_family, use_idwt).

    >>> import numpy as np
    >>> y = forward(np.eye(2), np.zeros((2, 2)), np.array([1.0]), scaling=1.0, random_loc_seed=0)
    >>> bool(np.allclose(y, delta_weight(np.array([1.0]), 2, 2, scaling=1.0, random_loc_seed=0).T))
    True
    """
    xp = namespace(x, weight, spectrum, bias, where="waveft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "waveft.forward")
    _check_kind(lay, "waveft.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, spectrum.dtype)
    dw = delta_weight(spectrum, lay.out_features, lay.in_features, dtype=cd, where="waveft.forward", **options)
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y + xp.matmul(xc, xp.matrix_transpose(dw)), out_dtype)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "WaveFT", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/waveft.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class WaveFTModule(ModuleAdapter):
    """WaveFT on one Linear or Conv1D: ``waveft_spectrum`` ``(k,)``. Additive: merge is ``W + ΔW`` (``ΔWᵀ``
    in a Conv1D's ``(in, out)`` layout) through :func:`~peftmath.methods._base.write_weight`."""

    peft_type = "WAVEFT"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: WaveFTConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Linear or Conv1D: ``kind`` when given, else the config's ``fan_in_fan_out``; ``weight_shape`` is
        required (the spectrum does not tell the layer's shape)."""
        return layer_of_weight_shape(name, _KEY, params, weight_shape, kind, config.fan_in_fan_out,
                                     "WaveFT stores only wavelet coefficients")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        if _KEY not in self.params:
            raise ShapeError(f"{self.name}: missing {_KEY} (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_KEY})
        if extra:
            raise ShapeError(f"{self.name}: unexpected WaveFT tensors {extra} (WaveFT has only {_KEY})")
        self.spectrum = self.params[_KEY]
        if self.spectrum.ndim != 1 or not 0 < int(self.spectrum.shape[0]) <= self.layer.out_features * \
                self.layer.in_features:
            raise ShapeError(f"{self.name}: {_KEY} {tuple(self.spectrum.shape)} must be (k,) with 1 <= k <= "
                             f"{self.layer.out_features}*{self.layer.in_features}")
        if self.config.use_idwt:
            reconstruction_filters(self.config.wavelet_family, self.name)  # refuses unsupported families now
        #: α; :meth:`scaled` multiplies it (``ΔW`` is linear in it)
        self.scaling = float(self.config.scaling)

    def describe(self) -> dict[str, Any]:
        return {"n_frequency": int(self.spectrum.shape[0]), "scaling": self.scaling,
                "wavelet_family": self.config.wavelet_family, "use_idwt": self.config.use_idwt}

    def _options(self, scaling: float) -> dict[str, Any]:
        return {"scaling": scaling, "random_loc_seed": self.config.random_loc_seed,
                "wavelet_family": self.config.wavelet_family, "use_idwt": self.config.use_idwt}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW`` in the stored layout (``(out, in)``; ``(in, out)`` for a Conv1D), in the compute dtype."""
        dw = delta_weight(self.spectrum, self.layer.out_features, self.layer.in_features, where=self.name,
                          **self._options(self.scaling))
        return self.xp.matrix_transpose(dw) if self.layer.kind is LayerKind.CONV1D_TRANSPOSED else dw

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + ΔW``, formed in float32 (float64) and rounded once (PEFT adds the float32 ``ΔW`` in place,
        which torch also rounds once: ``peft_compat`` changes nothing)."""
        self.layer.check_weight(weight)
        return MergeResult(self._apply(weight, 1, copy=copy, safe=safe), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W − ΔW``, as :meth:`merge` (``−ΔW`` by the scaling's exact sign flip)."""
        self.layer.check_weight(weight)
        return MergeResult(self._apply(weight, -1, copy=copy, safe=False), bias)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool) -> Array:
        """``W + sign·ΔW``: where the weight can be written (NumPy, torch, CuPy), only ``ΔW``'s nonzero cells
        (at most ``k·L²``) of the ``(out, in)`` matrix view of ``W`` (``copy=False``) or of one private copy
        (``copy=True``) are read and written (:func:`~peftmath.methods._sparse.add_at`); elsewhere ``W`` is added
        into a fresh dense ``ΔW``. Each touched entry formed in float32 (float64) and rounded once."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.spectrum.dtype)
        lay, options = self.layer, self._options(sign * self.scaling)

        def compute() -> Array:  # W + sign·ΔW into a fresh dense ΔW (stored layout)
            dw = as_compute(xp, delta_weight(self.spectrum, lay.out_features, lay.in_features, dtype=cd,
                                             where=self.name, **options), cd)
            dw = xp.matrix_transpose(dw) if lay.kind is LayerKind.CONV1D_TRANSPOSED else dw
            dw += as_compute(xp, weight, cd)  # (JAX and dask rebind)
            return dw

        def kernel(M: Array) -> bool:  # M: the (out, in) matrix view; only ΔW's nonzero cells
            key = (lay.out_features, lay.in_features, int(self.spectrum.shape[0]),
                   int(options["random_loc_seed"]), options["wavelet_family"], bool(options["use_idwt"]))
            values = _cell_values(xp, self.spectrum, key, options["scaling"], cd, self.name)
            return add_at(xp, M, _atoms(*key)[2], lay.in_features, values, cd)

        return write_weight(self.name, weight, compute, layer=lay, kernel=kernel, copy=copy, safe=safe, xp=xp)

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``α → c·α``, so ``ΔW → c·ΔW`` (PEFT defines no scale for WaveFT; this is the linear one)."""
        return self.scale_scaling(c)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.spectrum, bias=bias, layer=layer, **self._options(self.scaling))

    @classmethod
    def initialize(cls, name: str, config: WaveFTConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"waveft_spectrum": ...}`` of length :func:`n_frequency_for` (``init`` overrides
        ``config.init_weights``). ``proportional_parameters`` needs every adapted layer's size, which one
        module does not see: refused here (create such an adapter in PEFT; loading it needs nothing more)."""
        _check_kind(layer, name)
        if config.proportional_parameters:
            raise UnsupportedError(f"{name}: WaveFT proportional_parameters shares n_frequency over all adapted "
                                   f"layers by size; peftmath creates one module at a time and cannot; set it to "
                                   f"false or give per-module sizes with n_frequency_pattern")
        if config.use_idwt:
            reconstruction_filters(config.wavelet_family, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        k = n_frequency_for(config, name)
        positions(layer.out_features, layer.in_features, k, config.random_loc_seed, name)  # checks k and size
        spec = init_weights(k, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                            device=device, dtype=dtype)
        return {_KEY: spec}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = WaveFTConfig
Module = WaveFTModule
#: demo / documentation examples: row label -> config fields (non-trivial: random spectrum, scaling != 1)
EXAMPLES = {
    "WaveFT": dict(n_frequency=10, scaling=3.0, wavelet_family="db2", init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=WaveFTConfig, module=WaveFTModule, spec="specs/waveft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=WaveFTModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, orientation_in_tensors=False,
)
