r"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al., ICML 2024).

Each adapted layer learns ``k = n_frequency`` real spectral coefficients ``c`` at fixed, random positions
``(r_j, s_j)`` of the ``(out, in)`` frequency grid; the weight change is the real part of their inverse
2-D DFT, scaled::

    S = zeros(out, in);  S[r_j, s_j] = c_j
    ΔW = α · Re(IDFT₂(S)),      IDFT₂(S)[p, q] = 1/(out·in) Σ_{u,v} S[u, v] e^{2πi(pu/out + qv/in)}

``α = scaling``. The positions are not stored in the checkpoint: PEFT draws them with
``torch.randperm(out·in, generator=manual_seed(random_loc_seed))[:k]``; :func:`spectral_indices`
reproduces PyTorch's CPU algorithm exactly (Mersenne Twister + Fisher-Yates), with NumPy only.

Additive (``W ± ΔW``), so unmerge is exact up to the rounding of the sums. PEFT supports nn.Linear and
transformers' Conv1D; the tensor is ``fourierft_spectrum`` ``(k,)``.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, is_immutable, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_number, check_pattern, check_positive_int
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import (
    ROW_TILE_BYTES, ModuleAdapter, SignedModuleAdapter, check_shape, in_row_tiles, layer_of_weight_shape,
    require_kind, write_weight
)

Array = Any

__all__ = ["FourierFTConfig", "n_frequency_for", "spectral_indices", "init_weights", "delta_weight", "forward",
           "FourierFTModule"]

PEFT_TYPE = "FOURIERFT"
_KEY = "fourierft_spectrum"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
#: PyTorch's CPU randperm draws 64-bit numbers from this size on (``uint32 max / 20``), in a way not
#: reproduced here: larger layers are refused
_RANDPERM_32BIT_LIMIT = (2**32 - 1) // 20


# --------------------------------------------------------------------------------------------------
# Config (specs/fourierft.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class FourierFTConfig(TunerConfig):
    """PEFT's ``FourierFTConfig`` (``peft_type: "FOURIERFT"``), PEFT's names and defaults.

    Note PEFT's default ``init_weights=False``: the spectrum starts as ``N(0, 1)`` draws, not zeros.
    """

    peft_type: ClassVar[str] = "FOURIERFT"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "n_frequency", self.n_frequency)
        check_number(source, "scaling", self.scaling)
        if not isinstance(self.random_loc_seed, int) or isinstance(self.random_loc_seed, bool) \
                or self.random_loc_seed < 0:
            raise ConfigError(f"{source}: field 'random_loc_seed' must be a non-negative integer, "
                              f"got {self.random_loc_seed!r}")
        check_flags(source, self, "fan_in_fan_out", "init_weights")
        check_choice(source, "bias", self.bias, ("none", "all", "fourier_only"))
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check_pattern(source, "n_frequency_pattern", self.n_frequency_pattern)
        for key, value in self.n_frequency_pattern.items():
            check_positive_int(source, f"n_frequency_pattern[{key!r}]", value)


def n_frequency_for(config: FourierFTConfig, module_name: str) -> int:
    """PEFT's FourierFT rule: the first key ``k`` of ``n_frequency_pattern`` with
    ``re.match(rf".*\\.{k}$", module_name)`` (a dot before the key is required, unlike LoRA's
    ``rank_pattern``), else ``n_frequency``.

    >>> cfg = FourierFTConfig(n_frequency=8, n_frequency_pattern={"q": 4})
    >>> n_frequency_for(cfg, "model.layers.0.q"), n_frequency_for(cfg, "q")
    (4, 8)
    """
    for key, value in (config.n_frequency_pattern or {}).items():
        if re.match(rf".*\.{key}$", module_name):
            return value
    return config.n_frequency


