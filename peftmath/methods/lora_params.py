r"""LoRA on raw parameters: PEFT's ``target_parameters`` (``lora.ParamWrapper``; specs/lora.md, §12).

Some modules hold their weights as bare ``nn.Parameter`` tensors instead of ``nn.Linear`` layers (the
experts of a mixture-of-experts block: ``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)``). PEFT adapts
such a parameter ``P`` with a LoRA pair whose delta is added to ``P`` itself::

    2-D P (o, i):            A (r, i)      B (o, r)      ΔP = s · B A                       (as nn.Linear)
    3-D P (E, d1, d2):       A (r·E, in)   B (out, r·E)  A_e = A.reshape(E, r, in)[e]
                                                         B_e = B.reshape(out, r, E)[:, :, e]
        is_transposed=False: in = d2, out = d1           ΔP[e] = s · B_e A_e          (d1, d2)
        is_transposed=True:  in = d1, out = d2           ΔP[e] = s · (B_e A_e)ᵀ       (d1, d2)
    s = lora_alpha / r  (use_rslora: lora_alpha / √r), r and alpha from rank_pattern / alpha_pattern
        matched against the PARAMETER's name ``<module>.<param>`` (PEFT's ``current_key``)

``A`` is split expert-major (row ``e·r + k``), ``B`` rank-major (column ``k·E + e``): PEFT's reshapes. With
``E = 1`` PEFT runs the 2-D formula (no transpose). ``is_transposed`` is an attribute of the transformers
experts module (GPT-OSS, Aria); it is not in the checkpoint, so peftmath reads it from the factors' shapes
and refuses a square ``(E, d, d)`` parameter, where both readings fit.

Checkpoint keys hang on the module that holds the parameter: ``<module>.lora_A.weight``. Several targeted
parameters of one module nest wrappers, the first parameter in the module's registration order innermost:
``<module>.base_layer.lora_A.weight`` (first), ``<module>.lora_A.weight`` (second), and so on. The
registration order is not in the checkpoint: peftmath pairs wrappers and parameters by their shapes
(:func:`parameter_key`) and refuses a pairing the shapes leave open. peftmath names each wrapper as PEFT's
model does (``experts``, ``experts.base_layer``), so the adapter saves back under PEFT's keys.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .._array import as_compute, compute_dtype
from ..config import resolve_pattern
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, apply_delta
from .lora import LoraModule, compat_delta, delta_matrix, scaling

Array = Any

__all__ = ["parameter_delta", "targeted_leaves", "split_wrapper", "is_wrapper", "parameter_key",
           "ParameterLayer", "ParamLoraModule", "wrapper_names", "initialize", "TRANSPOSED_EXPERTS_MODEL_TYPES"]

WRAPPER = ".base_layer"


# --------------------------------------------------------------------------------------------------
# Which parameters a config targets, and which wrapper adapts which one
# --------------------------------------------------------------------------------------------------
def split_wrapper(name: str) -> tuple[str, int]:
    """``"experts.base_layer.base_layer"`` -> ``("experts", 2)``: the module holding the parameter and the
    wrapper's depth (0: the outermost wrapper, PEFT's last-registered targeted parameter)."""
    depth = 0
    while name.endswith(WRAPPER):
        name, depth = name[: -len(WRAPPER)], depth + 1
    return name, depth


def targeted_leaves(config: Any, module: str) -> list[str]:
    """The parameter names of ``module`` that ``config.target_parameters`` targets by name (PEFT's rule:
    ``<module>.<p>`` equals a pattern or ends with ``"." + pattern``), sorted; [] without target_parameters."""
    out = set()
    for t in getattr(config, "target_parameters", None) or ():
        leaf = t.rpartition(".")[2]
        key = f"{module}.{leaf}"
        if key == t or key.endswith("." + t):
            out.add(leaf)
    return sorted(out)


def is_wrapper(config: Any, name: str) -> bool:
    """Whether checkpoint module path ``name`` is a (possibly nested) ``ParamWrapper`` of ``config``: a nested
    path ``<module>.base_layer`` within the number of ``<module>``'s targeted parameters, or a module with
    targeted parameters that ``target_modules`` does not name (PEFT refuses a module that is both). A bare
    pattern (``"down_proj"``) names a parameter of every module by name alone: the base model's tensors decide
    then (:func:`parameter_key` finds none and the module is a ``target_modules`` one)."""
    module, depth = split_wrapper(name)
    if "base_layer" in module.split(".") or depth >= len(targeted_leaves(config, module)):
        return False
    return depth > 0 or not _module_target(config, module)


def _module_target(config: Any, name: str) -> bool:
    """PEFT's ``target_modules`` rule for ``name`` (a list: the name or a ``.``-suffix; a string: a full regex
    match; "all-linear" is not decided by names: False)."""
    targets = getattr(config, "target_modules", None)
    if not targets:
        return False
    if isinstance(targets, str):
        return targets != "all-linear" and re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _rank_alpha(config: Any, key: str) -> tuple[int, float]:
    return (resolve_pattern(config.rank_pattern or {}, key, config.r),
            resolve_pattern(config.alpha_pattern or {}, key, config.lora_alpha))


def _readings(A: Any, B: Any, shape: tuple[int, ...], r: int) -> list[bool]:
    """The orientations (``is_transposed``) under which factors ``A``, ``B`` of rank ``r`` fit a parameter
    of ``shape``: [False] for a fitting 2-D parameter or 3-D with E = 1 (PEFT's 2-D formula), [False] /
    [True] / both (square) for E > 1, [] when they do not fit."""
    a, b = tuple(A.shape), tuple(B.shape)
    if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
        return []
    if len(shape) == 2:
        return [False] if a == (r, shape[1]) and b == (shape[0], r) else []
    if len(shape) != 3 or a[0] != r * shape[0]:
        return []
    E, d1, d2 = shape
    out = [False] if (a[1], b[0]) == (d2, d1) else []
    if E > 1 and (a[1], b[0]) == (d1, d2):
        out.append(True)
    return out


def parameter_key(config: Any, name: str, params: Mapping[str, Mapping[str, Any]],
                  shape_of: Callable[[str], tuple[int, ...] | None]) -> tuple[str, str] | None:
    """``(parameter key, bias key)`` of the base tensor wrapper ``name`` adapts, or None when ``name`` is not a
    ``target_parameters`` wrapper (a ``target_modules`` module: ``<module>.weight``).

    ``params`` are all the adapter's modules (the wrappers of one module are paired together) and
    ``shape_of(key)`` the base tensor shape (None: absent). The bias key is the module's ``bias`` when the
    parameter is its ``weight`` (the nn.Linear case, for the forward), else ``<module>.<param>.bias``, which no
    state dict holds (a parameter has no children): the merge leaves every bias alone. Raises :class:`ShapeError` when no
    pairing of wrappers and targeted parameters fits the shapes, :class:`UnsupportedError` when several do.
    """
    if not is_wrapper(config, name):
        return None
    module, depth = split_wrapper(name)
    leaves = targeted_leaves(config, module)
    present = [p for p in leaves if shape_of(f"{module}.{p}") is not None]
    if not present and depth == 0 and shape_of(f"{module}.weight") is not None:
        return None  # a module named by a bare pattern, without that parameter: <module>.weight
    if not present:
        if len(leaves) == 1:  # the caller reports the missing tensor, as for <module>.weight
            return f"{module}.{leaves[0]}", f"{module}.{leaves[0]}.bias"
        raise ShapeError(f"{name}: the base has none of the parameters this LoRA wrapper may adapt "
                         f"({', '.join(f'{module}.{p}' for p in leaves)}); is this the adapter's base model?")
    siblings = sorted(m for m in params if split_wrapper(m)[0] == module)

    def fits(m: str, p: str) -> bool:
        f, key = params[m], f"{module}.{p}"
        return ("lora_A.weight" in f and "lora_B.weight" in f
                and bool(_readings(f["lora_A.weight"], f["lora_B.weight"], shape_of(key), _rank_alpha(config, key)[0])))

    pairings = [dict(zip(siblings, choice)) for choice in itertools.permutations(present, len(siblings))
                if all(fits(m, p) for m, p in zip(siblings, choice))]
    if not pairings:
        shapes = ", ".join(f"{module}.{p} {shape_of(f'{module}.{p}')}" for p in present)
        factors = ", ".join(f"{m}: lora_A {tuple(params[m]['lora_A.weight'].shape)} / lora_B "
                            f"{tuple(params[m]['lora_B.weight'].shape)}" for m in siblings
                            if "lora_A.weight" in params[m] and "lora_B.weight" in params[m])
        raise ShapeError(f"{name}: the LoRA wrapper(s) of {module} ({factors}) fit none of its targeted parameters "
                         f"({shapes}) with the config's r / rank_pattern; is this the adapter's base model?")
    if len(pairings) > 1:
        raise UnsupportedError(
            f"{name}: {len(siblings)} LoRA wrappers of {module} fit its targeted parameters "
            f"{', '.join(present)} in more than one way (same shapes and ranks). PEFT nests them in the module's "
            f"parameter registration order, which the checkpoint does not record, so peftmath cannot tell which "
            f"parameter each wrapper adapts; it refuses rather than guess")
    leaf = pairings[0][name]
    return f"{module}.{leaf}", (f"{module}.bias" if leaf == "weight" else f"{module}.{leaf}.bias")


# --------------------------------------------------------------------------------------------------
# The delta (array API, written once)
# --------------------------------------------------------------------------------------------------
def parameter_delta(A: Array, B: Array, shape: tuple[int, ...], *, scaling: float, transposed: bool = False,
                    xp: Any = None, dtype: Any = None) -> Array:
    """``ΔP`` of shape ``shape`` (the module docstring's table): ``s·B A`` for a 2-D parameter (and 3-D with
    E = 1), else per expert ``s·B_e A_e`` (``transposed``: its transpose), computed in ``dtype`` (default
    float32 / float64)."""
    from .._array import namespace

    xp = xp or namespace(A, B, where="target_parameters")
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype)
    if len(shape) == 2 or shape[0] == 1:
        return xp.reshape(delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd), tuple(shape))
    E = int(shape[0])
    r = int(A.shape[0]) // E
    A3 = xp.reshape(as_compute(xp, A, cd), (E, r, int(A.shape[1])))                                # (E, r, in)
    B3 = xp.permute_dims(xp.reshape(as_compute(xp, B, cd), (int(B.shape[0]), r, E)), (2, 0, 1))    # (E, out, r)
    D = xp.matmul(B3, A3) * scaling                                                                # (E, out, in)
    return xp.permute_dims(D, (0, 2, 1)) if transposed else D


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterLayer(Layer):
    """A targeted parameter's geometry: ``weight_shape`` is the parameter's (2-D: an ``(out, in)`` matrix,
    kind Linear; 3-D: ``(E, d1, d2)`` experts), ``parameter`` its name in the model (the rank_pattern key)
    and ``transposed`` PEFT's ``is_transposed`` reading."""

    parameter: str = ""
    transposed: bool = False

    def __post_init__(self) -> None:
        if len(self.weight_shape) == 2:
            super().__post_init__()
            return
        object.__setattr__(self, "kind", LayerKind.parse(self.kind))
        object.__setattr__(self, "weight_shape", tuple(int(s) for s in self.weight_shape))
        if len(self.weight_shape) != 3:
            raise ShapeError(f"{self.parameter}: LoRA on nn.Parameter adapts 2-D and 3-D parameters (PEFT too), "
                             f"got shape {self.weight_shape}")

    @property
    def experts(self) -> int:
        return 1 if len(self.weight_shape) == 2 else self.weight_shape[0]


#: config fields PEFT's ParamWrapper refuses (``ValueError`` at creation): no checkpoint can have them
_REFUSED = {"fan_in_fan_out": "fan_in_fan_out", "lora_bias": "lora_bias=True", "use_dora": "use_dora=True",
            "velora_config": "velora_config", "kasa_config": "kasa_config", "use_bdlora": "use_bdlora",
            "alora_invocation_tokens": "alora_invocation_tokens"}


def infer_layer(name: str, config: Any, params: Mapping[str, Any], weight_shape: tuple[int, ...] | None,
                kind: Any = None) -> ParameterLayer:
    """The :class:`ParameterLayer` of wrapper ``name`` from its factors and, when given, the parameter's
    shape (without it: a 2-D parameter for E = 1, else the ``is_transposed=False`` experts). ``kind`` is
    ignored: PEFT reads a 2-D parameter as ``(out, in)`` whatever its module."""
    module, _ = split_wrapper(name)
    for field_name, what in _REFUSED.items():
        value = getattr(config, field_name, None)
        if value not in (None, False, {}):
            raise ConfigError(f"{name}: {what} with target_parameters; PEFT 0.21.2's ParamWrapper refuses it "
                              f"(ValueError), so this config cannot have made this checkpoint")
    missing = [k for k in ("lora_A.weight", "lora_B.weight") if k not in params]
    if missing:
        raise ShapeError(f"{name}: the adapter has no {' / '.join(missing)} for this wrapper (found: {sorted(params)})")
    A, B = params["lora_A.weight"], params["lora_B.weight"]
    options = []
    for leaf in targeted_leaves(config, module):
        key = f"{module}.{leaf}"
        r, alpha = _rank_alpha(config, key)
        if weight_shape is not None:
            shapes = [tuple(int(s) for s in weight_shape)]
        elif tuple(A.shape)[0] == r:
            shapes = [(int(B.shape[0]), int(A.shape[1]))]
        elif r and A.shape[0] % r == 0:
            shapes = [(int(A.shape[0]) // r, int(B.shape[0]), int(A.shape[1]))]
        else:
            shapes = []
        options += [(key, r, alpha, s, t) for s in shapes for t in _readings(A, B, s, r)]
    if not options:
        raise ShapeError(f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} fit no targeted parameter of "
                         f"{module}" + (f" of shape {tuple(weight_shape)}" if weight_shape is not None else "")
                         + " with the config's r / rank_pattern; is this the adapter's base model?")
    if len({o[3] for o in options}) == 1 and {o[4] for o in options} == {False, True}:
        raise UnsupportedError(
            f"{name}: the {options[0][3]} parameter is square per expert, so lora_A {tuple(A.shape)} / lora_B "
            f"{tuple(B.shape)} fit it both as (experts, out, in) and as (experts, in, out) (the experts module's "
            f"is_transposed, which the checkpoint does not record); the two give transposed deltas, so peftmath "
            f"refuses rather than guess")
    if len({o[1:] for o in options}) > 1:
        raise UnsupportedError(
            f"{name}: its factors fit several targeted parameters of {module} with different shapes, ranks or "
            f"scalings ({', '.join(o[0] for o in options)}); pass the base parameter's shape (merge with the base "
            f"model) to tell them apart")
    key, _, _, shape, transposed = options[0]
    return ParameterLayer(LayerKind.LINEAR, shape, parameter=key, transposed=transposed)


# --------------------------------------------------------------------------------------------------
# Creation (create_adapter): PEFT's wrapper names and its ParamWrapper.update_layer initialisation
# --------------------------------------------------------------------------------------------------
#: transformers model types whose experts modules set ``is_transposed = True`` (``use_experts_implementation(
#: is_transposed=True)`` in transformers 5's modeling files): their 3-D parameters are stored ``(E, in, out)``
TRANSPOSED_EXPERTS_MODEL_TYPES = frozenset({"aria", "ergo", "gpt_oss", "openai_privacy_filter"})

#: what PEFT 0.21.2's ParamWrapper raises on at creation besides :data:`_REFUSED` (``lora_dropout``; the LoRA variants
#: ``resolve_lora_variant`` finds, as it has none: MonteCLoRA, Arrow, MiCA)
_REFUSED_AT_CREATION = {"monteclora_config": "monteclora_config", "arrow_config": "arrow_config"}


def wrapper_names(module: str, leaves: list[str]) -> dict[str, str]:
    """``{wrapper name: parameter leaf}`` for the targeted parameters ``leaves`` of ``module`` in the module's
    registration order: PEFT nests one ``ParamWrapper`` per parameter, the first registered innermost.

    >>> wrapper_names("experts", ["gate_up_proj", "down_proj"])
    {'experts.base_layer': 'gate_up_proj', 'experts': 'down_proj'}
    """
    n = len(leaves)
    return {module + WRAPPER * (n - 1 - i): leaf for i, leaf in enumerate(leaves)}


def initialize(name: str, config: Any, layer: ParameterLayer, *, seed: Any = 0, xp: Any = None, device: Any = None,
               init: Any = None) -> dict[str, Array]:
    """Fresh ``lora_A`` / ``lora_B`` of wrapper ``name`` on ``layer.parameter`` (PEFT's ``ParamWrapper.update_layer``),
    float32, drawn on the host from ``seed`` (``init`` overrides ``config.init_lora_weights``)::

        A (r·E, in)   B (out, r·E)     (the module docstring's in / out; r, alpha from the parameter's key)
        True          A ~ U(±1/√in) (kaiming-uniform a=√5), B = 0           ΔP = 0 exactly
        "gaussian"    A ~ N(0, (1/r)²) (r per expert, PEFT's std), B = 0    ΔP = 0 exactly
        False         A ~ U(±1/√in), B ~ U(±1/√(r·E)) (nn.Linear's init)     not a no-op

    Refused: what PEFT's ParamWrapper refuses (:class:`ConfigError`: lora_dropout, fan_in_fan_out, lora_bias,
    the LoRA variants), the inits that need the module's ``weight`` or data (:class:`UnsupportedError`: PEFT
    fails on an experts module, which has none), and a transposed 3-D parameter with one expert that is not
    square (PEFT then adds a ``(d2, d1)`` delta to a ``(1, d1, d2)`` parameter)."""
    from ..backends import host_rng
    from .lora import init_weights, xp_like

    refused = {**_REFUSED, **_REFUSED_AT_CREATION}
    on = [what for field_name, what in refused.items() if getattr(config, field_name, None) not in (None, False, {})]
    if getattr(config, "lora_dropout", 0.0):
        on.append(f"lora_dropout={config.lora_dropout}")
    if on:
        raise ConfigError(f"{name}: {', '.join(on)} with target_parameters ({layer.parameter}); PEFT 0.21.2's "
                          f"ParamWrapper refuses it (ValueError); drop it for the targeted parameters")
    how = config.init_lora_weights if init is None else init
    if how not in (True, False, "gaussian"):
        raise UnsupportedError(
            f"{name}: init_lora_weights={how!r} on the parameter {layer.parameter}; peftmath initialises a "
            f"target_parameters wrapper with true, false or 'gaussian' (PEFT runs the others on the module's "
            f"'weight', which an experts module does not have)")
    shape = layer.weight_shape
    E = layer.experts
    if len(shape) == 3 and E == 1 and layer.transposed and shape[1] != shape[2]:
        raise UnsupportedError(f"{name}: {layer.parameter} {shape} with is_transposed and one expert; PEFT 0.21.2 "
                               f"adds a ({shape[2]}, {shape[1]}) delta to it (its 2-D formula) and fails")
    inn, out = (shape[1], shape[0]) if len(shape) == 2 else ((shape[1], shape[2]) if layer.transposed else
                                                              (shape[2], shape[1]))
    r, _ = _rank_alpha(config, layer.parameter)
    rng = host_rng(seed)
    # gaussian: PEFT's std is 1/r with the per-expert r, not init_weights' 1/(r·E); its zero B comes from True
    res = init_weights(Layer.of((out, inn)), r * E, init_lora_weights=True if how == "gaussian" else how, seed=rng,
                       xp=xp, device=device)
    A = xp_like(res.B, rng.normal(0.0, 1.0 / r, (r * E, inn)).astype(np.float32), device) if how == "gaussian" else res.A
    return {"lora_A.weight": A, "lora_B.weight": res.B}


class ParamLoraModule(LoraModule):
    """LoRA on one targeted parameter (PEFT's ``lora.ParamWrapper``): merge ``P + ΔP``, unmerge ``P − ΔP``;
    a 2-D parameter is LoRA on an ``(out, in)`` Linear weight (its forward: the nn.Linear forward); a 3-D
    parameter has no forward here (PEFT runs the module's own forward with ``P + ΔP``)."""

    layer: ParameterLayer

    def validate(self) -> None:
        p, lay = self.params, self.layer
        if not isinstance(lay, ParameterLayer):
            raise ShapeError(f"{self.name}: a target_parameters wrapper needs its ParameterLayer (infer_layer)")
        self.A, self.B = p["lora_A.weight"], p["lora_B.weight"]
        extra = sorted(set(p) - {"lora_A.weight", "lora_B.weight"})
        if extra:
            raise UnsupportedError(f"{self.name}: {', '.join(extra)} beside a target_parameters wrapper's lora_A / "
                                   f"lora_B; PEFT's ParamWrapper has no such tensors")
        r, alpha = _rank_alpha(self.config, lay.parameter)
        if not _readings(self.A, self.B, lay.weight_shape, r):
            raise ShapeError(f"{self.name}: lora_A {tuple(self.A.shape)} / lora_B {tuple(self.B.shape)} do not fit "
                             f"{lay.parameter} {lay.weight_shape} with r={r} (rank_pattern key {lay.parameter!r})")
        self.r = r
        self.scaling = scaling(alpha, r, use_rslora=self.config.use_rslora)
        self.lora_bias = None
        self.input_channels = None

    def describe(self) -> dict[str, Any]:
        r, alpha = _rank_alpha(self.config, self.layer.parameter)
        return {"r": r, "alpha": alpha, "scaling": self.scaling, "dora": False, "parameter": self.layer.parameter,
                "experts": self.layer.experts, "is_transposed": self.layer.transposed}

    def _delta(self, dtype: Any, peft_compat: bool) -> Array:
        d = parameter_delta(self.A, self.B, self.layer.weight_shape, scaling=self.scaling,
                            transposed=self.layer.transposed, xp=self.xp, dtype=dtype)
        return compat_delta(self.xp, self.A, self.B, d) if peft_compat else d

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔP`` in the parameter's shape (:func:`parameter_delta`)."""
        return self._delta(None, peft_compat)

    def _apply(self, weight: Array, sign: int, copy: bool, safe: bool, peft_compat: bool) -> Array:
        self.layer.check_weight(weight, f"base parameter {self.layer.parameter}")
        cd = compute_dtype(self.xp, self.A.dtype, self.B.dtype, weight.dtype)
        # PEFT's ParamWrapper rounds ΔP to the parameter's dtype before it adds or subtracts it
        return apply_delta(self.name, weight, lambda: self._delta(cd, peft_compat), sign=sign, copy=copy, safe=safe,
                           round_delta_to=weight.dtype if peft_compat else None, xp=self.xp)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        if not copy:
            self.require_inplace(weight)
        return MergeResult(self._apply(weight, 1, copy, safe, peft_compat), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        if not copy:
            self.require_inplace(weight)
        return MergeResult(self._apply(weight, -1, copy, False, peft_compat), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """2-D ``weight`` parameter: the nn.Linear forward ``x (W + ΔW)ᵀ + b`` computed as LoRA's; refused for
        other parameters (peftmath does not know the module's own forward)."""
        if len(self.layer.weight_shape) != 2 or not self.layer.parameter.endswith(".weight"):
            raise UnsupportedError(
                f"{self.name}: {self.layer.parameter} {self.layer.weight_shape} is a raw parameter used by its "
                f"module's own forward, which peftmath does not know; merge the adapter (P + ΔP) or use "
                f"delta_weight instead")
        return super().forward(x, weight, bias, **layer_kwargs)
