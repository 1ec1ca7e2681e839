"""The adapter follows the base weights' library and device: a NumPy-loaded adapter merges into torch,
JAX and array-api-strict state dicts (factors moved once, cached), never copies W; mixed states are refused
with an error that says what to call."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.backends import ArrayAPIBackend, TorchBackend
from peftmath.errors import NamespaceError
from tests.helpers import assert_same_namespace, to_np
from tests.test_adapter import _model

torch = pytest.importorskip("torch")


@pytest.fixture
def saved(tmp_path):
    """A LoRA (or DoRA) adapter saved and loaded back as memory-mapped (read-only) NumPy arrays."""
    def make(dtype=np.float64, dora=False):
        state, ad = _model(dtype, dora=dora)
        pm.save_adapter(ad, tmp_path / "ad")
        loaded = pm.load_adapter(tmp_path / "ad")
        assert all(isinstance(a, np.ndarray) for p in loaded.params.values() for a in p.values())
        return state, loaded
    return make


def _count(monkeypatch, cls):
    calls = []
    orig = cls.from_host

    def spy(self, a, xp, device=None):
        calls.append(a.shape)
        return orig(self, a, xp, device)
    monkeypatch.setattr(cls, "from_host", spy)
    return calls


@pytest.mark.parametrize("dora", [False, True])
def test_numpy_adapter_into_torch_equals_numpy_merge(saved, monkeypatch, dora):
    state, ad = saved(np.float64, dora)
    ref = ad.merge(state)
    calls = _count(monkeypatch, TorchBackend)
    ts = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    out = ad.merge(ts)
    n_factors = sum(len(p) for p in ad.params.values())
    assert len(calls) == n_factors  # each factor moved once
    for k in ref:
        assert isinstance(out[k], torch.Tensor)
        np.testing.assert_allclose(out[k].numpy(), ref[k], rtol=1e-12, atol=1e-12)
    ad.merge(ts)  # again: the cache is used, nothing converted
    ad.delta_weight("model.q_proj", xp=pm.backends.get_backend("torch").namespace())
    assert len(calls) == n_factors
    for k in state:  # the input state is untouched (copy=True)
        np.testing.assert_array_equal(ts[k].numpy(), state[k])


def test_copy_false_torch_writes_in_place_and_unmerges(saved):
    state, ad = saved(np.float64, dora=True)
    ref = ad.merge(state)
    ts = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    ts["unet.conv.weight"] = ts["unet.conv.weight"].contiguous(memory_format=torch.channels_last)
    before = {k: v.data_ptr() for k, v in ts.items()}
    records: dict = {}
    out = ad.merge(ts, copy=False, records=records)
    for k in ("model.q_proj.weight", "h.0.c_attn.weight", "model.embed_tokens.weight", "unet.conv.weight"):
        assert out[k] is ts[k] and ts[k].data_ptr() == before[k]  # W written in place, never copied
        np.testing.assert_allclose(ts[k].numpy(), ref[k], rtol=1e-12, atol=1e-12)
    host_records = {k: to_np(v) for k, v in records.items()}  # records from a NumPy merge follow too
    back = ad.unmerge(out, copy=False, records=host_records)
    for k in state:
        np.testing.assert_allclose(to_np(back[k]), state[k], rtol=1e-10, atol=1e-10)


def test_numpy_adapter_into_array_api_strict(saved, monkeypatch):
    xps = pytest.importorskip("array_api_strict")
    state, ad = saved(np.float64)
    ref = ad.merge(state)
    calls = _count(monkeypatch, ArrayAPIBackend)
    out = ad.merge({k: xps.asarray(v) for k, v in state.items()})
    assert_same_namespace(xps, *out.values())
    for k in ref:
        np.testing.assert_allclose(to_np(out[k]), ref[k], rtol=1e-12, atol=1e-12)
    n = len(calls)
    ad.merge({k: xps.asarray(v) for k, v in state.items()})
    assert len(calls) == n == sum(len(p) for p in ad.params.values())


def test_numpy_adapter_into_jax_and_torch_into_numpy(saved):
    jnp = pytest.importorskip("jax.numpy")
    state, ad = saved(np.float32)
    ref = ad.merge(state)
    out = ad.merge({k: jnp.asarray(v) for k, v in state.items()})
    for k in ref:
        assert not isinstance(out[k], np.ndarray)
        np.testing.assert_allclose(to_np(out[k]), ref[k], rtol=2e-6, atol=2e-6)
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    y = ad.forward("model.q_proj", jnp.asarray(x), {k: jnp.asarray(v) for k, v in state.items()})
    np.testing.assert_allclose(to_np(y), ad.forward("model.q_proj", x, state), rtol=2e-5, atol=2e-5)
    # the other way round: a torch adapter (explicit xp=) merged into a NumPy state dict
    tad = ad.on(pm.backends.get_backend("torch").namespace())
    assert isinstance(tad.params["model.q_proj"]["lora_A.weight"], torch.Tensor)
    back = tad.merge(state)
    for k in ref:
        assert isinstance(back[k], np.ndarray)
        np.testing.assert_allclose(back[k], ref[k], rtol=2e-6, atol=2e-6)


def test_explicit_xp_still_loads_in_that_library(tmp_path, monkeypatch):
    state, ad = _model(np.float64)
    pm.save_adapter(ad, tmp_path / "ad")
    tad = pm.load_adapter(tmp_path / "ad", backend="torch")
    assert isinstance(tad.params["model.q_proj"]["lora_B.weight"], torch.Tensor)
    calls = _count(monkeypatch, TorchBackend)
    out = tad.merge({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    assert calls == []  # already in the weights' library: nothing moved
    np.testing.assert_allclose(out["model.q_proj.weight"].numpy(), ad.merge(state)["model.q_proj.weight"], rtol=1e-12)


def test_mixed_state_is_refused_with_what_to_call(saved):
    state, ad = saved(np.float64)
    mixed = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    mixed["model.q_proj.bias"] = state["model.q_proj.bias"].copy()
    keep = {k: v.clone() for k, v in mixed.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(NamespaceError, match=r"numpy on cpu: model\.q_proj\.bias.*torch\.as_tensor\(v\)"):
        ad.merge(mixed, copy=False)
    for k, v in keep.items():  # nothing written
        assert torch.equal(mixed[k], v)
    with pytest.raises(NamespaceError, match="torch.as_tensor"):
        ad.unmerge(mixed)
    # an untouched tensor of another library is passed through, not refused
    ok = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    ok["norm.weight"] = state["norm.weight"]
    assert ad.merge(ok)["norm.weight"] is state["norm.weight"]