# --------------------------------------------------------------------------------------------------
# The spectral positions (specs/fourierft.md, "2. Shapes and spectral positions")
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _randperm_prefix(n: int, k: int, seed: int) -> np.ndarray:
    bits = np.random.MT19937()
    bits._legacy_seeding(seed & 0xFFFFFFFF)  # PyTorch seeds its mt19937 with the low 32 bits
    steps = min(k, n - 1)
    z = bits.random_raw(steps).astype(np.uint64) % (np.uint64(n) - np.arange(steps, dtype=np.uint64))
    moved: dict[int, int] = {}  # the few entries the swaps touched (the others hold their own index)
    out = np.empty(k, dtype=np.int64)
    for i in range(steps):
        j = i + int(z[i])
        vi, vj = moved.get(i, i), moved.get(j, j)
        moved[i], moved[j] = vj, vi
        out[i] = vj
    if k == n:
        out[n - 1] = moved.get(n - 1, n - 1)
    out.setflags(write=False)
    return out


def spectral_indices(out_features: int, in_features: int, n_frequency: int, seed: int,
                     where: str = "fourierft") -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the ``n_frequency`` spectral positions: the first ``k`` entries ``t`` of
    PyTorch's ``torch.randperm(out·in, generator=torch.Generator().manual_seed(seed))``, as
    ``(t // in, t % in)``.

    PyTorch's CPU randperm (for ``n < 2³²/20``) is a Fisher-Yates shuffle driven by a Mersenne Twister
    seeded with ``seed mod 2³²``: step ``i`` swaps entries ``i`` and ``i + (x_i mod (n - i))``, ``x_i``
    the generator's ``i``-th 32-bit output. Entry ``i`` is final after step ``i``, so the first ``k``
    entries need only ``k`` steps (``O(k)``, not ``O(out·in)``).

    >>> rows, cols = spectral_indices(4, 5, 3, 777)
    >>> [(int(r), int(c)) for r, c in zip(rows, cols)]
    [(3, 0), (0, 0), (1, 4)]
    """
    n = int(out_features) * int(in_features)
    if not 0 < n_frequency <= n:
        raise ShapeError(f"{where}: n_frequency={n_frequency} must be between 1 and out*in = {out_features}*"
                         f"{in_features} = {n} (PEFT refuses it too)")
    if n >= _RANDPERM_32BIT_LIMIT:
        raise UnsupportedError(
            f"{where}: a {out_features}x{in_features} layer has {n} >= {_RANDPERM_32BIT_LIMIT} weights; for such "
            f"sizes PyTorch's randperm switches to 64-bit draws, which peftmath does not reproduce, so the spectral "
            f"positions (not saved in the checkpoint) cannot be recovered")
    t = _randperm_prefix(n, int(n_frequency), int(seed))
    return t // in_features, t % in_features


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/fourierft.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(n_frequency: int, *, init_weights: bool = False, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> Array:
    """The spectrum ``(k,)``: ``N(0, 1)`` draws (PEFT's default, ``init_weights=False``) or zeros (``ΔW = 0``).

    >>> init_weights(3, init_weights=True).tolist()
    [0.0, 0.0, 0.0]
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"FourierFT init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    host = np.zeros(n_frequency) if init_weights else host_rng(seed).standard_normal(n_frequency)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/fourierft.md, "4. Delta weight")
# --------------------------------------------------------------------------------------------------
def delta_weight(spectrum: Array, out_features: int, in_features: int, *, scaling: float = 150.0,
                 random_loc_seed: int = 777, dtype: Any = None, where: str = "fourierft") -> Array:
    """``ΔW = scaling · Re(IDFT₂(S))`` of shape ``(out, in)``, with the namespace's FFT: a batched ``ifft`` of
    the occupied columns of the Hermitian half grid, then ``irfft`` by row tiles written into the result
    (:class:`_SpectralRows`; one tile on JAX and dask).

    Computed in ``dtype`` (default float32, float64 for a float64 spectrum: complex64 / complex128
    transforms).

    >>> import numpy as np
    >>> dw = delta_weight(np.array([2.0]), 2, 3, scaling=1.0, random_loc_seed=0)   # one coefficient
    >>> bool(np.isclose(np.abs(dw).max(), 2.0 / 6))
    True
    """
    xp = namespace(spectrum, where=where)
    plan = _SpectralRows(spectrum, out_features, in_features, scaling, random_loc_seed, dtype, where)
    if is_immutable(spectrum):  # JAX, dask: no writes into an array; one tile (the whole grid)
        return plan.rows(0, out_features)
    dw = xp.empty((out_features, in_features), dtype=plan.real_dtype, device=array_api_compat.device(spectrum))
    step = plan.tile_rows()
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        dw[r0:r1, :] = plan.rows(r0, r1)
    return dw


class _SpectralRows:
    r"""``ΔW = α · IDFT₂(H)`` row tile by row tile, ``H = (S + S(−u, −v)) / 2`` (real, Hermitian), from its
    half grid (columns ``0 .. in/2``).

    Along the ``out`` axis only the half grid's occupied columns are transformed (``c ≤ 2k`` of ``in/2 + 1``;
    a column without a coefficient transforms to zeros), as a compact ``(out, c + 1)`` array ``Z`` (one
    batched ``ifft`` along axis 0; the extra column stays zero). Rows ``r0:r1`` of ``ΔW`` are then one
    gather of ``Z``'s rows ``r0:r1`` into the half grid's column order (an empty column reads the zero
    column) and one real inverse transform along ``in`` (``irfft``, contiguous):
    ``O(c·out·log out + out·in·log in)`` in all, against ``O(out·in·log(out·in))`` for the full transform,
    and no array of ``W``'s size besides the caller's. ``α/2`` scales the ``k`` coefficients, not ``ΔW``."""

    def __init__(self, spectrum: Array, out_features: int, in_features: int, scaling: float, seed: int,
                 dtype: Any, where: str):
        xp = namespace(spectrum, where=where)
        k = int(spectrum.shape[0]) if spectrum.ndim == 1 else -1
        if k < 1:
            raise ShapeError(f"{where}: {_KEY} must be a vector (k,), got shape {tuple(spectrum.shape)}")
        spectral_indices(out_features, in_features, k, seed, where)  # checks k and the size
        cd = dtype if dtype is not None else compute_dtype(xp, spectrum.dtype)
        dev = array_api_compat.device(spectrum)
        direct_map, mirror_map, columns = _column_plan(out_features, in_features, k, int(seed))
        half = (out_features, int(direct_map.shape[0]) // out_features)  # (out, c + 1)
        values = xp.concat([as_compute(xp, spectrum, cd) * (0.5 * scaling), xp.zeros((1,), dtype=cd, device=dev)])
        direct, mirror = (xp.reshape(xp.take(values, xp.asarray(m, device=dev), axis=0), half)
                          for m in (direct_map, mirror_map))
        direct += mirror  # both fresh gathers (JAX and dask rebind)
        del mirror
        complex_dtype = xp.complex128 if cd == xp.float64 else xp.complex64
        self.xp, self.real_dtype, self.in_features = xp, cd, in_features
        self.half_columns = in_features // 2 + 1
        self.z = xp.fft.ifft(xp.astype(direct, complex_dtype), axis=0)  # (out, c + 1)
        self.columns = xp.asarray(columns, device=dev)

    def tile_rows(self) -> int:
        """Rows per tile: a complex tile of about a quarter of :data:`~peftmath.methods._base.ROW_TILE_BYTES`
        (1 MiB: the gather, the transform and the sum stay in cache; measured faster than 4 MiB tiles)."""
        itemsize = 16 if self.real_dtype == self.xp.float64 else 8
        return max(1, ROW_TILE_BYTES // (4 * itemsize * self.half_columns))

    def rows(self, r0: int, r1: int) -> Array:
        """Rows ``r0:r1`` of ``ΔW`` (a new real array ``(r1 − r0, in)`` in the compute dtype)."""
        xp = self.xp
        with warnings.catch_warnings():  # dask's take builds a real meta array for a complex one and warns
            warnings.filterwarnings("ignore", "Casting complex values to real", np.exceptions.ComplexWarning)
            z = xp.take(self.z[r0:r1, :], self.columns, axis=1)  # (r1 − r0, in/2 + 1): the half grid's rows
        return xp.fft.irfft(z, n=self.in_features, axis=1)


@functools.lru_cache(maxsize=8)
def _column_plan(out_features: int, in_features: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compact grid of :class:`_SpectralRows`: two int32 maps over the flattened ``(out, c + 1)`` grid
    (column ``i`` = the ``i``-th occupied half-grid column ``v_i``; entry ``(u, i)``: the coefficient at cell
    ``(u, v_i)`` itself and at its mirror ``(−u mod out, −v_i mod in)``, ``k`` where there is none; the last
    column all ``k``), and the ``(in/2 + 1,)`` int64 map from each half-grid column to its column (``c`` if
    empty)."""
    m = in_features // 2 + 1
    rows, cols = spectral_indices(out_features, in_features, k, seed)
    j = np.arange(k, dtype=np.int32)
    cells = [(r, c) for r, c in ((rows, cols), ((-rows) % out_features, (-cols) % in_features))]
    used = np.unique(np.concatenate([c[c < m] for _, c in cells]))
    columns = np.full(m, used.size, dtype=np.int64)
    columns[used] = np.arange(used.size)
    maps = []
    for r, c in cells:
        grid = np.full(out_features * (used.size + 1), k, dtype=np.int32)
        keep = c < m
        grid[r[keep] * (used.size + 1) + columns[c[keep]]] = j[keep]
        maps.append(grid)  # private, never written (left writeable: torch warns on a read-only array)
    return maps[0], maps[1], columns


# --------------------------------------------------------------------------------------------------
# Forward (specs/fourierft.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, spectrum: Array, *, bias: Array | None = None, scaling: float = 150.0,
            random_loc_seed: int = 777, layer: Any = None) -> Array:
    """``base(x) + x ΔWᵀ``, computed in float32 (float64 for float64 inputs) and rounded once to the output
    dtype.

    >>> import numpy as np
    >>> W = np.zeros((2, 3)); x = np.ones((1, 3))
    >>> y = forward(x, W, np.array([6.0]), scaling=1.0, random_loc_seed=0)
    >>> bool(np.allclose(y, x @ delta_weight(np.array([6.0]), 2, 3, scaling=1.0, random_loc_seed=0).T))
    True
    """
    xp = namespace(x, weight, spectrum, bias, where="fourierft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "fourierft.forward")
    _check_kind(lay, "fourierft.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, spectrum.dtype)
    dw = delta_weight(spectrum, lay.out_features, lay.in_features, scaling=scaling, random_loc_seed=random_loc_seed,
                      dtype=cd, where="fourierft.forward")
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y + xp.matmul(xc, xp.matrix_transpose(dw)), out_dtype)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "FourierFT", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/fourierft.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class FourierFTModule(SignedModuleAdapter):
    """FourierFT on one Linear or Conv1D: ``fourierft_spectrum`` ``(k,)``. Additive: merge is ``W + ΔW``
    (``ΔWᵀ`` in a Conv1D's ``(in, out)`` layout) through the shared :func:`~peftmath.methods._base.apply_delta`."""

    peft_type = "FOURIERFT"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: FourierFTConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Linear or Conv1D: ``kind`` when given, else the config's ``fan_in_fan_out``; the spectrum does not
        tell the layer's shape, so ``weight_shape`` is required."""
        return layer_of_weight_shape(name, _KEY, params, weight_shape, kind, config.fan_in_fan_out,
                                     "FourierFT stores only spectral coefficients")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        if _KEY not in self.params:
            raise ShapeError(f"{self.name}: missing {_KEY} (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_KEY})
        if extra:
            raise ShapeError(f"{self.name}: unexpected FourierFT tensors {extra} (FourierFT has only {_KEY})")
        self.spectrum = self.params[_KEY]
        #: α; :meth:`scaled` multiplies it (``ΔW`` is linear in it)
        self.scaling = float(self.config.scaling)
        k = int(self.spectrum.shape[0]) if self.spectrum.ndim == 1 else 0
        check_shape(self.name, _KEY, self.spectrum, (max(k, 1),))
        n = self.layer.out_features * self.layer.in_features
        if k > n:
            raise ShapeError(f"{self.name}: {k} spectral coefficients do not fit a {self.layer.out_features}x"
                             f"{self.layer.in_features} layer (at most {n})")

    def describe(self) -> dict[str, Any]:
        return {"n_frequency": int(self.spectrum.shape[0]), "scaling": self.scaling,
                "random_loc_seed": self.config.random_loc_seed}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW`` in the stored layout (``(out, in)``; ``(in, out)`` for a Conv1D). ``peft_compat=True``
        rounds it to the spectrum's dtype, as PEFT does (``.to(spectrum.dtype)``; nothing for float32)."""
        xp = self.xp
        dw = delta_weight(self.spectrum, self.layer.out_features, self.layer.in_features, scaling=self.scaling,
                          random_loc_seed=self.config.random_loc_seed, where=self.name)
        if peft_compat:
            dw = as_compute(xp, as_compute(xp, dw, self.spectrum.dtype), dw.dtype)
        return xp.matrix_transpose(dw) if self.layer.kind is LayerKind.CONV1D_TRANSPOSED else dw

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """Merge: ``W + ΔW`` (the additive merge), formed in float32 (float64) and rounded once. Where the weight
        can be written (NumPy, torch, CuPy, ...), ``ΔW``'s row tiles (:class:`_SpectralRows`) are added into the
        ``(out, in)`` matrix view of ``W`` (``copy=False``) or of one private copy of it (``copy=True``): no
        array of W's size besides the result. Elsewhere (JAX, dask) ``W`` is added into a fresh ``ΔW``.
        ``peft_compat=True`` rounds ``ΔW`` to the spectrum's dtype first, as PEFT does (nothing for float32).
        Unmerge: ``W − ΔW``, as :meth:`merge` (``−ΔW`` built with the scaling's sign flipped: exact)."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.spectrum.dtype)
        lay = self.layer
        rounding = peft_compat and self.spectrum.dtype != cd

        def compute() -> Array:  # W + sign·ΔW into a fresh ΔW (stored layout)
            dw = delta_weight(self.spectrum, lay.out_features, lay.in_features, scaling=sign * self.scaling,
                              random_loc_seed=self.config.random_loc_seed, dtype=cd, where=self.name)
            if rounding:
                dw = as_compute(xp, as_compute(xp, dw, self.spectrum.dtype), cd)
            dw = xp.matrix_transpose(dw) if lay.kind is LayerKind.CONV1D_TRANSPOSED else dw
            dw += as_compute(xp, weight, cd)  # (JAX and dask rebind)
            return dw

        def kernel(M: Array) -> bool:  # M: the (out, in) matrix view, written row tile by row tile
            plan = _SpectralRows(self.spectrum, lay.out_features, lay.in_features, sign * self.scaling,
                                 self.config.random_loc_seed, cd, self.name)

            step = plan.tile_rows()

            def update(T: Array, r0: int, r1: int) -> None:  # T: rows r0:r1 of M, in cd; sub-tiles of `step` rows
                for s0 in range(r0, r1, step):
                    s1 = min(r1, s0 + step)
                    tile = plan.rows(s0, s1)
                    if rounding:
                        tile = as_compute(xp, as_compute(xp, tile, self.spectrum.dtype), cd)
                    T[s0 - r0:s1 - r0, ...] += tile

            in_row_tiles(xp, M, cd, update, tile_full=True)
            return True

        return write_weight(self.name, weight, compute, layer=lay, kernel=kernel, copy=copy, safe=safe, xp=xp)

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``α → c·α``, so ``ΔW → c·ΔW`` (PEFT defines no scale for FourierFT; this is the
        linear one)."""
        return self.scale_scaling(c)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.spectrum, bias=bias, scaling=self.scaling,
                       random_loc_seed=self.config.random_loc_seed, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: FourierFTConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"fourierft_spectrum": ...}`` of length :func:`n_frequency_for` (``init`` overrides
        ``config.init_weights``); the base weight is not changed."""
        _check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        k = n_frequency_for(config, name)
        spectral_indices(layer.out_features, layer.in_features, k, config.random_loc_seed, name)  # checks k and size
        spec = init_weights(k, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                            device=device, dtype=dtype)
        return {_KEY: spec}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = FourierFTConfig
Module = FourierFTModule
#: demo / documentation examples: row label -> config fields (non-trivial: random spectrum, scaling != 1)
EXAMPLES = {
    "FourierFT": dict(n_frequency=6, scaling=3.0, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=FourierFTConfig, module=FourierFTModule, spec="specs/fourierft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=FourierFTModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES,
    orientation_in_tensors=False,  # the spectrum's shape does not depend on the layer's orientation
)
