"""The in-place contract (design §3.9, :mod:`peftmath.methods._base`), for every method and layer kind.

``copy=False`` writes the result into the caller's array and returns that very array, or raises
:class:`UnsupportedError` and leaves it bit-for-bit untouched; ``copy=True`` returns the same numbers on
every layout and never touches the input. Each case is checked on the layouts beside the happy path:
Fortran order, a permuted NumPy view, column- and row-sliced views, read-only arrays, torch tensors that
are permuted, sliced, ``channels_last`` / ``channels_last_3d``, or leaves that require grad, and JAX.

The reference is the same module on float64, C-ordered NumPy copies of the same float32 values; every
case first checks that the merge moves the weight by far more than the tolerance (so a merge computed into
a copy and dropped, the bug this file guards against, cannot pass). While ``copy=False`` runs, the
backends' in-place kernels are spied on: every array they receive must share the caller's memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftmath.backends import ArrayAPIBackend, NumpyBackend, TorchBackend
from peftmath.errors import UnsupportedError
from peftmath.layers import LayerKind
from tests.helpers import to_np
from tests.test_cross_backend import CASES, _adapter, _build

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------------
# Layouts: each turns a C-ordered float32 host array into an array of the same values in one layout
# --------------------------------------------------------------------------------------------------
def _permutation(ndim: int) -> tuple[int, ...]:
    return (3, 2, 0, 1) if ndim == 4 else tuple(reversed(range(ndim)))


def _np_permuted(w: np.ndarray) -> np.ndarray:
    """``np.transpose(base, perm)`` of a C-ordered ``base`` of another shape (the issue's example)."""
    perm = _permutation(w.ndim)
    base = np.ascontiguousarray(np.transpose(w, tuple(np.argsort(perm))))
    view = np.transpose(base, perm)
    assert view.base is not None and not view.flags.c_contiguous
    return view


def _np_sliced(w: np.ndarray, axis: int) -> np.ndarray:
    shape = list(w.shape)
    shape[axis] *= 2
    big = np.full(shape, np.nan, dtype=w.dtype)
    index = tuple(slice(None, None, 2) if a == axis else slice(None) for a in range(w.ndim))
    big[index] = w
    return big[index]


def _np_readonly(w: np.ndarray) -> np.ndarray:
    out = w.copy()
    out.flags.writeable = False
    return out


def _torch(w: np.ndarray):
    return torch.from_numpy(w.copy())


def _torch_permuted(w: np.ndarray):
    perm = _permutation(w.ndim)
    base = torch.from_numpy(np.ascontiguousarray(np.transpose(w, tuple(np.argsort(perm)))))
    view = base.permute(perm)
    assert not view.is_contiguous()
    return view


def _torch_sliced(w: np.ndarray):
    big = torch.full((w.shape[0], 2 * w.shape[1], *w.shape[2:]), float("nan"))
    big[:, ::2] = torch.from_numpy(w)
    return big[:, ::2]


def _torch_channels_last(w: np.ndarray):
    fmt = torch.channels_last if w.ndim == 4 else torch.channels_last_3d
    out = torch.from_numpy(w.copy()).to(memory_format=fmt)
    assert not out.is_contiguous()
    return out


def _torch_grad(w: np.ndarray):
    return torch.from_numpy(w.copy()).requires_grad_(True)


def _jax(w: np.ndarray):
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(w)


#: name -> (constructor, library of the adapter's tensors, True when copy=False must write)
LAYOUTS = {
    "numpy-C": (np.ascontiguousarray, "numpy", True),
    "numpy-Fortran": (np.asfortranarray, "numpy", True),
    "numpy-permuted": (_np_permuted, "numpy", True),
    "numpy-col-slice": (lambda w: _np_sliced(w, 1), "numpy", True),
    "numpy-row-slice": (lambda w: _np_sliced(w, 0), "numpy", True),
    "numpy-read-only": (_np_readonly, "numpy", False),
    "torch": (_torch, "torch", True),
    "torch-permuted": (_torch_permuted, "torch", True),
    "torch-col-slice": (_torch_sliced, "torch", True),
    "torch-channels-last": (_torch_channels_last, "torch", True),
    "torch-requires-grad": (_torch_grad, "torch", False),
    "jax": (_jax, "jax", False),
}


def _layout_cases():
    out = []
    for case in CASES:
        peft_type, label, kind = case.values
        for name in LAYOUTS:
            if name == "torch-channels-last" and kind not in (LayerKind.CONV2D, LayerKind.CONV3D):
                continue  # channels_last exists for 4-D and 5-D tensors only
            out.append(pytest.param(peft_type, label, kind, name, id=f"{case.id}-{name}"))
    return out


def _params_in(lib: str, params: dict[str, np.ndarray]) -> dict:
    if lib == "numpy":
        return dict(params)
    if lib == "torch":
        return {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    jnp = pytest.importorskip("jax.numpy")
    return {k: jnp.asarray(v) for k, v in params.items()}


def _host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.astype(np.float64)
    if hasattr(a, "detach"):
        a = a.detach()
    return to_np(a)


def _snapshot(a) -> np.ndarray:
    """A bitwise copy of ``a``'s values (NaN-safe comparisons use ``array_equal(equal_nan=True)``)."""
    return np.array(_host(a), copy=True)


class KernelSpy:
    """Records the first argument of every in-place backend hook while installed, and the private
    C-ordered copies the write path makes (a kernel may update one of those, which is then stored)."""

    HOOKS = ((NumpyBackend, "addmm_"), (NumpyBackend, "rescale_rows_"), (TorchBackend, "addmm_"),
             (ArrayAPIBackend, "dora_merge_"), (ArrayAPIBackend, "dora_unmerge_"), (ArrayAPIBackend, "scale_"),
             (ArrayAPIBackend, "rescale_rows_"))

    def __init__(self, monkeypatch):
        from peftmath.methods import _base

        self.targets: list = []
        self.copies: list = []

        orig_copy = _base.private_copy

        def copying(x, *, xp=None):
            out = orig_copy(x, xp=xp)
            self.copies.append(out)
            return out

        monkeypatch.setattr(_base, "private_copy", copying)
        for cls, name in self.HOOKS:
            orig = getattr(cls, name)

            def spy(backend, m, *args, _orig=orig):
                self.targets.append(m)
                return _orig(backend, m, *args)

            monkeypatch.setattr(cls, name, spy)


def _aliases(m, w) -> bool:
    if isinstance(w, np.ndarray):
        return isinstance(m, np.ndarray) and np.shares_memory(m, w)
    return m.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()


def _merge(mod, W, bias, **kw):
    res = mod.merge(W, bias, **kw)
    return res.weight, res.bias, res.record


@pytest.mark.parametrize("peft_type,label,kind,layout", _layout_cases())
def test_in_place_writes_the_callers_array_or_refuses(peft_type, label, kind, layout, monkeypatch):
    make, lib, writes = LAYOUTS[layout]
    seed = 1000 + sum(map(ord, f"{label}{kind.value}"))
    method, config, layer, W64, bias64, params64, _ = _build(peft_type, label, kind, seed)
    if method.bias_only:
        pytest.skip("merging changes the bias only: the weight is never written (BEFT; its in-place bias write "
                    "is checked in tests/methods/test_beft.py)")
    # the float32 values every layout holds, and the float64 reference on exactly those values
    W32 = W64.astype(np.float32)
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    ref_mod = _adapter(config, {k: v.astype(np.float64) for k, v in params32.items()}, None, None).module(
        "m", weight_shape=layer.weight_shape, kind=kind)
    ref = ref_mod.merge(W32.astype(np.float64), None, copy=True)
    mod = _adapter(config, _params_in(lib, params32), None, None).module("m", weight_shape=layer.weight_shape,
                                                                          kind=kind)

    K = math.prod(layer.matrix_shape[1:])
    tol = 4 * (K + 16) * EPS32 * (float(np.max(np.abs(ref.weight))) + float(np.max(np.abs(W32))))
    moved = float(np.max(np.abs(ref.weight - W32)))
    assert moved > 10 * tol, "the example must move the weight far beyond the tolerance"

    # copy=True: the right numbers on every layout, the input untouched (JAX's copy=True merge is in
    # tests/test_cross_backend.py; each JAX op compiles, too slow to repeat here)
    if lib != "jax":
        W = make(W32)
        before = _snapshot(W)
        got, _, record = _merge(mod, W, None, copy=True)
        assert got is not W
        assert np.array_equal(_snapshot(W), before)
        assert np.max(np.abs(_host(got) - ref.weight)) <= tol
        back = mod.unmerge(got, None, record=record, copy=True).weight
        assert np.max(np.abs(_host(back) - W32)) <= 4 * tol

    # copy=False: written into W (the very array passed in) or refused with W untouched
    W = make(W32)
    before = _snapshot(W)
    spy = KernelSpy(monkeypatch)
    if not writes:
        with pytest.raises(UnsupportedError, match=r"m: copy=False .*use copy=True"):
            _merge(mod, W, None, copy=False)
        assert np.array_equal(_snapshot(W), before)
        return
    got, _, record = _merge(mod, W, None, copy=False)
    assert got is W
    assert np.max(np.abs(_host(W) - ref.weight)) <= tol
    back = mod.unmerge(W, None, record=record, copy=False).weight
    assert back is W
    assert np.max(np.abs(_host(W) - W32)) <= 4 * tol
    # the kernels only ever saw the caller's memory, or a private copy that the write path then stored
    assert all(any(_aliases(m, t) for t in (W, *spy.copies)) for m in spy.targets)
    # the fast path: the kernel on W's own memory, no copy (an additive module: W' = W + ΔW with ΔW low-rank; KaSA's
    # LoRA module is not additive, W' = W − W_d + ΔW with W_d the base's dropped singular part, formed densely)
    if (layout in ("numpy-C", "torch") and peft_type in ("LORA", "ADALORA", "VERA") and kind is not LayerKind.EMBEDDING
            and mod.additive):
        assert spy.targets and not spy.copies


# --------------------------------------------------------------------------------------------------
# Regressions of issue 15 (item 1), each against an independent float64 formula
# --------------------------------------------------------------------------------------------------
CONV_SHAPES = {1: (6, 4, 3), 2: (6, 4, 3, 2), 3: (4, 2, 2, 3, 2)}


def _conv_layouts(w: np.ndarray):
    """(name, array) for the layouts of the issue: Fortran order, a permuted view, strided slices, and
    torch channels_last where it exists."""
    yield "Fortran", np.asfortranarray(w)
    yield "permuted", _np_permuted(w)
    yield "col-slice", _np_sliced(w, 1)
    yield "row-slice", _np_sliced(w, 0)
    if w.ndim in (4, 5):
        yield "channels_last", _torch_channels_last(w)
    yield "torch-permuted", _torch_permuted(w)


def _like(a: np.ndarray, W):
    return a if isinstance(W, np.ndarray) else torch.from_numpy(a)


def _lora_factors(shape, r, rng):
    A = rng.standard_normal((r, shape[1], *shape[2:])).astype(np.float32)
    B = rng.standard_normal((shape[0], r, *(1,) * (len(shape) - 2))).astype(np.float32)
    return A, B


def _lora_ref(W32, A, B, s, sign=1):
    d = s * (B.reshape(B.shape[0], -1).astype(np.float64) @ A.reshape(A.shape[0], -1).astype(np.float64))
    return W32.astype(np.float64) + sign * d.reshape(W32.shape)


def _bound(ref, W32):
    return 64 * EPS32 * (np.max(np.abs(ref)) + np.max(np.abs(W32)))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_lora_in_place_on_conv_layouts(nd):
    from peftmath.methods import lora

    rng = np.random.default_rng(nd)
    W32 = rng.standard_normal(CONV_SHAPES[nd]).astype(np.float32)
    A, B = _lora_factors(W32.shape, 3, rng)
    want = _lora_ref(W32, A, B, 0.75)
    for name, W in _conv_layouts(W32):
        a, b = _like(A, W), _like(B, W)
        assert lora.merge(W, a, b, scaling=0.75, copy=False) is W, name
        assert np.max(np.abs(_host(W) - want)) <= _bound(want, W32), name
        assert lora.unmerge(W, a, b, scaling=0.75, copy=False) is W, name
        assert np.max(np.abs(_host(W) - W32)) <= _bound(want, W32), name


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_dora_in_place_on_conv_layouts(nd):
    from peftmath.methods import dora

    rng = np.random.default_rng(10 + nd)
    W32 = rng.standard_normal(CONV_SHAPES[nd]).astype(np.float32)
    A, B = _lora_factors(W32.shape, 2, rng)
    mag = (rng.uniform(0.5, 2.0, (1, W32.shape[0]) + (1,) * nd)).astype(np.float32)
    V = _lora_ref(W32, A, B, 0.5).reshape(W32.shape[0], -1)
    n = np.linalg.norm(V, axis=1)
    want = ((mag.reshape(-1) / n)[:, None] * V).reshape(W32.shape)
    for name, W in _conv_layouts(W32):
        a, b, m = _like(A, W), _like(B, W), _like(mag, W)
        res = dora.merge(W, a, b, m, scaling=0.5, copy=False)
        assert res.weight is W, name
        assert np.max(np.abs(_host(W) - want)) <= _bound(want, W32), name
        assert np.max(np.abs(_host(res.record) - n)) <= 64 * EPS32 * np.max(n), name
        assert dora.unmerge(W, a, b, m, scaling=0.5, weight_norm=res.record, copy=False).weight is W, name
        assert np.max(np.abs(_host(W) - W32)) <= 4 * _bound(want, W32), name


def _adalora_factors(shape, r, rng):
    k = math.prod(shape[1:])
    A = rng.standard_normal((r, k)).astype(np.float32)
    E = rng.standard_normal((r, 1)).astype(np.float32)
    B = rng.standard_normal((shape[0], r)).astype(np.float32)
    return A, E, B


@pytest.mark.parametrize("copy", [True, False])
def test_adalora_merge_on_conv_layouts(copy):
    """AdaLoRA's default copy=True used to copy W keeping its layout and run the kernel on a reshape
    of that copy: the unmerged weight came back."""
    from peftmath.methods import adalora

    rng = np.random.default_rng(20)
    W32 = rng.standard_normal(CONV_SHAPES[2]).astype(np.float32)
    A, E, B = _adalora_factors(W32.shape, 3, rng)
    c = adalora.rank_scale(6.0, 3)
    want = W32.astype(np.float64) + c * (B.astype(np.float64) @ (A * E).astype(np.float64)).reshape(W32.shape)
    for name, W in _conv_layouts(W32):
        before = _snapshot(W)
        got = adalora.merge(W, *(_like(t, W) for t in (A, E, B)), scaling=6.0, ranknum=3, copy=copy)
        assert (got is W) == (not copy), name
        assert np.max(np.abs(_host(got) - want)) <= _bound(want, W32), name
        if copy:
            assert np.array_equal(_snapshot(W), before), name


def test_adapter_merge_of_a_channels_last_state_adalora():
    """``Adapter.merge(state)`` (copy=True, the default) of a channels_last torch state merges."""
    from peftmath.adapter import Adapter
    from peftmath.methods.adalora import AdaLoraConfig, rank_scale

    rng = np.random.default_rng(21)
    W32 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    A, E, B = _adalora_factors(W32.shape, 4, rng)
    cfg = AdaLoraConfig(target_modules=["conv"], init_r=4, target_r=2, lora_alpha=8, total_step=10)
    ad = Adapter(cfg, {"conv": {"lora_A": torch.from_numpy(A), "lora_E": torch.from_numpy(E),
                                "lora_B": torch.from_numpy(B)}})
    state = {"conv.weight": torch.from_numpy(W32.copy()).to(memory_format=torch.channels_last)}
    merged = ad.merge(state)
    c = rank_scale(8.0, 4)
    want = W32.astype(np.float64) + c * (B.astype(np.float64) @ (A * E).astype(np.float64)).reshape(W32.shape)
    assert np.max(np.abs(_host(merged["conv.weight"]) - want)) <= _bound(want, W32)
    assert np.max(np.abs(want - W32)) > 100 * _bound(want, W32)
    assert np.array_equal(_host(state["conv.weight"]), W32)  # the input state is untouched


def test_c_contiguous_numpy_takes_the_blas_kernel_and_writes_w(monkeypatch):
    """The fast path stays: C-contiguous float32 W goes to BLAS gemm (beta=1) on W's own memory."""
    from peftmath.methods import lora

    rng = np.random.default_rng(22)
    W = rng.standard_normal((64, 48)).astype(np.float32)
    A = rng.standard_normal((4, 48)).astype(np.float32)
    B = rng.standard_normal((64, 4)).astype(np.float32)
    W0 = W.copy()
    seen = []
    orig = NumpyBackend.addmm_

    def spy(backend, m, b, a, alpha):
        ok = orig(backend, m, b, a, alpha)
        seen.append((m, ok))
        return ok

    monkeypatch.setattr(NumpyBackend, "addmm_", spy)
    assert lora.merge(W, A, B, scaling=0.5, copy=False) is W
    assert [ok for _, ok in seen] == [True] and seen[0][0] is W
    want = _lora_ref(W0, A, B, 0.5)
    assert np.max(np.abs(W - want)) <= _bound(want, W0) and np.max(np.abs(W - W0)) > 1.0


@pytest.mark.parametrize("kind,shape", [("Conv2d", (6, 4, 3, 3)), ("Linear", (6, 4))])
def test_read_only_and_grad_refusals_name_module_and_layout(kind, shape):
    from peftmath.methods import lora

    rng = np.random.default_rng(23)
    W = _np_readonly(rng.standard_normal(shape).astype(np.float32))
    A = rng.standard_normal((2, *shape[1:])).astype(np.float32)
    B = rng.standard_normal((shape[0], 2, *(1,) * (len(shape) - 2))).astype(np.float32)
    with pytest.raises(UnsupportedError, match=r"lora\.merge: .*read-only numpy\.ndarray.*use copy=True"):
        lora.merge(W, A, B, scaling=1.0, copy=False)
    t = torch.from_numpy(W.copy()).requires_grad_(True)
    with pytest.raises(UnsupportedError, match=r"lora\.unmerge: .*requires grad.*use copy=True"):
        lora.unmerge(t, torch.from_numpy(A), torch.from_numpy(B), scaling=1.0, copy=False)
    with torch.no_grad():  # PyTorch allows the write here, and so does peftmath
        assert lora.merge(t, torch.from_numpy(A), torch.from_numpy(B), scaling=1.0, copy=False) is t
    assert np.max(np.abs(_host(t) - _lora_ref(W, A, B, 1.0))) <= _bound(_lora_ref(W, A, B, 1.0), W)


@pytest.mark.parametrize("peft_type,fields,changes_bias", [
    ("LORA", dict(r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False), True),
    ("LORA", dict(r=2, lora_alpha=2, init_lora_weights=False), False),
    ("IA3", dict(init_ia3_weights=False), True),
    ("IA3", dict(init_ia3_weights=False, feedforward_modules=["m"]), False),
])
def test_a_bias_the_merge_changes_is_written_in_place_too(peft_type, fields, changes_bias):
    """copy=False writes every array the merge changes; ``require_inplace`` checks them all first."""
    from peftmath.layers import Layer
    from peftmath.methods import get_method

    method = get_method(peft_type)
    rng = np.random.default_rng(24)
    layer = Layer.of((5, 3))
    W, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    config = method.Config(target_modules=["m"], **fields)
    params, _ = method.Module.initialize("m", config, layer, weight=W, seed=1)
    mod = method.Module("m", config, params, layer)
    assert mod.changes_bias() is changes_bias
    want = mod.merge(W, b, copy=True)
    b_ro = _np_readonly(b)
    W0 = W.copy()
    if changes_bias:
        with pytest.raises(UnsupportedError, match=r"m: copy=False .* the bias is not writeable"):
            mod.require_inplace(W, b_ro)
        with pytest.raises(UnsupportedError, match=r"m: copy=False .* the bias is not writeable"):
            mod.merge(W, b_ro, copy=False)
        assert np.array_equal(W, W0)  # nothing written: the weight is untouched too
        bw = b.copy()
        res = mod.merge(W, bw, copy=False)
        assert res.weight is W and res.bias is bw
        assert np.allclose(bw, want.bias, rtol=1e-6, atol=1e-6) and not np.allclose(bw, b)
    else:
        mod.require_inplace(W, b_ro)  # the bias is not touched: a read-only one is fine
        res = mod.merge(W, b_ro, copy=False)
        assert res.weight is W and np.array_equal(b_ro, b)
    assert np.allclose(W, want.weight, rtol=1e-6, atol=1e-6)
