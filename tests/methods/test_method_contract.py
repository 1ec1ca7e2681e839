"""The method contract, driven by the :class:`~peftmath.methods.Method` descriptions.

Every implemented method that merges weights, every example row of its description, every layer kind it
declares: a new method (one module with its ``METHOD``) is covered here without editing this file.
Hypothesis draws the seed, the memory layout of the base weight (C, Fortran, a permuted view, a strided
slice) and the dtype (float32, float64). Checked:

* round trip: ``unmerge(merge(W)) == W`` within ``c·eps·(max|W| + max|merge(W) - W|)`` (with the merge
  record where the description says one is needed);
* ``copy=False`` writes into the caller's array the numbers ``copy=True`` returns (within the same
  bound: the in-place kernel and the generic computation may round differently), and ``copy=True``
  never touches the input;
* the merged forward (the base layer's forward with the merged weight and bias) equals the method's
  unmerged forward, against the float64 reference scale;
* a checkpoint written with :func:`peftmath.save_adapter` loads back with the same tensors and the same
  merge.

Description sanity is checked too: each ``Method`` names an existing spec, its module's ``peft_type``,
and exactly the kinds its module class supports.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import ConfigError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import PEFT_TYPES_0_21_2, Method, describe_method, get_method, implemented_methods
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced
from tests.test_cross_backend import SHAPES, _input

ROOT = Path(__file__).resolve().parents[2]


def _cases():
    out = []
    for peft_type in implemented_methods():
        m = describe_method(peft_type)
        if not m.merges_weights:
            continue
        for label in m.examples:
            for kind in m.layer_kinds:
                if kind in SHAPES:
                    out.append(pytest.param(peft_type, label, kind, id=f"{label}-{kind.value}"))
    return out


CASES = _cases()


def _build(peft_type: str, label: str, kind: LayerKind, seed: int, dtype):
    m = describe_method(peft_type)
    rng = np.random.default_rng(seed)
    layer = Layer.of(SHAPES[kind], kind)
    W = rng.standard_normal(layer.weight_shape).astype(dtype)
    bias = rng.standard_normal(layer.out_features).astype(dtype) if kind is not LayerKind.EMBEDDING else None
    try:
        config = m.config(target_modules=["m"], **dict(m.examples[label]))
        config.validate(source="test")
        shared = m.init_shared(config, [layer], seed=seed) if m.init_shared is not None else None
        params, new_w = m.initialize("m", config, layer, weight=W, seed=seed, shared=shared)
    except (UnsupportedError, ConfigError) as exc:  # a documented limit of this example on this kind
        pytest.skip(str(exc))
    if new_w is not None:
        W = np.asarray(new_w, dtype=dtype)
    params = {k: np.asarray(v, dtype=dtype) for k, v in m.example_params(params, seed).items()}
    shared = {k: np.asarray(v, dtype=dtype) for k, v in (shared or {}).items()}
    ad = Adapter(config, {"m": params}, shared=shared, layer_kinds={"m": kind})
    return m, ad, layer, W, bias, _input(kind, layer, rng)


LAYOUTS = {
    "C": lambda w: w.copy(),
    "F": np.asfortranarray,
    "permuted": _np_permuted,
    "sliced": lambda w: _np_sliced(w, w.ndim - 1),
}


def _bound(layer: Layer, dtype, *scales: float) -> float:
    eps = float(np.finfo(dtype).eps)
    return 8.0 * (math.prod(layer.matrix_shape[1:]) + 16) * eps * sum(scales)


def _inverse_gain(mod, merged, W0, dtype) -> float:
    """max |T⁻¹(E)| / max |E| over two probes E (ones, a fixed normal draw), at least 1: how much the unmerge of
    a linear merge ``W' = T(W)`` can grow an error of the merged weight."""
    gain = 1.0
    for probe in (np.ones(W0.shape), np.random.default_rng(0).standard_normal(W0.shape)):
        out = mod.unmerge(probe.astype(dtype), merged.bias, record=merged.record, copy=True).weight
        gain = max(gain, float(np.max(np.abs(np.asarray(out, np.float64)))) / float(np.max(np.abs(probe))))
    return gain


@pytest.mark.parametrize("peft_type,label,kind", CASES)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(sorted(LAYOUTS)),
       dtype=st.sampled_from([np.float32, np.float64]))
