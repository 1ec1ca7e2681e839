"""Base-layer geometry: where "in" and "out" sit in each kind of weight.

PEFT adapts six kinds of layers. Their weights store the same kind of linear map in different
layouts; every method works on one 2-D view, the *matrix* ``(out, in_flat)``, and reshapes back.

============================  ==========================  ======================  ==================
kind                          weight as stored            matrix view             forward
============================  ==========================  ======================  ==================
``Linear`` (nn.Linear)        ``(out, in)``               ``W``                   ``x W^T + b``
``Conv1D`` (transformers)     ``(in, out)``               ``W^T``                 ``x W + b``
``Embedding``                 ``(V, D)``                  ``W^T`` (D, V)          ``W[ids]``
``Conv1d/2d/3d``              ``(out, in/g, *k)``         ``(out, in/g * prod k)``  cross-correlation
============================  ==========================  ======================  ==================

``Conv1D`` is what PEFT calls ``fan_in_fan_out=True``. For the Embedding the "input" is the vocabulary
(size V) and the "output" is the embedding dimension D: that is how LoRA (``lora_embedding_A`` is
``(r, V)``) and DoRA (one norm per embedding dimension) see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

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
        expected = 2 + kind.conv_dims if kind.is_conv else 2
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
        weights are ``Conv1d/2d/3d``.
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
        """in features, in channels (all groups), or the vocabulary size V."""
        if self.fan_in_fan_out:
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
        return (self.out_features, self.in_features)

    def as_matrix(self, weight: Array, xp: Any) -> Array:
        """The ``(out, in_flat)`` view of ``weight`` (a view, not a copy, for contiguous NumPy)."""
        self.check_weight(weight)
        if self.fan_in_fan_out:
            return xp.matrix_transpose(weight)
        if self.kind.is_conv:
            return xp.reshape(weight, self.matrix_shape)
        return weight

    def from_matrix(self, matrix: Array, xp: Any) -> Array:
        """Inverse of :meth:`as_matrix`: a ``(out, in_flat)`` array in the stored layout."""
        if tuple(matrix.shape) != self.matrix_shape:
            raise ShapeError(f"{self.kind.value}: matrix of shape {tuple(matrix.shape)}, expected {self.matrix_shape}")
        if self.fan_in_fan_out:
            return xp.matrix_transpose(matrix)
        if self.kind.is_conv:
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

    def base_forward(self, x: Array, weight: Array, bias: Array | None, xp: Any, **conv_kwargs: Any) -> Array:
        """The plain base layer: ``x W^T + b``, ``x W + b``, a lookup, or a convolution."""
        from ._array import conv, embedding_lookup

        if self.kind is LayerKind.EMBEDDING:
            return embedding_lookup(x, weight, xp=xp)
        from ._array import as_compute, compute_dtype

        out_dtype = xp.result_type(x.dtype, weight.dtype)
        # half precision is multiplied in float32 and rounded once (NumPy's bfloat16 matmul would
        # accumulate in bfloat16)
        cd = compute_dtype(xp, out_dtype)
        xc, wc = as_compute(xp, x, cd), as_compute(xp, weight, cd)
        bc = None if bias is None else as_compute(xp, bias, cd)
        if self.kind is LayerKind.LINEAR:
            y = xp.matmul(xc, xp.matrix_transpose(wc))
        elif self.kind is LayerKind.CONV1D_TRANSPOSED:
            y = xp.matmul(xc, wc)
        else:
            y = conv(xc, wc, bc, groups=self.groups, xp=xp, **conv_kwargs)
            bc = None
        if bc is not None:
            y = y + bc
        return as_compute(xp, y, out_dtype)
