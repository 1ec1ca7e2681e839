"""Conformance cases for other engines' multi-adapter kernels (the mixed batch).

A serving engine that batches requests for different LoRA adapters (Punica's SGMV, S-LoRA, vLLM's
LoRA kernels, a port to Rust or C++) computes, for every row ``b`` of a batch,

    y_b = x_b Wᵀ + bias + s_a · (x_b Aₐᵀ) Bₐᵀ        with a = names[b]   (no adapter term for "__base__")

:func:`mixed_batch_cases` builds small cases that walk the segment patterns such kernels get wrong —
every row on one adapter, every row on a different one, uniform and skewed segments, a Zipf-like mix,
rows on the base model only, heterogeneous ranks, several tokens per row — each with its expected output
computed independently in float64, row by row. :func:`check_mixed_batch` runs an engine's forward on
every case and reports the error against a bound derived for float32 (or half-precision) arithmetic;
:func:`assert_mixed_batch` raises ``AssertionError`` listing the cases that fail. peftmath's own
:func:`~peftmath.multi.mixed_batch_forward` passes them (``tests/test_conformance.py``), on every array
library it supports, and so does PEFT's ``adapter_names`` forward (``tests/parity``).

>>> import numpy as np
>>> def reference(case):   # the engine under test: here a plain loop over the rows, in float64
...     f = lambda a: np.asarray(a, dtype=np.float64)
...     y = f(case.x) @ f(case.weight).T + f(case.bias)
...     for b, name in enumerate(case.names):
...         if name != "__base__":
...             A, B, s = case.adapters[name]
...             y[b] += s * (f(case.x[b]) @ f(A).T) @ f(B).T
...     return y
>>> [r.ok for r in check_mixed_batch(reference)] == [True] * len(mixed_batch_cases())
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MixedBatchCase", "CaseResult", "PATTERNS", "mixed_batch_cases", "check_mixed_batch",
           "assert_mixed_batch"]

#: the segment patterns, each a rule for the adapter of every row
PATTERNS = ("identical", "distinct", "uniform", "skewed", "zipf", "base-only", "one-row-each")

BASE = "__base__"


@dataclass(frozen=True)
class MixedBatchCase:
    """One mixed batch. Arrays are NumPy (convert them to your library); ``adapters`` maps a name to
    ``(A, B, scaling)`` with ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``; ``expected`` is
    the float64 result computed row by row from the inputs as given (already rounded to ``dtype``)."""

    name: str
    pattern: str
    dtype: str
    x: np.ndarray                       # (batch, tokens, in)
    weight: np.ndarray                  # (out, in)
    bias: np.ndarray                    # (out,)
    adapters: dict[str, tuple[np.ndarray, np.ndarray, float]]
    names: list[str]
    expected: np.ndarray = field(repr=False)   # (batch, tokens, out), float64
    bound: np.ndarray = field(repr=False)      # elementwise error bound, float64


@dataclass(frozen=True)
class CaseResult:
    name: str
    max_error: float
    max_ratio: float       # max over elements of |error| / bound; ok when <= 1
    ok: bool
    detail: str = ""


def _names(pattern: str, adapters: Sequence[str], batch: int, rng: np.random.Generator) -> list[str]:
    choices = list(adapters) + [BASE]
    if pattern == "identical":
        return [adapters[0]] * batch
    if pattern == "distinct":
        return [choices[i % len(choices)] for i in range(batch)]
    if pattern == "uniform":
        return [str(v) for v in rng.choice(choices, batch)]
    if pattern == "skewed":
        return [adapters[0]] * (batch - 3) + [adapters[-1], BASE, adapters[1]]
    if pattern == "zipf":
        return [choices[min(int(z) - 1, len(choices) - 1)] for z in rng.zipf(1.7, batch)]
    if pattern == "base-only":
        return [BASE] * batch
    if pattern == "one-row-each":
        return list(rng.permutation(list(adapters)))[:batch]
    raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16)
    return a.astype(dtype)


def _unit_roundoff(dtype: str) -> float:
    return {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]


def mixed_batch_cases(*, seed: int = 0, dtypes: Sequence[str] = ("float32", "bfloat16"),
                      patterns: Sequence[str] = PATTERNS, n_adapters: int = 6, batch: int = 12, tokens: int = 3,
                      in_features: int = 24, out_features: int = 20) -> list[MixedBatchCase]:
    """The cases: every pattern x dtype, adapters of ranks 1 to ``n_adapters`` (heterogeneous) with
    different scalings, a bias, ``tokens`` tokens per row. Deterministic for a given ``seed``.

    The bound per output element assumes the engine accumulates its dot products in float32 (or wider):
    ``(in + r + 2)·u32·M + u·(M + |y|)``, where ``M`` is the sum of the absolute products
    (``|x||W|ᵀ + |bias| + s·|x||A|ᵀ|B|ᵀ``), ``u32 = 2⁻²⁴`` and ``u`` the unit roundoff of a half-precision
    ``dtype`` (0 for float32): in half precision the base layer's output may be rounded to ``dtype`` before
    the adapter term is added (as base layers and serving kernels do), the adapter's intermediate
    ``x Aᵀ`` too, and the sum is rounded once more. An engine that accumulates the dot products themselves
    in half precision exceeds it.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for dtype in dtypes:
        for pattern in patterns:
            names_ = [f"a{i}" for i in range(n_adapters)]
            adapters = {}
            for i, nm in enumerate(names_):
                r = i + 1
                A = _cast(rng.standard_normal((r, in_features)) / np.sqrt(in_features), dtype)
                B = _cast(rng.standard_normal((out_features, r)) / np.sqrt(r), dtype)
                adapters[nm] = (A, B, float(2.0 * (i + 1) / r))
            W = _cast(rng.standard_normal((out_features, in_features)) / np.sqrt(in_features), dtype)
            bias = _cast(rng.standard_normal(out_features), dtype)
            n_rows = n_adapters if pattern == "one-row-each" else batch
            x = _cast(rng.standard_normal((n_rows, tokens, in_features)), dtype)
            names = _names(pattern, names_, n_rows, rng)
            f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
            y = f(x) @ f(W).T + f(bias)
            mag = np.abs(f(x)) @ np.abs(f(W)).T + np.abs(f(bias))
            rank = np.zeros(n_rows)
            for b, nm in enumerate(names):
                if nm == BASE:
                    continue
                A, B, s = adapters[nm]
                y[b] += s * (f(x[b]) @ f(A).T) @ f(B).T
                mag[b] += s * (np.abs(f(x[b])) @ np.abs(f(A)).T) @ np.abs(f(B)).T
                rank[b] = A.shape[0]
            u_out = 0.0 if dtype in ("float32", "float64") else _unit_roundoff(dtype)
            terms = in_features + rank[:, None, None] + 2
            bound = terms * 2.0**-24 * mag + u_out * (mag + np.abs(y)) + np.finfo(np.float32).tiny
            cases.append(MixedBatchCase(f"{pattern}-{dtype}", pattern, dtype, x, W, bias, adapters, names, y, bound))
    return cases


