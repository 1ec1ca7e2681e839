"""Base-layer geometry: where "in" and "out" sit in each kind of weight.

PEFT adapts six kinds of layers. Their weights store the same kind of linear map in different
layouts; every method works on one 2-D view, the *matrix* ``(out, in_flat)``, and reshapes back.

============================  ==========================  ==========================  ==================
kind                          weight as stored            matrix view                 forward
============================  ==========================  ==========================  ==================
``Linear`` (nn.Linear)        ``(out, in)``               ``W``                       ``x W^T + b``
``Conv1D`` (transformers)     ``(in, out)``               ``W^T``                     ``x W + b``
``Embedding``                 ``(V, D)``                  ``W^T`` (D, V)              ``W[ids]``
``Conv1d/2d/3d``              ``(out, in/g, *k)``         ``(out, in/g * prod k)``    cross-correlation
``LayerNorm`` (nn.LayerNorm)  ``(n,)``                    ``(n, 1)``                  ``norm(x) γ + β``
============================  ==========================  ==========================  ==================

``Conv1D`` is what PEFT calls ``fan_in_fan_out=True``. For the Embedding the "input" is the vocabulary
(size V) and the "output" is the embedding dimension D: that is how LoRA (``lora_embedding_A`` is
``(r, V)``) and DoRA (one norm per embedding dimension) see it.

``LayerNorm`` is not a linear map: it is the kind of a 1-D per-feature weight ``γ`` (and bias ``β``) of an
``nn.LayerNorm`` over the last ``n`` features, which only LN tuning adapts (by replacing ``γ`` and ``β``).
Its forward ``(x − mean) / sqrt(var + eps) · γ + β`` needs the layer's ``eps`` (not in any checkpoint),
given as the keyword ``eps``. An RMSNorm has the same tensors and another forward: it is not this kind.

.. _conv-keywords:

Conv keywords (every method's ``forward``)
------------------------------------------
Every method's functional ``forward`` and ``Module.forward`` (hence ``Adapter.forward``) take the base
convolution's hyper-parameters as keywords, with PyTorch's meaning and defaults:

``stride=1``, ``padding=0`` (a number, one per spatial axis, ``"valid"`` or ``"same"``), ``dilation=1``
    passed to the base convolution and to the adapter's own convolutions (see each method's spec
    for where PEFT differs);
``groups=None``
    inferred from the shapes, ``g = x.shape[1] // W.shape[1]`` (input channels over the weight's
    channels per group), because a checkpoint does not record it. A given ``groups`` must agree with
    that; an input whose channels are not a multiple of ``W.shape[1]``, or a ``g`` that does not
    divide the output channels, is a :class:`~peftmath.errors.ShapeError`. Methods whose tensors fix
    the input channels (LoRA/DoRA's ``lora_A``, a feedforward IA3 vector) check the input against
    them; methods that do not define grouped convolutions (DoRA, AdaLoRA, OFT, BOFT) raise
    :class:`~peftmath.errors.UnsupportedError` for ``g > 1``.

On a Linear, transformers Conv1D or Embedding these keywords must keep their defaults (they have no
meaning there; a non-default value is a ShapeError). An input of the wrong width for any layer is a
:class:`~peftmath.errors.ShapeError` naming the module and both shapes. :meth:`Layer.for_input` is the
one place that does all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ._array import reshape_view, transpose_view
from .errors import ShapeError

Array = Any

__all__ = ["LayerKind", "Layer"]


class LayerKind(str, Enum):
    """The layer kinds PEFT adapts, named after their PyTorch / transformers classes."""

    LINEAR = "Linear"
    CONV1D_TRANSPOSED = "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out)
    EMBEDDING = "Embedding"
    CONV1D = "Conv1d"
    CONV2D = "Conv2d"
    CONV3D = "Conv3d"
    LAYER_NORM = "LayerNorm"  # torch.nn.LayerNorm: weight (n,), bias (n,); LN tuning only

    @classmethod
    def parse(cls, value: "LayerKind | str") -> "LayerKind":
        """Accept the class name (``"Conv1D"`` is transformers', ``"Conv1d"`` is torch's) or an alias."""
        if isinstance(value, LayerKind):
            return value
        for kind in cls:
            if value == kind.value:
                return kind
        aliases = {
            "linear": cls.LINEAR,
            "embedding": cls.EMBEDDING,
            "conv1d": cls.CONV1D,
            "conv2d": cls.CONV2D,
            "conv3d": cls.CONV3D,
            "transformers_conv1d": cls.CONV1D_TRANSPOSED,
            "gpt2_conv1d": cls.CONV1D_TRANSPOSED,
            "fan_in_fan_out": cls.CONV1D_TRANSPOSED,
            "layernorm": cls.LAYER_NORM,
            "layer_norm": cls.LAYER_NORM,
        }
        if isinstance(value, str) and value.lower() in aliases:
            return aliases[value.lower()]
        names = ", ".join(repr(k.value) for k in cls)
        raise ShapeError(f"unknown layer kind {value!r}; use one of {names}")

    @property
    def is_conv(self) -> bool:
        return self in (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D)

    @property
    def conv_dims(self) -> int:
        return {LayerKind.CONV1D: 1, LayerKind.CONV2D: 2, LayerKind.CONV3D: 3}.get(self, 0)


@dataclass(frozen=True)
class Layer:
    """The geometry of one base layer: its kind, its weight shape and its conv groups.

    >>> layer = Layer.of((64, 16, 3, 3))
    >>> layer.kind.value, layer.out_features, layer.in_features, layer.matrix_shape
    ('Conv2d', 64, 16, (64, 144))
    >>> Layer.of((768, 2304), kind="Conv1D").matrix_shape
    (2304, 768)
    """

    kind: LayerKind
    weight_shape: tuple[int, ...]
    groups: int = 1

    def __post_init__(self) -> None:
        kind = LayerKind.parse(self.kind)
        object.__setattr__(self, "kind", kind)
        shape = tuple(int(s) for s in self.weight_shape)
        object.__setattr__(self, "weight_shape", shape)
        expected = 2 + kind.conv_dims if kind.is_conv else 1 if kind is LayerKind.LAYER_NORM else 2
        if len(shape) != expected:
            raise ShapeError(f"a {kind.value} weight has {expected} dimensions, got shape {shape}")
        if self.groups < 1 or (kind.is_conv and shape[0] % self.groups):
            raise ShapeError(f"{kind.value} with {shape[0]} output channels cannot have groups={self.groups}")
        if self.groups != 1 and not kind.is_conv:
            raise ShapeError(f"groups={self.groups} only applies to convolutions, not {kind.value}")

    @classmethod
    def of(
        cls,
        weight_shape: tuple[int, ...],
        kind: "LayerKind | str | None" = None,
        *,
        groups: int = 1,
    ) -> "Layer":
        """The layer for a weight of ``weight_shape``; ``kind`` defaults from the number of dimensions.

        A 2-D weight is a ``Linear`` unless ``kind`` says ``"Conv1D"`` or ``"Embedding"``; 3/4/5-D
        weights are ``Conv1d/2d/3d``; a 1-D weight needs ``kind="LayerNorm"``.
        """
        shape = tuple(int(s) for s in weight_shape)
        if kind is None:
            kind = {2: LayerKind.LINEAR, 3: LayerKind.CONV1D, 4: LayerKind.CONV2D, 5: LayerKind.CONV3D}.get(len(shape))
            if kind is None:
                raise ShapeError(f"cannot infer a layer kind for a weight of shape {shape}")
        return cls(LayerKind.parse(kind), shape, groups)

    # --- geometry ---------------------------------------------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        """PEFT's flag: True when the stored weight is the transpose of the matrix view."""
        return self.kind in (LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING)

    @property
    def out_features(self) -> int:
        """Rows of the matrix view: out features, out channels, or the embedding dimension D."""
        return self.weight_shape[1] if self.fan_in_fan_out else self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """in features, in channels (all groups), the vocabulary size V, or a LayerNorm's n."""
        if self.fan_in_fan_out or self.kind is LayerKind.LAYER_NORM:
            return self.weight_shape[0]
        if self.kind.is_conv:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:] if self.kind.is_conv else ()

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the 2-D view ``(out, in_flat)``; for convs ``in_flat = in/groups * prod(kernel)``."""
        if self.kind.is_conv:
            return (self.weight_shape[0], self.weight_shape[1] * math.prod(self.kernel_size))
        if self.kind is LayerKind.LAYER_NORM:
            return (self.weight_shape[0], 1)
        return (self.out_features, self.in_features)

    def as_matrix(self, weight: Array, xp: Any) -> Array:
        """The ``(out, in_flat)`` view of ``weight`` (a view, not a copy, for contiguous NumPy)."""
        self.check_weight(weight)
        if self.fan_in_fan_out:
            return xp.matrix_transpose(weight)
        if self.kind.is_conv or self.kind is LayerKind.LAYER_NORM:
            return xp.reshape(weight, self.matrix_shape)
        return weight

    def matrix_view(self, weight: Array, xp: Any) -> Array | None:
        """The ``(out, in_flat)`` matrix of ``weight`` as a view that writes through to ``weight``'s
        memory, or None when only a copy has that shape (a Fortran-ordered, permuted or column-sliced
        conv weight, a torch ``channels_last`` tensor; see :func:`peftmath._array.reshape_view`).

        In-place kernels are only ever given this view (:func:`peftmath.methods._base.write_weight`);
        :meth:`as_matrix` is for reading and may copy.
        """
        self.check_weight(weight)
        if self.fan_in_fan_out:
            return transpose_view(weight, xp=xp)
        if self.kind.is_conv or self.kind is LayerKind.LAYER_NORM:
            return reshape_view(weight, self.matrix_shape, xp=xp)
        return weight

    def from_matrix(self, matrix: Array, xp: Any) -> Array:
        """Inverse of :meth:`as_matrix`: a ``(out, in_flat)`` array in the stored layout."""
        if tuple(matrix.shape) != self.matrix_shape:
            raise ShapeError(f"{self.kind.value}: matrix of shape {tuple(matrix.shape)}, expected {self.matrix_shape}")
        if self.fan_in_fan_out:
            return xp.matrix_transpose(matrix)
        if self.kind.is_conv or self.kind is LayerKind.LAYER_NORM:
            return xp.reshape(matrix, self.weight_shape)
        return matrix

    @classmethod
    def for_weight(cls, layer: "Layer | LayerKind | str | None", weight: Array) -> "Layer":
        """``layer`` itself, checked against ``weight``'s shape, or the layer of ``weight``'s shape
        (``layer`` then names its kind, or None for the default kind of that many dimensions)."""
        if isinstance(layer, Layer):
            layer.check_weight(weight)
            return layer
        return cls.of(tuple(weight.shape), layer)

    def check_weight(self, weight: Array, what: str = "base weight") -> None:
        if tuple(weight.shape) != self.weight_shape:
            raise ShapeError(f"{self.kind.value}: {what} has shape {tuple(weight.shape)}, expected {self.weight_shape}")

    def check_bias(self, bias: Array | None) -> None:
        if bias is not None and tuple(bias.shape) != (self.out_features,) and self.kind is not LayerKind.EMBEDDING:
            raise ShapeError(f"{self.kind.value}: bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")

    def for_input(
        self,
        x: Array,
        where: str,
        *,
        groups: int | None = None,
        channels: int | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
    ) -> tuple["Layer", dict[str, Any]]:
        """Check the input ``x`` against this layer and resolve the conv keywords (see the module's
        "Conv keywords" section, the one description every method's ``forward`` refers to).

        Returns ``(layer, conv_kwargs)``: this layer with the groups of ``x`` (``x.shape[1] //
        W.shape[1]``) and the ``stride`` / ``padding`` / ``dilation`` keywords for
        :meth:`base_forward` (empty for a layer that is not a convolution). ``channels`` is the number
        of input channels the adapter's own tensors fix (LoRA's ``lora_A.shape[1]``), None when only
        the base weight constrains them. Raises :class:`ShapeError` naming ``where`` and both shapes for
        an input of the wrong width, rank or channel count, a ``groups`` that contradicts the shapes,
        or a conv keyword on a layer that is not a convolution.
        """
        xs, ws = tuple(x.shape), self.weight_shape
        head = f"{where}: input of shape {xs} does not fit the {self.kind.value} base weight {ws}"
        if not self.kind.is_conv:
            extra = {k: v for k, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
                     if not _is_default(k, v)}
            if groups not in (None, 1):
                extra["groups"] = groups
            if extra:
                raise ShapeError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in extra.items())} only apply to "
                                 f"convolutions, not to a {self.kind.value} layer (weight {ws}); leave them out")
            if self.kind is not LayerKind.EMBEDDING:
                if len(xs) < 1 or xs[-1] != self.in_features:
                    raise ShapeError(f"{head}: its last axis must be the {self.in_features} input features, "
                                     f"shape (..., {self.in_features})")
            return self, {}
        nd = self.kind.conv_dims
        if len(xs) != nd + 2:
            raise ShapeError(f"{head}: a {self.kind.value} takes (N, C_in, {', '.join(['L', 'H, W', 'D, H, W'][nd - 1:nd])}), "
                             f"{nd + 2} axes")
        c_in, per_group = xs[1], ws[1]
        if channels is not None and c_in != channels:
            raise ShapeError(f"{head}: the adapter's tensors take {channels} input channels, the input has {c_in}")
        if per_group == 0 or c_in % per_group:
            raise ShapeError(f"{head}: its {c_in} channels are not a multiple of the weight's {per_group} "
                             f"channels per group (weight shape[1])")
        g = c_in // per_group
        if groups is not None and int(groups) != g:
            raise ShapeError(f"{where}: groups={groups} contradicts the input {xs} and the weight {ws}, which give "
                             f"groups = {c_in} // {per_group} = {g}; leave groups out or fix the input")
        if ws[0] % g:
            raise ShapeError(f"{head}: groups = {c_in} // {per_group} = {g} does not divide the {ws[0]} output channels")
        if self.groups != 1 and self.groups != g:
            raise ShapeError(f"{head}: the layer has groups={self.groups} (input channels "
                             f"{self.in_features}), the input gives groups={g}")
        layer = self if g == self.groups else Layer(self.kind, ws, g)
        return layer, dict(stride=stride, padding=padding, dilation=dilation)

    def base_forward(self, x: Array, weight: Array, bias: Array | None, xp: Any, **conv_kwargs: Any) -> Array:
        """The plain base layer: ``x W^T + b``, ``x W + b``, a lookup, a convolution, or a LayerNorm over the
        last axis (keyword ``eps``, required: ``(x − mean)/sqrt(var + eps)·γ + β``, biased variance, as torch)."""
        from ._array import conv, embedding_lookup

        if self.kind is LayerKind.EMBEDDING:
            return embedding_lookup(x, weight, xp=xp)
        from ._array import as_compute, compute_dtype

        if self.kind is LayerKind.LAYER_NORM:
            if conv_kwargs.get("eps") is None or set(conv_kwargs) != {"eps"}:
                raise ShapeError(f"LayerNorm {self.weight_shape}: the forward takes exactly the keyword eps (the "
                                 f"layer's epsilon, which no checkpoint holds), got {sorted(conv_kwargs)}")
            cd = compute_dtype(xp, xp.result_type(x.dtype, weight.dtype))
            xc = as_compute(xp, x, cd)
            centred = xc - xp.mean(xc, axis=-1, keepdims=True)
            y = centred / xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True) + float(conv_kwargs["eps"]))
            y = y * as_compute(xp, weight, cd) + (0.0 if bias is None else as_compute(xp, bias, cd))
            return as_compute(xp, y, xp.result_type(x.dtype, weight.dtype))

        out_dtype = xp.result_type(x.dtype, weight.dtype)
        # half precision is multiplied in float32 and rounded once (NumPy's bfloat16 matmul would
        # accumulate in bfloat16)
        cd = compute_dtype(xp, out_dtype)
        xc, wc = as_compute(xp, x, cd), as_compute(xp, weight, cd)
        bc = None if bias is None else as_compute(xp, bias, cd)
        if self.kind in (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED):
            w2 = xp.matrix_transpose(wc) if self.kind is LayerKind.LINEAR else wc
            if isinstance(xc, np.ndarray) and xc.ndim > 2:
                # NumPy runs a stacked (..., T, in) @ (in, out) as one product per leading index, each reading
                # all of W (64 x 1 x 4096 on a 4096² weight: 527 ms against 84 ms); one gemm over the tokens
                y = np.reshape(np.matmul(np.reshape(xc, (-1, xc.shape[-1])), w2), (*xc.shape[:-1], w2.shape[-1]))
            else:
                y = xp.matmul(xc, w2)
        else:
            y = conv(xc, wc, bc, groups=self.groups, xp=xp, **conv_kwargs)
            bc = None
        if bc is not None:
            y = y + bc
        return as_compute(xp, y, out_dtype)


def _is_default(name: str, value: Any) -> bool:
    """True when conv keyword ``name`` has its default (1 for stride/dilation, 0 or "valid" for padding)."""
    default = 0 if name == "padding" else 1
    if isinstance(value, str):
        return name == "padding" and value == "valid"
    if isinstance(value, (tuple, list)):
        return all(v == default for v in value)
    return value == default
