"""The mixed-batch conformance cases (peftmath.conformance): peftmath's own mixed batch passes them on
every array library, and kernels with the usual bugs fail them (a check that cannot fail proves nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import to_np, to_xp

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.conformance import BASE, PATTERNS, assert_mixed_batch, check_mixed_batch, mixed_batch_cases
from peftmath.multi import mixed_batch_forward


def _peftmath_forward(xp):
    def forward(case):
        conv = (lambda a: to_xp(xp, a)) if case.dtype != "bfloat16" else (lambda a: a)
        ads = {}
        for name, (A, B, s) in case.adapters.items():
            r = A.shape[0]
            # lora_alpha chosen so that peftmath's scaling (alpha / r) is the case's s
            ads[name] = Adapter(pm.LoraConfig(r=r, lora_alpha=s * r, target_modules=["lin"]),
                                {"lin": {"lora_A.weight": conv(A), "lora_B.weight": conv(B)}})
        state = {"lin.weight": conv(case.weight), "lin.bias": conv(case.bias)}
        return to_np(mixed_batch_forward("lin", conv(case.x), state, ads, case.names))
    return forward


def test_peftmath_mixed_batch_conforms(xp):
    assert_mixed_batch(_peftmath_forward(xp), mixed_batch_cases(dtypes=("float32",)))


def test_peftmath_mixed_batch_conforms_in_bfloat16():
    assert_mixed_batch(_peftmath_forward(None), mixed_batch_cases(dtypes=("bfloat16",)))


@pytest.mark.parametrize("limit", [None, 100, 288])
def test_adapter_set_mixed_batch_conforms(monkeypatch, limit):
    """Through an AdapterSet (modules and NumPy factors prepared once, kept between calls; each case run
    twice), with the NumPy path's small-call limit also lowered (and its narrowest slice) so that the products
    of the segments (up to 36 tokens) are summed over slices of the input dimension and cut into slices of the
    output columns, of widths depending on the rank and the rows."""
    from peftmath import multi

    if limit is not None:
        monkeypatch.setattr(multi, "_SMALL_GEMM", limit)
        monkeypatch.setattr(multi, "_MIN_SLICE", (1, 1))

    def forward(case):
        aset = multi.AdapterSet({n: Adapter(pm.LoraConfig(r=A.shape[0], lora_alpha=s * A.shape[0],
                                                          target_modules=["lin"]),
                                            {"lin": {"lora_A.weight": A, "lora_B.weight": B}})
                                 for n, (A, B, s) in case.adapters.items()})
        state = {"lin.weight": case.weight, "lin.bias": case.bias}
        first = aset.mixed_batch_forward("lin", case.x, state, case.names)
        again = aset.mixed_batch_forward("lin", case.x, state, case.names)
        assert np.array_equal(first, again)
        return first

    assert_mixed_batch(forward, mixed_batch_cases(dtypes=("float32", "bfloat16")))


def test_cases_cover_the_patterns():
    cases = mixed_batch_cases(dtypes=("float32",))
    assert {c.pattern for c in cases} == set(PATTERNS)
    by = {c.pattern: c for c in cases}
    assert len(set(by["identical"].names)) == 1 and by["identical"].names[0] != BASE
    assert set(by["base-only"].names) == {BASE}
    assert sorted(by["one-row-each"].names) == sorted(by["one-row-each"].adapters)
    assert {A.shape[0] for A, _, _ in by["uniform"].adapters.values()} == set(range(1, 7))  # heterogeneous ranks
    # deterministic for a seed, different across seeds
    again = mixed_batch_cases(dtypes=("float32",))
    assert all(np.array_equal(a.expected, b.expected) for a, b in zip(cases, again))
    assert not np.array_equal(cases[2].x, mixed_batch_cases(seed=1, dtypes=("float32",))[2].x)


def _loop(case, *, skip_scaling=False, wrong_row=None, bias_on_adapter_rows_only=False, padded_rank=None):
    """A float32 engine written the straightforward way, with optional bugs."""
    f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    x, W, bias = f(case.x), f(case.weight), f(case.bias)
    y = x @ W.T
    for b, name in enumerate(case.names):
        if name == BASE:
            if not bias_on_adapter_rows_only:
                y[b] += bias
            continue
        y[b] += bias
        if wrong_row is not None and b == wrong_row:
            name = next(n for n in case.adapters if n != name)
        A, B, s = case.adapters[name]
        A, B = f(A), f(B)
        if padded_rank is not None and A.shape[0] < padded_rank:  # zero-padding done wrong: garbage columns
            A = np.concatenate([A, np.ones((padded_rank - A.shape[0], A.shape[1]), np.float32)])
            B = np.concatenate([B, np.full((B.shape[0], padded_rank - B.shape[1]), 1e-3, np.float32)], axis=1)
        y[b] += (1.0 if skip_scaling else s) * (x[b] @ A.T) @ B.T
    return y


def test_a_correct_float32_loop_passes():
    assert_mixed_batch(_loop, mixed_batch_cases(dtypes=("float32",)))


@pytest.mark.parametrize("bug, failing", [
    (dict(skip_scaling=True), {"identical", "distinct", "uniform", "skewed", "zipf", "one-row-each"}),
    (dict(wrong_row=0), {"identical", "distinct", "uniform", "skewed", "zipf", "one-row-each"}),
    (dict(bias_on_adapter_rows_only=True), {"distinct", "skewed", "base-only"}),
    (dict(padded_rank=6), {"identical", "distinct", "uniform", "skewed", "zipf", "one-row-each"}),
])
def test_kernels_with_bugs_fail(bug, failing):
    results = check_mixed_batch(lambda c: _loop(c, **bug), mixed_batch_cases(dtypes=("float32",)))
    failed = {r.name.rsplit("-", 1)[0] for r in results if not r.ok}
    # every listed pattern must catch the bug (where its rows exercise it)
    rows_hit = {r.name.rsplit("-", 1)[0] for r in results}
    assert failing & rows_hit <= failed | _not_exercised(bug)
    assert failed, f"no case caught {bug}"
    with pytest.raises(AssertionError, match="conformance failed"):
        assert_mixed_batch(lambda c: _loop(c, **bug), mixed_batch_cases(dtypes=("float32",)))


def _not_exercised(bug):
    # wrong_row=0 on a base row does nothing; the zipf and uniform draws may put a base row first
    return {"uniform", "zipf"} if "wrong_row" in bug else set()


def test_errors_and_wrong_shapes_are_reported_not_raised():
    cases = mixed_batch_cases(dtypes=("float32",), patterns=("uniform",))
    res = check_mixed_batch(lambda c: 1 / 0, cases)
    assert not res[0].ok and "ZeroDivisionError" in res[0].detail
    res = check_mixed_batch(lambda c: c.expected[:, 0], cases)
    assert not res[0].ok and "shape" in res[0].detail


def test_bfloat16_bound_needs_float32_accumulation():
    """Rounding the base output, the adapter's ``x Aᵀ`` and the sum to bfloat16 (PEFT's CPU order) is
    within the bound; accumulating the dot products themselves in bfloat16 is not."""
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    rnd = lambda a: f32(f32(a).astype(bf))  # noqa: E731

    def dot(a, b, half_accumulate):  # a (..., k) @ b (k, n)
        if not half_accumulate:
            return f32(a) @ f32(b)
        acc = np.zeros(a.shape[:-1] + (b.shape[1],), np.float32)
        for k in range(a.shape[-1]):
            acc = rnd(acc + f32(a)[..., k, None] * f32(b)[k])
        return acc

    def engine(case, half_accumulate):
        x, W, bias = case.x, case.weight, case.bias
        y = rnd(rnd(dot(x, f32(W).T, half_accumulate)) + f32(bias))
        for b, name in enumerate(case.names):
            if name != BASE:
                A, B, s = case.adapters[name]
                h = rnd(dot(x[b], f32(A).T, half_accumulate))
                y[b] = rnd(y[b] + rnd(dot(h, f32(B).T, half_accumulate) * s))
        return y

    cases = mixed_batch_cases(dtypes=("bfloat16",))
    assert all(r.ok for r in check_mixed_batch(lambda c: engine(c, False), cases))
    assert not all(r.ok for r in check_mixed_batch(lambda c: engine(c, True), cases))
