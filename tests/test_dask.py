"""dask.array as an array library (through array-api-compat): lazy in, lazy out, no hidden compute.

* The lazy-call table: for every method, example and layer kind of the cross-backend suite, on inputs
  split into several chunks per axis, ``delta_weight``, ``forward``, ``merge`` and ``unmerge`` build task
  graphs and compute nothing (a :class:`dask.callbacks.Callback` counts every compute); computed, their
  numbers equal the same calls on NumPy in float64. ``safe=True`` computes exactly once per module (the
  finiteness check must look at the values before anything is returned).
* ``copy=False`` is refused on dask arrays (an assignment rebuilds the graph, it writes no memory).
* The batched inverse and solve hooks (:meth:`peftmath.backends.DaskBackend.inv` / ``solve``): chunked
  ``(k, b, b)`` stacks against NumPy; a singular block is a NotInvertibleError when computed; a library
  refusing a stack is an UnsupportedError naming it, never reported as a singular block.
* ``_array.conv`` on chunks that do not line up with its reshapes (each reshape only merges or splits).
"""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import array_api_compat.dask.array as xd  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

from peftmath._array import conv  # noqa: E402
from peftmath.adapter import Adapter  # noqa: E402
from peftmath.backends import ArrayAPIBackend, DaskBackend, backend_for  # noqa: E402
from peftmath.errors import NotInvertibleError, UnsupportedError  # noqa: E402
from peftmath.layers import LayerKind  # noqa: E402
from tests.test_cross_backend import CASES, _build  # noqa: E402


