"""Cross-backend parity: every method's delta, forward, merge and unmerge on every installed backend.

The inputs are generated once on the host (NumPy, from a hypothesis-drawn seed) and moved to each
backend in the ``xp_all`` fixture (numpy, array-api-strict, torch CPU, JAX CPU and lazy dask when installed,
CuPy when a GPU is present). Each backend computes in float32; the reference is the same call on NumPy in
float64. Tolerances come from error analysis:

* LoRA's delta is a rank-r product, so ``|ΔW_xp − ΔW_64| <= c·eps·s·(|B| @ |A|)`` componentwise with
  ``c = max(4, r)`` (the accumulation error of an r-term dot product);
* every other output is checked row-wise against the float64 result:
  ``|y − y_64| <= c·eps·(max_row |y_64| + max_row |inputs|)`` with ``c`` growing with the contraction
  length, which bounds the error of a sum of that many float32 products;
* merge then unmerge returns ``W`` within ``8·eps·(|W| + |ΔW|)`` (additive methods) or the row-wise bound.

Outputs must stay in the input's namespace. The methods and examples are discovered from
``peftmath.methods`` through each method's :class:`~peftmath.methods.Method` description
(``describe_method``: ``merges_weights``, ``examples``, ``layer_kinds``, ``config``, ``initialize``), so a
new method is covered without editing this file.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from tests.helpers import assert_same_namespace, skip_unless_requirements, to_np, to_xp
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmath._array import is_immutable
from peftmath.adapter import Adapter
from peftmath.errors import UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import describe_method, implemented_methods

#: base weight shapes per layer kind (stored layout)
SHAPES = {
    LayerKind.LINEAR: (12, 16),
    LayerKind.CONV1D_TRANSPOSED: (16, 12),
    LayerKind.EMBEDDING: (20, 16),
    LayerKind.CONV1D: (8, 4, 3),
    LayerKind.CONV2D: (8, 4, 3, 3),
    LayerKind.CONV3D: (4, 2, 2, 2, 3),
}


def _cases():
    out = []
    for peft_type in implemented_methods():
        desc = describe_method(peft_type)
        if not desc.merges_weights:
            continue  # prompt-learning methods have no per-module math
        for label in desc.examples:
            for kind in desc.layer_kinds:
                if kind in SHAPES:
                    out.append(pytest.param(peft_type, label, kind, id=f"{label}-{kind.value}"))
    return out


def _input(kind: LayerKind, layer: Layer, rng: np.random.Generator) -> np.ndarray:
    if kind is LayerKind.EMBEDDING:
        return rng.integers(0, layer.weight_shape[0], size=(2, 5))
    if kind.is_conv:
        spatial = tuple(k + 3 for k in layer.kernel_size)
        return rng.standard_normal((2, layer.in_features, *spatial))
    return rng.standard_normal((3, layer.in_features))


def _build(peft_type: str, label: str, kind: LayerKind, seed: int):
    desc = describe_method(peft_type)
    skip_unless_requirements(desc)
    rng = np.random.default_rng(seed)
    layer = Layer.of(SHAPES[kind], kind)
    W = rng.standard_normal(layer.weight_shape)
    bias = rng.standard_normal(layer.out_features) if kind is not LayerKind.EMBEDDING else None
    fields = dict(desc.examples[label])
    config = desc.config(target_modules=["m"], **fields)
    try:
        params, new_w = desc.initialize("m", config, layer, weight=W.astype(np.float32), seed=seed)
    except UnsupportedError as exc:  # a documented limitation of this example on this kind
        pytest.skip(str(exc))
    base = (new_w if new_w is not None else W).astype(np.float64)
    host = {k: np.asarray(v, dtype=np.float64) for k, v in desc.example_params(params, seed).items()}
    return desc, config, layer, base, bias, host, _input(kind, layer, rng)


def _adapter(config, params, xp, dtype):
    if xp is None:
        return Adapter(config, {"m": params})
    return Adapter(config, {"m": {k: to_xp(xp, v, dtype) for k, v in params.items()}})


def _rowwise_ok(got: np.ndarray, ref: np.ndarray, scale: float, c: float, eps: float) -> bool:
    got2 = got.reshape(got.shape[0], -1) if got.ndim > 1 else got.reshape(1, -1)
    ref2 = ref.reshape(got2.shape)
    bound = c * eps * (np.max(np.abs(ref2), axis=1, keepdims=True) + scale)
    return bool(np.all(np.abs(got2 - ref2) <= bound))


def _unmerge_amplification(ref_ad, merged64: dict, records: dict, kinds: dict, eps: float, seed: int) -> float:
    """max |unmerge(M + δ) − unmerge(M)| / max |δ| for a random δ of relative size ``eps`` (float64; at least
    1): how much the unmerge amplifies an error in the merged weight (1 for additive methods)."""
    M = merged64["m.weight"]
    delta = np.random.default_rng(seed).standard_normal(M.shape) * eps * float(np.max(np.abs(M)))
    base = ref_ad.unmerge(merged64, layer_kinds=kinds, records=records)["m.weight"]
    pert = ref_ad.unmerge({**merged64, "m.weight": M + delta}, layer_kinds=kinds, records=records)["m.weight"]
    return max(1.0, float(np.max(np.abs(pert - base))) / float(np.max(np.abs(delta))))


CASES = _cases()


@pytest.mark.parametrize("peft_type,label,kind", CASES)
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=int(os.environ.get("PEFTMATH_XB_EXAMPLES", 5)))
def test_backend_matches_float64_reference(xp_all, peft_type, label, kind, seed):
    xp = xp_all
    _, config, layer, W, bias, params, x = _build(peft_type, label, kind, seed)
    eps = float(np.finfo(np.float32).eps)
    contraction = math.prod(layer.matrix_shape[1:]) + 16
    c = 4.0 * contraction
    state64 = {"m.weight": W} | ({"m.bias": bias} if bias is not None else {})
    ref_ad = _adapter(config, params, None, None)
    ad = _adapter(config, params, xp, xp.float32)
    state = {k: to_xp(xp, v, xp.float32) for k, v in state64.items()}
    kinds = {"m": kind}
    scale = max(float(np.max(np.abs(W))), max(float(np.max(np.abs(p))) for p in params.values()))

    mod = ad.module("m", weight_shape=layer.weight_shape, kind=kind)
    ref_mod = ref_ad.module("m", weight_shape=layer.weight_shape, kind=kind)
    if mod.additive:
        d = mod.delta_weight()
        assert_same_namespace(xp, d)
        assert _rowwise_ok(to_np(d), to_np(ref_mod.delta_weight()), scale, c, eps)

    x_xp = to_xp(xp, x) if kind is LayerKind.EMBEDDING else to_xp(xp, x, xp.float32)
    y = ad.forward("m", x_xp, state, kind=kind)
    y64 = ref_ad.forward("m", x if kind is LayerKind.EMBEDDING else x.astype(np.float64), state64, kind=kind)
    assert_same_namespace(xp, y)
    assert _rowwise_ok(to_np(y), to_np(y64), scale * float(np.max(np.abs(x)) if kind is not LayerKind.EMBEDDING else 1.0),
                       c * 4, eps)

    records: dict = {}
    merged = ad.merge(state, layer_kinds=kinds, records=records)
    ref_records: dict = {}
    merged64 = ref_ad.merge(state64, layer_kinds=kinds, records=ref_records)
    assert_same_namespace(xp, merged["m.weight"])
    assert _rowwise_ok(to_np(merged["m.weight"]), merged64["m.weight"], scale, c, eps)
    back = ad.unmerge(merged, layer_kinds=kinds, records=records)
    # the round trip also carries the merged weight's rounding through the unmerge, which an inverse
    # amplifies by its conditioning (a nearly singular RoAd 2x2 block, a small IA3 scale): measured on the
    # float64 reference as the unmerge's response to a perturbation of the merged weight
    c_back = c * 4 * _unmerge_amplification(ref_ad, merged64, ref_records, kinds, eps, seed)
    assert _rowwise_ok(to_np(back["m.weight"]), W, scale, c_back, eps)

    # in place (copy=False): the backend's fused paths (BLAS beta=1, DoRA/IA3 hooks, CUDA kernels on
    # CuPy) give the same merge as the copy, and unmerge in place back to W. JAX and dask arrays cannot be
    # written in place (immutable; lazy): copy=False is refused there, before anything is computed
    own = {k: to_xp(xp, v, xp.float32) for k, v in state64.items()}
    if is_immutable(own["m.weight"]):
        with pytest.raises(UnsupportedError, match="copy=True"):
            ad.merge(own, layer_kinds=kinds, records={}, copy=False)
        with pytest.raises(UnsupportedError, match="copy=True"):
            ad.unmerge(merged, layer_kinds=kinds, records=records, copy=False)
        assert np.array_equal(to_np(own["m.weight"]), W.astype(np.float32))
    else:
        in_records: dict = {}
        inplace = ad.merge(own, layer_kinds=kinds, records=in_records, copy=False)
        assert inplace["m.weight"] is own["m.weight"]
        assert _rowwise_ok(to_np(inplace["m.weight"]), merged64["m.weight"], scale, c, eps)
        back = ad.unmerge(inplace, layer_kinds=kinds, records=in_records, copy=False)
        assert _rowwise_ok(to_np(back["m.weight"]), W, scale, c_back, eps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_delta_componentwise(xp_all, seed):
    xp = xp_all
    """|BA_xp − BA_64| <= max(4, r)·eps·s·(|B| @ |A|): the bound of an r-term dot product."""
    from peftmath.methods import lora

    rng = np.random.default_rng(seed)
    r, s = 8, 1.75
    A = rng.standard_normal((r, 40)).astype(np.float32)
    B = rng.standard_normal((24, r)).astype(np.float32)
    d = lora.delta_weight(to_xp(xp, A), to_xp(xp, B), scaling=s)
    assert_same_namespace(xp, d)
    ref = s * (B.astype(np.float64) @ A.astype(np.float64))
    bound = max(4, r) * np.finfo(np.float32).eps * s * (np.abs(B).astype(np.float64) @ np.abs(A).astype(np.float64))
    assert np.all(np.abs(to_np(d) - ref) <= bound)


# ------------------------------------------------------------------------------------------------
# Autodiff through peftmath on the host library's own tensors
# ------------------------------------------------------------------------------------------------
def _fd_grad(f, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        ap, am = a.copy(), a.copy()
        ap[i] += h
        am[i] -= h
        g[i] = (f(ap) - f(am)) / (2 * h)
    return g


@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_autograd_matches_finite_differences(use_dora):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch  # noqa: F401

    from peftmath.methods import dora, lora

    rng = np.random.default_rng(7)
    W = rng.standard_normal((6, 5))
    A = rng.standard_normal((3, 5))
    B = rng.standard_normal((6, 3))
    x = rng.standard_normal((4, 5))
    R = rng.standard_normal((4, 6))
    b = rng.standard_normal(6)
    s = 1.5
    m0 = np.asarray(dora.init_magnitude(W, A, B, scaling=s)) * 1.2
    n0 = np.asarray(dora.weight_norm(W, A, B, scaling=s))

    def host_loss(a, bb, m):
        if not use_dora:
            return float(np.sum(lora.forward(x, W, a, bb, scaling=s, bias=b) * R))
        # PEFT detaches the norm: the gradient treats n as the constant n0 of the current factors
        g = m / n0
        return float(np.sum((g * (lora.forward(x, W, a, bb, scaling=s) ) + b) * R))

    tA = torch.tensor(A, requires_grad=True)
    tB = torch.tensor(B, requires_grad=True)
    tm = torch.tensor(m0, requires_grad=True)
    tx, tW, tb = torch.tensor(x), torch.tensor(W), torch.tensor(b)
    if use_dora:
        y = dora.forward(tx, tW, tA, tB, tm, scaling=s, bias=tb)
    else:
        y = lora.forward(tx, tW, tA, tB, scaling=s, bias=tb)
    assert isinstance(y, torch.Tensor) and y.requires_grad
    (y * torch.tensor(R)).sum().backward()
    np.testing.assert_allclose(tA.grad.numpy(), _fd_grad(lambda a: host_loss(a, B, m0), A), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tB.grad.numpy(), _fd_grad(lambda bb: host_loss(A, bb, m0), B), rtol=1e-6, atol=1e-7)
    if use_dora:
        np.testing.assert_allclose(tm.grad.numpy(), _fd_grad(lambda m: host_loss(A, B, m), m0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_dora", [False, True])
def test_jax_grad_matches_finite_differences(use_dora):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from peftmath.methods import dora, lora

    rng = np.random.default_rng(8)
    W, A, B = rng.standard_normal((6, 5)), rng.standard_normal((3, 5)), rng.standard_normal((6, 3))
    x, R, s = rng.standard_normal((4, 5)), rng.standard_normal((4, 6)), 0.75
    m0 = np.asarray(dora.init_magnitude(W, A, B, scaling=s)) * 0.9
    n0 = np.asarray(dora.weight_norm(W, A, B, scaling=s))

    def loss(a):
        if use_dora:
            y = dora.forward(jnp.asarray(x), jnp.asarray(W), a, jnp.asarray(B), jnp.asarray(m0), scaling=s)
        else:
            y = lora.forward(jnp.asarray(x), jnp.asarray(W), a, jnp.asarray(B), scaling=s)
        return jnp.sum(y * jnp.asarray(R))

    grad = np.asarray(jax.grad(loss)(jnp.asarray(A)))

    def host(a):
        y = lora.forward(x, W, a, B, scaling=s)
        return float(np.sum(((m0 / n0) * y if use_dora else y) * R))

    np.testing.assert_allclose(grad, _fd_grad(host, A), rtol=1e-6, atol=1e-7)