@settings(max_examples=6, deadline=None)
def test_contract(peft_type, label, kind, seed, layout, dtype):
    m, ad, layer, W, bias, x = _build(peft_type, label, kind, seed, dtype)
    mod = ad.module("m", weight_shape=layer.weight_shape, kind=kind)
    assert m.needs_record(mod) == mod.needs_record()
    W0 = W.copy()
    Wl = LAYOUTS[layout](W)
    np.testing.assert_array_equal(Wl, W0)

    merged = mod.merge(Wl, bias, copy=True)
    np.testing.assert_array_equal(Wl, W0)  # copy=True never touches the input
    moved = float(np.max(np.abs(np.asarray(merged.weight, np.float64) - W0)))
    if m.bias_only:  # BEFT: the weight is returned untouched, the bias moves (and comes back)
        assert merged.weight is Wl
        moved = float(np.max(np.abs(np.asarray(merged.bias, np.float64) - bias)))
        back_b = mod.unmerge(merged.weight, merged.bias, record=merged.record).bias
        assert float(np.max(np.abs(np.asarray(back_b, np.float64) - bias))) <= _bound(layer, dtype, moved, 1.0)
    assert moved > 0, "the example's merge changes nothing: the checks below would be vacuous"
    bound = _bound(layer, dtype, float(np.max(np.abs(W0))), moved)
    if m.needs_record(mod):
        assert merged.record is not None
    back = mod.unmerge(merged.weight, merged.bias, record=merged.record, copy=True)
    # a rotation / scale merge W' = T(W) is linear in W: its unmerge T⁻¹ multiplies the round-off by the
    # inverse's gain (RoAd's 2x2 blocks near singular for some draws), measured on two probes
    ubound = bound * (_inverse_gain(mod, merged, W0, dtype) if (m.rotation or m.scale) else 1.0)
    assert float(np.max(np.abs(np.asarray(back.weight, np.float64) - W0))) <= ubound

    # copy=False: into the caller's array (every layout here is writeable NumPy memory)
    target = LAYOUTS[layout](W0)
    b_in = None if bias is None else bias.copy()
    res = mod.merge(target, b_in, copy=False)
    assert res.weight is target
    assert float(np.max(np.abs(np.asarray(target, np.float64) - np.asarray(merged.weight, np.float64)))) <= bound
    if m.inplace:
        res2 = mod.unmerge(target, res.bias, record=res.record, copy=False)
        assert res2.weight is target
        assert float(np.max(np.abs(np.asarray(target, np.float64) - W0))) <= ubound

    # merged forward == unmerged forward
    xin = x if kind is LayerKind.EMBEDDING else x.astype(dtype)
    y_unmerged = np.asarray(mod.forward(xin, W0, bias), np.float64)
    y_merged = np.asarray(layer.base_forward(xin, merged.weight, merged.bias, np), np.float64)
    scale = float(np.max(np.abs(y_unmerged))) + (1.0 if kind is LayerKind.EMBEDDING else float(np.max(np.abs(x))))
    assert float(np.max(np.abs(y_merged - y_unmerged))) <= _bound(layer, dtype, scale, moved)


@pytest.mark.parametrize("peft_type,label,kind", CASES)
def test_checkpoint_round_trip(peft_type, label, kind):
    m, ad, layer, W, bias, _ = _build(peft_type, label, kind, 7, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_adapter(ad, Path(tmp) / "a")
        back = pm.load_adapter(Path(tmp) / "a")
    assert back.description is m
    assert back.modules == ad.modules
    for mod in ad.modules:
        assert sorted(back.params[mod]) == sorted(ad.params[mod])
        for k, v in ad.params[mod].items():
            np.testing.assert_array_equal(np.asarray(back.params[mod][k]), v)
    state = {"m.weight": W} | ({"m.bias": bias} if bias is not None else {})
    kinds = {"m": kind}
    a, b = ad.merge(state, layer_kinds=kinds), back.merge(state, layer_kinds=kinds)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


@pytest.mark.parametrize("peft_type", implemented_methods())
def test_description(peft_type):
    m = describe_method(peft_type)
    assert isinstance(m, Method) and m is get_method(peft_type).METHOD
    assert m.peft_type == peft_type == m.config.peft_type
    assert (ROOT / m.spec).is_file()
    assert peft_type in PEFT_TYPES_0_21_2
    if m.module is not None:
        assert m.module.peft_type == peft_type
        assert set(m.layer_kinds) == set(m.module.supported_kinds)
        assert m.examples or m.forward_only, \
            "a weight method needs at least one example (the demo and these tests use them)"
    if m.init_field is not None:
        assert m.init_field in m.config.field_names()


def test_unknown_and_unimplemented_types(monkeypatch):
    from peftmath.methods import METHOD_MODULES

    monkeypatch.delitem(METHOD_MODULES, "IA3")  # a PEFT type without a module (whichever remain in this tree)
    with pytest.raises(UnsupportedError, match="PEFT 0.21.2 method peftmath does not implement"):
        get_method("IA3")
    with pytest.raises(ConfigError, match="unknown peft_type"):
        get_method("SUPERLORA")
    assert set(implemented_methods()) <= set(PEFT_TYPES_0_21_2)