class ComputeCounter(Callback):
    """Counts the graphs dask executes (one per ``compute``, ``np.asarray``, ``bool`` / ``float`` of a
    lazy value) while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _start(self, dsk):
        self.count += 1


def chunked(a: np.ndarray):
    """``a`` as a dask array of about two chunks per axis (uneven where the length is odd)."""
    a = np.asarray(a)
    return da.from_array(a, chunks=tuple(max(1, (s + 1) // 2) for s in a.shape) or ())


def test_backend_for_dask():
    assert isinstance(backend_for(xd), DaskBackend)
    assert backend_for(xd).namespace() is xd
    x = chunked(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(backend_for(xd).to_host(x), np.arange(6.0).reshape(2, 3))


#: known hidden computes / refusals on dask, by label (every layer kind of it) or "label-kind"; each names the
#: method file and line that computes. strict: a fix makes the test XPASS, and its entry must go.
#: The value checks become lazy with peftmath._array.refuse_where(result, bad, make_error).
_VALUE_CHECK = "unmerge's zero-entry check computes: bool(xp.any(...)) in "
KNOWN_LAZY = {
    "DoRA": _VALUE_CHECK + "dora.unmerge (lora_magnitude_vector == 0)",
    "IA3": _VALUE_CHECK + "ia3._check_invertible",
    "IA3 (feedforward)": _VALUE_CHECK + "ia3._check_invertible",
    "BOFT": _VALUE_CHECK + "boft._unmerge (boft_s)",
    "BOFT butterfly m=2": _VALUE_CHECK + "boft._unmerge (boft_s)",
    "RoAd": _VALUE_CHECK + "road.py (the inverse rotation's check)",
    "RoAd road_4": _VALUE_CHECK + "road.py (the inverse rotation's check)",
    "HiRA": _VALUE_CHECK + "hira.unmerge",
    "HRA": "hra.py computes in forward, merge and unmerge (value-dependent branches in the reflections)",
    "HRA Gram-Schmidt": "hra.py computes in forward, merge and unmerge (value-dependent branches in Gram-Schmidt)",
    "LoKr-Conv1d": "lokr.py: a reshape that merges and splits axes at once (dask refuses it on chunks)",
    "LoKr (effective conv)-Conv1d": "lokr.py: a reshape that merges and splits axes at once",
    "OFT block_share": "oft.apply_blocks' shared-block path reshapes (*lead, n) -> (m*r, b) in one step "
                       "(merge and split at once: dask refuses it on chunks)",
    "C3A": "c3a.delta_weight: the circulant's reshape (m, b*in) -> (m*b, in) splits and merges axes at once",
    "SHiRA": "shira.Positions reads the index tensor on the host (the positions are the structure of the delta)",
    "OSF": "osf.low_part: dask's svd takes matrices chunked along one axis only (refused: UnsupportedError)",
    "KaSA": "lora.kasa_low: dask's svd takes matrices chunked along one axis only and dask has no eigh for the "
            "Gram route (refused: UnsupportedError)",
    "DEFT qr": "deft.projector_factors: dask's qr takes deft_P in one column chunk only (refused: UnsupportedError)",
    "Super-tuning": "supertuning.Support reads the index tensor on the host (the positions are the structure of "
                    "the delta)",
    "Supra bottom-k": "supertuning.Support reads the index tensor on the host (the positions are the structure of "
                      "the delta)",
    "Super-tuning unsaved positions": "supertuning.select_positions: the positions are chosen from |W| and read on "
                                      "the host",
    "AdaMSS": "adamss: the subspace partition is k-means of the base weight's singular vectors, on the host",
    "FRoD": "frod: frod_s_size and S's positions (the structure of the core) are read on the host, and U comes "
            "from the base weight's decomposition on the host",
}


#: the same for ``merge(safe=True)`` on Linear (its own check is the one allowed compute)
KNOWN_SAFE = {
    "IA3": "ia3's merge checks its scale eagerly besides the safe check (2 computes)",
    "IA3 (feedforward)": "ia3's merge checks its scale eagerly besides the safe check (2 computes)",
    "RoAd": "road.py's merge checks values eagerly besides the safe check (2 computes)",
    "RoAd road_4": "road.py's merge checks values eagerly besides the safe check (2 computes)",
    "HRA": KNOWN_LAZY["HRA"],
    "HRA Gram-Schmidt": KNOWN_LAZY["HRA Gram-Schmidt"],
    "OFT block_share": KNOWN_LAZY["OFT block_share"],
    "C3A": KNOWN_LAZY["C3A"],
    "SHiRA": "shira.Positions reads the index tensor on the host besides the safe check (2 computes)",
    "OSF": KNOWN_LAZY["OSF"],
    "KaSA": KNOWN_LAZY["KaSA"],
    "DEFT qr": KNOWN_LAZY["DEFT qr"],
    "Super-tuning": "supertuning.Support reads the index tensor on the host besides the safe check (2 computes)",
    "Supra bottom-k": "supertuning.Support reads the index tensor on the host besides the safe check (2 computes)",
    "Super-tuning unsaved positions": "supertuning.select_positions reads |W| on the host besides the safe check",
    "AdaMSS": "adamss: the k-means partition on the host besides the safe check",
    "FRoD": "frod: S's structure and U on the host besides the safe check",
}


def _lazy_cases(known=KNOWN_LAZY, kinds=None):
    out = []
    for case in CASES:
        _, label, kind = case.values
        if kinds is not None and kind not in kinds:
            continue
        reason = known.get(f"{label}-{kind.value}") or known.get(label)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(*case.values, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("peft_type,label,kind", _lazy_cases())
def test_lazy_in_lazy_out_no_hidden_compute(peft_type, label, kind):
    _, config, layer, W, bias, params, x = _build(peft_type, label, kind, seed=3)
    state64 = {"m.weight": W} | ({"m.bias": bias} if bias is not None else {})
    ref = Adapter(config, {"m": params})
    ad = Adapter(config, {"m": {k: chunked(v) for k, v in params.items()}})
    state = {k: chunked(v) for k, v in state64.items()}
    kinds = {"m": kind}
    x_d = chunked(x)
    mod = ad.module("m", weight_shape=layer.weight_shape, kind=kind)
    ref_mod = ref.module("m", weight_shape=layer.weight_shape, kind=kind)

    with ComputeCounter() as counter:
        d = mod.delta_weight() if mod.additive else None
        y = ad.forward("m", x_d, state, kind=kind)
        records: dict = {}
        merged = ad.merge(state, layer_kinds=kinds, records=records)
        back = ad.unmerge(merged, layer_kinds=kinds, records=records)
    assert counter.count == 0, f"{label} on {kind.value}: {counter.count} hidden compute(s)"
    lazy = [y, merged["m.weight"], back["m.weight"]] + ([d] if d is not None else [])
    assert all(isinstance(a, da.Array) for a in lazy)

    tol = dict(rtol=1e-9, atol=1e-9 * (1 + float(np.max(np.abs(W)))))
    if d is not None:
        np.testing.assert_allclose(d.compute(), ref_mod.delta_weight(), **tol)
    np.testing.assert_allclose(y.compute(), ref.forward("m", x, state64, kind=kind), **tol)
    ref_records: dict = {}
    merged64 = ref.merge(state64, layer_kinds=kinds, records=ref_records)
    np.testing.assert_allclose(merged["m.weight"].compute(), merged64["m.weight"], **tol)
    np.testing.assert_allclose(back["m.weight"].compute(), W, **tol)  # the round trip: W again
    if bias is not None:
        np.testing.assert_allclose(np.asarray(merged["m.bias"]), merged64["m.bias"], **tol)


@pytest.mark.parametrize("peft_type,label,kind", _lazy_cases(KNOWN_SAFE, {LayerKind.LINEAR}))
def test_safe_merge_computes_once_per_module(peft_type, label, kind):
    """``safe=True`` must see the values before returning: one compute of the finiteness check per
    module, and the returned weight is still lazy."""
    _, config, layer, W, bias, params, _ = _build(peft_type, label, kind, seed=4)
    ad = Adapter(config, {"m": {k: chunked(v) for k, v in params.items()}})
    state = {"m.weight": chunked(W)} | ({"m.bias": chunked(bias)} if bias is not None else {})
    with ComputeCounter() as counter:
        merged = ad.merge(state, layer_kinds={"m": kind}, records={}, safe=True)
    assert counter.count == 1
    assert isinstance(merged["m.weight"], da.Array)


#: methods whose binding reads a checkpoint tensor on the host before copy=False is refused
KNOWN_COPY_FALSE = {
    "FRoD": "frod validates frod_s_size (two numbers) on the host when the module is bound, before the refusal",
}


@pytest.mark.parametrize("peft_type,label,kind", _lazy_cases(KNOWN_COPY_FALSE, {LayerKind.LINEAR}))
def test_copy_false_is_refused_and_computes_nothing(peft_type, label, kind):
    _, config, layer, W, bias, params, _ = _build(peft_type, label, kind, seed=5)
    ad = Adapter(config, {"m": {k: chunked(v) for k, v in params.items()}})
    weight = chunked(W)
    state = {"m.weight": weight} | ({"m.bias": chunked(bias)} if bias is not None else {})
    with ComputeCounter() as counter, pytest.raises(UnsupportedError, match=r"lazy dask array.*copy=True"):
        ad.merge(state, layer_kinds={"m": kind}, records={}, copy=False)
    assert counter.count == 0 and state["m.weight"] is weight
    np.testing.assert_array_equal(weight.compute(), W)


# ------------------------------------------------------------------------------------------------
# The batched inverse / solve hooks
# ------------------------------------------------------------------------------------------------
def _stack(rng, k=5, b=4):
    return rng.standard_normal((k, b, b)) + 3.0 * np.eye(b)


@pytest.mark.parametrize("chunks", [(2, 2, 3), (5, 4, 4), (1, 1, 1)])
def test_dask_inv_and_solve_match_numpy_on_any_chunking(chunks):
    rng = np.random.default_rng(0)
    A, B = _stack(rng), rng.standard_normal((5, 4, 3))
    backend = backend_for(xd)
    with ComputeCounter() as counter:
        inv = backend.inv(da.from_array(A, chunks=chunks), where="t")
        sol = backend.solve(da.from_array(A, chunks=chunks), da.from_array(B, chunks=(3, 1, 2)), where="t")
        sol2 = backend.solve(da.from_array(A[0], chunks=chunks[1:]), da.from_array(B[0], chunks=2), where="t")
    assert counter.count == 0
    np.testing.assert_allclose(inv.compute() @ A, np.broadcast_to(np.eye(4), A.shape), atol=1e-12)
    np.testing.assert_allclose(A @ sol.compute(), B, atol=1e-12)
    np.testing.assert_allclose(A[0] @ sol2.compute(), B[0], atol=1e-12)
    # the lazy result says b's shape (a (.., 4, 4), b (.., 4, 3)), not a's, before and after computing
    assert sol.shape == sol.compute().shape == B.shape and sol2.shape == B[0].shape


def test_dask_singular_block_is_not_invertible_when_computed():
    A = _stack(np.random.default_rng(1))
    A[3] = np.outer([1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 0.5, 2.0])  # rank 1
    lazy = backend_for(xd).inv(da.from_array(A, chunks=(2, 4, 4)), where="oft.unmerge", what="a rotation block")
    with pytest.raises(NotInvertibleError, match="oft.unmerge: a rotation block is singular"):
        lazy.compute()


def test_a_library_refusing_a_stack_is_unsupported_not_singular():
    """dask's own ``linalg.inv`` takes one matrix only: through the generic backend that refusal is an
    UnsupportedError naming the backend and shape, not 'a block is singular'."""
    A = da.from_array(_stack(np.random.default_rng(2)), chunks=(2, 4, 4))
    with pytest.raises(UnsupportedError, match=r"'array_api' backend cannot compute a batched linalg.inv of shape \(5, 4, 4\)"):
        ArrayAPIBackend().inv(A, where="oft.unmerge", what="a rotation block")
    with pytest.raises(UnsupportedError, match=r"linalg.solve"):
        ArrayAPIBackend().solve(A, A, where="oft.cayley_exact")


def test_generic_inv_reports_singular_blocks_of_eager_libraries():
    A = _stack(np.random.default_rng(3))
    A[1] = 0.0
    import array_api_compat.numpy as xnp

    with pytest.raises(NotInvertibleError, match="t: a block is singular"):
        backend_for(xnp).inv(A, where="t")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_on_misaligned_chunks(groups):
    """The im2col reshapes on chunks that split channels and spatial axes unevenly."""
    rng = np.random.default_rng(groups)
    x, w, b = rng.standard_normal((3, 4, 7, 6)), rng.standard_normal((8, 4 // groups, 3, 2)), rng.standard_normal(8)
    got = conv(da.from_array(x, chunks=(2, 3, 4, 5)), da.from_array(w, chunks=(3, 1, 2, 1)), da.from_array(b, chunks=3),
               groups=groups, padding=1, stride=(2, 1))
    assert isinstance(got, da.Array)
    np.testing.assert_allclose(got.compute(), _naive_conv2d(x, w, b, groups, padding=1, stride=(2, 1)), rtol=1e-12,
                               atol=1e-12)


def _naive_conv2d(x, w, b, groups, *, padding, stride):
    """The definition, one output element at a time: y[n, o, i, j] = b[o] + Σ_c,p,q w[o, c, p, q] ·
    xpad[n, g·C + c, i·s0 + p, j·s1 + q] over the input channels of output channel o's group g."""
    xp_ = np.pad(x, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    c_out, c_per, kh, kw = w.shape
    oh = (xp_.shape[2] - kh) // stride[0] + 1
    ow = (xp_.shape[3] - kw) // stride[1] + 1
    y = np.empty((x.shape[0], c_out, oh, ow))
    for o in range(c_out):
        g = o // (c_out // groups)
        for i in range(oh):
            for j in range(ow):
                patch = xp_[:, g * c_per:(g + 1) * c_per, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
                y[:, o, i, j] = np.einsum("ncpq,cpq->n", patch, w[o]) + b[o]
    return y


def test_refuse_where_is_lazy_on_dask_and_eager_elsewhere():
    """The deferred value check: on dask it computes nothing and raises when the result is computed; on
    NumPy it raises at once."""
    from peftmath._array import refuse_where

    v = np.arange(12.0).reshape(3, 4)
    bad = np.array([False, True, False])
    with pytest.raises(NotInvertibleError, match="entry 1"):
        refuse_where(v, bad, lambda: NotInvertibleError("entry 1 is zero"))
    assert refuse_where(v, ~np.ones(3, bool), lambda: NotInvertibleError("never")) is v
    with ComputeCounter() as counter:
        lazy_bad = refuse_where(chunked(v), chunked(bad), lambda: NotInvertibleError("entry 1 is zero"))
        lazy_ok = refuse_where(chunked(v), chunked(~np.ones(3, bool)), lambda: NotInvertibleError("never"))
    assert counter.count == 0
    with pytest.raises(NotInvertibleError, match="entry 1"):
        lazy_bad.compute()
    np.testing.assert_array_equal(lazy_ok.compute(), v)


@pytest.mark.parametrize("full_matrices", [True, False])
def test_svd_combine_on_chunked_dask_equals_the_weighted_sum(full_matrices):
    """dask has the reduced SVD only, on one-axis chunking: the combine rechunks and asks for it (the leading
    singular vectors it keeps are the full SVD's); at full rank the result is the exact weighted sum."""
    import peftmath as pm
    from peftmath.combine import combine

    rng = np.random.default_rng(11)

    def lora(r):
        params = {"lin": {"lora_A.weight": rng.standard_normal((r, 9)), "lora_B.weight": rng.standard_normal((7, r))},
                  "emb": {"lora_embedding_A": rng.standard_normal((r, 11)),
                          "lora_embedding_B": rng.standard_normal((4, r))}}
        cfg = pm.LoraConfig(r=r, lora_alpha=5.0, target_modules=["lin", "emb"])
        return Adapter(cfg, params), Adapter(cfg, {m: {k: chunked(v) for k, v in p.items()} for m, p in params.items()})

    (a, a_d), (b, b_d) = lora(2), lora(2)
    out = combine([a_d, b_d], [0.5, 1.5], combination_type="svd", svd_rank=4,
                  svd_full_matrices=full_matrices)
    for m in ("lin", "emb"):
        assert isinstance(out.params[m][next(iter(out.params[m]))], da.Array)
        expected = 0.5 * a.delta_weight(m) + 1.5 * b.delta_weight(m)
        np.testing.assert_allclose(np.asarray(out.delta_weight(m)), expected, atol=1e-10)