def check_mixed_batch(forward: Callable[[MixedBatchCase], Any], cases: Sequence[MixedBatchCase] | None = None, *,
                      tolerance: float = 1.0) -> list[CaseResult]:
    """Run ``forward(case) -> y`` (any array convertible with ``np.asarray``, shape ``(batch, tokens,
    out)``) on every case and compare it with the case's float64 expectation. ``tolerance`` multiplies
    the bound (an engine that rounds its intermediates to half precision, as PEFT does on the CPU, needs
    a larger one)."""
    results = []
    for case in cases if cases is not None else mixed_batch_cases():
        try:
            got = np.asarray(forward(case), dtype=np.float64)
        except Exception as exc:  # a conformance run reports every case, failing ones included
            results.append(CaseResult(case.name, float("inf"), float("inf"), False, f"raised {exc!r}"))
            continue
        if got.shape != case.expected.shape:
            results.append(CaseResult(case.name, float("inf"), float("inf"), False,
                                      f"shape {got.shape}, expected {case.expected.shape}"))
            continue
        err = np.abs(got - case.expected)
        ratio = err / (tolerance * case.bound)
        worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        ok = bool(np.all(ratio <= 1.0))
        detail = "" if ok else (f"row {worst[0]} ({case.names[worst[0]]}), token {worst[1]}, output {worst[2]}: "
                                f"{got[worst]:.8g} vs {case.expected[worst]:.8g}")
        results.append(CaseResult(case.name, float(err.max()), float(ratio.max()), ok, detail))
    return results


def assert_mixed_batch(forward: Callable[[MixedBatchCase], Any], cases: Sequence[MixedBatchCase] | None = None, *,
                       tolerance: float = 1.0) -> None:
    """:func:`check_mixed_batch`, raising ``AssertionError`` that lists every failing case."""
    bad = [r for r in check_mixed_batch(forward, cases, tolerance=tolerance) if not r.ok]
    if bad:
        raise AssertionError("mixed-batch conformance failed:\n" + "\n".join(
            f"  {r.name}: max |error| {r.max_error:.3g} ({r.max_ratio:.3g}x the bound) {r.detail}" for r in bad))
