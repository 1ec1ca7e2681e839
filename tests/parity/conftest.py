"""Helpers for the PEFT parity tests: tiny torch models, PEFT <-> NumPy conversion, tolerances, and
the checks every method's parity tests share (checkpoints both ways, peft_compat bit comparisons).

Nothing here imports torch or peft at module level in a way that fails: the test modules start with
``torch, peft = require_peft()`` (``pytest.importorskip`` of both, two torch threads) and then call
these helpers. Every model is built from a NumPy seed (no torch RNG, nothing downloaded).

The array helpers of ``tests/helpers.py`` (``to_xp``, ``to_np``, ``assert_same_namespace``) are
re-exported, so parity tests import everything with ``from tests.parity.conftest import ...``.
"""

from __future__ import annotations

import json
import re
import warnings

import ml_dtypes
import numpy as np
import pytest

try:  # keep the parity suite on two cores, like the rest of the project
    import torch as _torch

    _torch.set_num_threads(2)
except ImportError:  # pragma: no cover - parity tests skip themselves
    _torch = None


from tests.helpers import assert_same_namespace, to_np, to_xp  # noqa: E402,F401  (re-exported)

BF16 = np.dtype(ml_dtypes.bfloat16)

TOL_W = dict(atol=1e-5, rtol=1e-5)  # float32: ΔW, merged / unmerged weights
TOL_Y = dict(atol=1e-4, rtol=1e-4)  # float32: forwards


# --------------------------------------------------------------------------------------------------
# imports
# --------------------------------------------------------------------------------------------------
def require_peft():
    """``(torch, peft)`` or skip the calling test module (``torch, peft = require_peft()`` at its top)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.set_num_threads(2)
    return torch, peft


def torch_xp():
    """array-api-compat's torch namespace (peftmath computing with torch's own kernels)."""
    import array_api_compat.torch as xp

    return xp


# --------------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------------
def t2n(t) -> np.ndarray:
    """A torch tensor as a NumPy array of the same dtype (bfloat16 via ml_dtypes), copied."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(BF16).copy()
    return t.numpy().copy()


def n2t(a: np.ndarray):
    """A NumPy array (bfloat16 included) as a torch tensor of the same dtype."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


# --------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------
def layer_factory(kind: str, **kw):
    """A torch base layer: ``kind`` in linear, linear_nobias, conv1d_t (transformers Conv1D), embedding,
    conv1d, conv2d, conv3d (conv keywords: in_ch, out_ch, k, stride, padding, dilation, bias)."""
    import torch.nn as nn

    if kind == "linear":
        return nn.Linear(kw.get("in_f", 24), kw.get("out_f", 40), bias=kw.get("bias", True))
    if kind == "conv1d_t":
        from transformers.pytorch_utils import Conv1D

        return Conv1D(kw.get("out_f", 40), kw.get("in_f", 24))  # Conv1D(nf=out, nx=in): weight (in, out)
    if kind == "embedding":
        return nn.Embedding(kw.get("vocab", 48), kw.get("dim", 20))
    conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
    return conv(kw.get("in_ch", 6), kw.get("out_ch", 10), kw.get("k", 3), stride=kw.get("stride", 1),
                padding=kw.get("padding", 0), dilation=kw.get("dilation", 1), bias=kw.get("bias", True))


def two_linear_model(sizes: tuple[int, int, int], *, seed: int = 0, dtype=None):
    """``lin0 = Linear(sizes[0], sizes[1])``, ``lin1 = Linear(sizes[1], sizes[2])``, weights redrawn from ``seed``
    (the small model of the C3A, SHiRA and OSF parity tests); ``dtype`` a torch dtype."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1 = torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Linear(sizes[1], sizes[2])

    model = Tiny()
    redraw(model, seed=seed)
    return model if dtype is None else model.to(dtype)


def two_linear_inputs(sizes: tuple[int, int, int], seed: int = 5) -> dict[str, np.ndarray]:
    """Inputs of :func:`two_linear_model`'s layers: a 3-D batch for ``lin0``, a 2-D one for ``lin1``."""
    rng = np.random.default_rng(seed)
    return {"lin0": rng.standard_normal((3, 2, sizes[0])).astype(np.float32),
            "lin1": rng.standard_normal((4, sizes[1])).astype(np.float32)}


def build_model(layers: dict, *, seed: int = 0, dtype: str = "float32"):
    """An ``nn.Module`` holding ``layers`` (``{"blocks.0.q": module, ...}``, dotted names nest),
    every parameter redrawn from ``numpy.random.default_rng(seed)`` (weights N(0, 1/prod(shape[1:])),
    biases N(0, 0.01))."""
    import torch
    import torch.nn as nn

    root = nn.Module()
    for name, module in layers.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for pname, p in root.named_parameters():
            if pname.endswith("bias"):
                value = rng.normal(0.0, 0.1, p.shape)
            else:
                fan = int(np.prod(p.shape[1:]))
                value = rng.normal(0.0, 1.0 / np.sqrt(max(fan, 1)), p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return root.to(torch_dtype(dtype))


def base_state(model) -> dict[str, np.ndarray]:
    """The base model's state dict as NumPy arrays (taken before PEFT wraps the model)."""
    return {k: t2n(v) for k, v in model.state_dict().items()}


def randomize_adapter(peft_model, *, seed: int = 1, scale: float = 0.3) -> None:
    """Overwrite every LoRA/DoRA tensor of ``peft_model`` with values from a NumPy seed.

    Factors get N(0, scale²) entries (non-trivial: B != 0); DoRA magnitudes are multiplied by
    U(0.5, 1.5) so that g = m / ||W + sBA|| is far from 1. Dtypes are kept.
    """
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape).astype(np.float32)).to(p.dtype))
            elif "lora_" in name:
                p.copy_(torch.from_numpy(rng.normal(0.0, scale, p.shape).astype(np.float32)).to(p.dtype))


def redraw(module, spec: dict | None = None, *, seed: int) -> None:
    """Overwrite the parameters of ``module`` whose names contain a key of ``spec`` (``{substring:
    (mean, std)}``, the first matching key decides; default: every parameter, N(0, 1)) with normal
    draws from ``numpy.random.default_rng(seed)``, in parameter order, rounded to float32 and then to
    the parameter's dtype."""
    import torch

    spec = {"": (0.0, 1.0)} if spec is None else spec
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            for key, (mean, std) in spec.items():
                if key in name:
                    p.copy_(torch.from_numpy(rng.normal(mean, std, tuple(p.shape)).astype(np.float32)).to(p.dtype))
                    break


# --------------------------------------------------------------------------------------------------
# PEFT -> peftmath
# --------------------------------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "value"):
        return obj.value
    raise TypeError(type(obj))


def peft_config_dict(peft_model, adapter: str = "default") -> dict:
    """PEFT's config as adapter_config.json would hold it (sets as lists, enums as strings)."""
    return json.loads(json.dumps(peft_model.peft_config[adapter].to_dict(), default=_jsonable))


def peft_tensors(peft_model, adapter: str = "default", *, shared: dict | None = None) -> dict:
    """PEFT's adapter state dict (``get_peft_model_state_dict``) as NumPy ``{module: {suffix: array}}``,
    keys split by the method's ``PARAMETER_SUFFIXES``; the tensors of its ``SHARED_KEYS`` (VeRA's
    projections) go to ``shared`` when a dict is given."""
    import peft

    from peftmath.io.peft import split_key
    from peftmath.methods import get_method

    method = get_method(peft_config_dict(peft_model, adapter)["peft_type"])
    shared_keys = getattr(method, "SHARED_KEYS", ())
    params: dict = {}
    for key, value in peft.get_peft_model_state_dict(peft_model, adapter_name=adapter).items():
        if key in shared_keys:
            if shared is not None:
                shared[key] = t2n(value)
            continue
        parts = split_key(key, method.PARAMETER_SUFFIXES)
        assert parts is not None, key
        params.setdefault(parts[0], {})[parts[1]] = t2n(value)
    return params


def to_adapter(peft_model, adapter: str = "default"):
    """A :class:`peftmath.Adapter` holding exactly the tensors of ``peft_model``'s adapter (NumPy), for
    any method (shared tensors included)."""
    from peftmath import Adapter
    from peftmath.io.peft import config_from_dict

    shared: dict = {}
    params = peft_tensors(peft_model, adapter, shared=shared)
    return Adapter(config_from_dict(peft_config_dict(peft_model, adapter)), params, shared=shared)


def peft_layer(peft_model, name: str):
    """The PEFT tuner layer wrapping module ``name`` (a table wrapped for LoRA's ``trainable_token_indices``: its
    ``token_adapter``, PEFT's trainable-tokens layer)."""
    from peft.utils.other import TrainableTokensWrapper

    layer = peft_model.base_model.model.get_submodule(name)
    return layer.token_adapter if isinstance(layer, TrainableTokensWrapper) else layer


def peft_weights(peft_model, names) -> dict[str, np.ndarray]:
    """Current base weights (and biases) of the adapted modules ``names``, as NumPy, by state-dict key."""
    out = {}
    for name in names:
        base = peft_layer(peft_model, name).get_base_layer()
        out[f"{name}.weight"] = t2n(base.weight)
        if getattr(base, "bias", None) is not None:
            out[f"{name}.bias"] = t2n(base.bias)
    return out


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------
def check_merge_as_peft(ad, peft_model, state, names, label: str = "", *, tol: float = 1e-5) -> dict:
    """``ad.merge(state)`` equals PEFT's ``layer.merge()`` on every base tensor of ``names`` (weights and
    biases); returns PEFT's merged state (``state`` with those tensors replaced). PEFT's layers stay merged."""
    merged = ad.merge(state)
    for name in names:
        peft_layer(peft_model, name).merge()
    peft_merged = {**state, **peft_weights(peft_model, names)}
    for key in peft_weights(peft_model, names):
        np.testing.assert_allclose(merged[key], peft_merged[key], atol=tol, rtol=tol, err_msg=f"{label} merge {key}")
    return peft_merged


def check_unmerge_as_peft(ad, peft_model, state, peft_merged, names, label: str = "", *, tol: float = 1e-5) -> None:
    """``ad.unmerge`` of PEFT's merged state equals PEFT's ``layer.unmerge()`` and the original ``state`` on
    every base tensor of ``names``."""
    back = ad.unmerge(peft_merged)
    for name in names:
        peft_layer(peft_model, name).unmerge()
    for key, want in peft_weights(peft_model, names).items():
        np.testing.assert_allclose(back[key], want, atol=tol, rtol=tol, err_msg=f"{label} unmerge {key}")
        np.testing.assert_allclose(back[key], state[key], atol=tol, rtol=tol, err_msg=f"{label} round trip {key}")


def check_module_math_as_peft(ad, peft_model, state, inputs, names, *, delta_tol: float = 1e-6,
                              tol: float = 1e-5, back_tol: float | None = None, transposed: bool = False,
                              peft_delta=None) -> None:
    """The whole per-module parity of an additive method, in PEFT's order of operations:

    1. per module, ``ΔW`` (peftmath's, in the stored layout; ``transposed`` for transformers ``Conv1D``,
       whose stored weight is ``(in, out)`` while PEFT's ``get_delta_weight`` is ``(out, in)``) equals PEFT's
       ``get_delta_weight`` (a sparse result is made dense) within ``delta_tol``, and the adapted forward
       equals the PEFT layer's on ``inputs[name]`` within ``tol``;
    2. ``ad.merge(state)`` equals PEFT's ``merge_adapter()`` within ``tol``;
    3. ``ad.unmerge`` of that equals PEFT's ``unmerge_adapter()`` within ``back_tol`` (default ``tol``) and
       the original ``state`` within ``back_tol`` (the round trip).

    ``peft_delta(layer)`` replaces ``layer.get_delta_weight("default")`` where PEFT's merge takes its ΔW from
    elsewhere (a LoRA variant's own function). PEFT's warnings (e.g. about merging in low precision) are
    silenced; PEFT's model ends unmerged."""
    import torch

    back_tol = tol if back_tol is None else back_tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            with torch.no_grad():
                layer = peft_layer(peft_model, name)
                dw = layer.get_delta_weight("default") if peft_delta is None else peft_delta(layer)
            dw = t2n(dw.to_dense() if dw.is_sparse else dw)
            ours = ad.module(name, weight_shape=state[f"{name}.weight"].shape).delta_weight()
            np.testing.assert_allclose(ours.T if transposed else ours, dw, atol=delta_tol, rtol=delta_tol,
                                       err_msg=f"delta weight of {name}")
            np.testing.assert_allclose(ad.forward(name, inputs[name], state), peft_forward(peft_model, name, inputs[name]),
                                       atol=tol, rtol=tol, err_msg=f"forward of {name}")
        merged = ad.merge(state)
        peft_model.merge_adapter()
        for name in names:
            np.testing.assert_allclose(merged[f"{name}.weight"], t2n(peft_layer(peft_model, name).base_layer.weight),
                                       atol=tol, rtol=tol, err_msg=f"merged {name}")
        back = ad.unmerge(merged)
        peft_model.unmerge_adapter()
        for name in names:
            np.testing.assert_allclose(back[f"{name}.weight"], t2n(peft_layer(peft_model, name).base_layer.weight),
                                       atol=back_tol, err_msg=f"unmerged {name}")
            np.testing.assert_allclose(back[f"{name}.weight"], state[f"{name}.weight"], atol=back_tol,
                                       err_msg=f"round trip of {name}")


def check_state_merge_as_peft(adapter, state, want, *, layer_kinds, tol: dict, moved, folder) -> None:
    """The whole-state parity of an additive method against PEFT's ``merge_and_unload`` state ``want``:
    ``Adapter.merge`` with ``copy=True`` and ``copy=False`` gives PEFT's keys and values within ``tol``
    (:func:`assert_close` keywords), the ``moved`` weights changed by more than 0.05 (not a vacuous check),
    ``unmerge`` gives ``state`` back within ``tol``, and the adapter saves back as read from ``folder``."""
    merged = adapter.merge(state, layer_kinds=layer_kinds)
    inplace = {k: v.copy() for k, v in state.items()}
    adapter.merge(inplace, copy=False, layer_kinds=layer_kinds)
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **tol, what=f"merge {key}")
        assert_close(inplace[key], w, **tol, what=f"merge copy=False {key}")
    for key in moved:
        assert float(np.max(np.abs(merged[key] - state[key]))) > 0.05, key
    back = adapter.unmerge(merged, layer_kinds=layer_kinds)
    for key, w in state.items():
        assert_close(back[key], w, **tol, what=f"unmerge {key}")
    assert_saves_back_identically(adapter, folder)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def assert_close(got, want, *, atol: float, rtol: float, what: str = "") -> float:
    """``|got - want| <= atol + rtol |want|`` elementwise; returns the max abs error."""
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    bad = np.abs(g - w) > atol + rtol * np.abs(w)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.size} elements off, max abs err {max_abs(g, w):.3g}"
    return max_abs(g, w)


def bf16_ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of bf16 spacing at ``want`` (elementwise)."""
    assert got.dtype == BF16 and want.dtype == BF16, (got.dtype, want.dtype)
    sp = np.abs(np.spacing(want)).astype(np.float64)
    sp = np.where(sp == 0, np.float64(ml_dtypes.finfo(BF16).smallest_subnormal), sp)
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / sp


def bits_differ(got: np.ndarray, want: np.ndarray) -> int:
    """How many elements differ in their bit pattern (any dtype of 1, 2, 4 or 8 bytes)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    view = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[got.dtype.itemsize]
    return int(np.count_nonzero(np.ascontiguousarray(got).view(view) != np.ascontiguousarray(want).view(view)))


@pytest.fixture
def quiet_warnings():
    """Silence PEFT's UserWarnings (e.g. fan_in_fan_out notices) inside a test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def module_names(peft_model) -> list[str]:
    """Names of the modules PEFT adapted (relative to the base model)."""
    from peft.tuners.lora import LoraLayer

    return sorted(re.sub(r"^base_model\.model\.", "", n) for n, m in peft_model.named_modules()
                  if isinstance(m, LoraLayer) and n.startswith("base_model.model."))


# --------------------------------------------------------------------------------------------------
# one PEFT model and its peftmath twin
# --------------------------------------------------------------------------------------------------
def make_peft(layers: dict, config: dict, *, dtype: str = "float32", seed: int = 0, adapter_seed: int = 1,
              autocast_adapter_dtype: bool = True, randomize: bool = True, scale: float = 0.3):
    """Build a tiny model, wrap it with ``peft.get_peft_model(LoraConfig(**config))`` and return
    ``(peft_model, adapter, base_state)``.

    ``layers`` maps module names to ``(kind, layer_factory keywords)``. ``config`` holds LoraConfig
    fields (``init_lora_weights`` defaults to False). With ``randomize`` every adapter tensor is redrawn
    from ``adapter_seed`` (:func:`randomize_adapter`); ``adapter`` is peftmath's :class:`Adapter`
    holding PEFT's tensors, ``base_state`` the base state dict (NumPy), both taken from PEFT.
    """
    import peft

    model = build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=seed, dtype=dtype)
    state = base_state(model)
    cfg = dict(init_lora_weights=False)
    cfg.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), autocast_adapter_dtype=autocast_adapter_dtype)
    if randomize:
        randomize_adapter(pm, seed=adapter_seed, scale=scale)
    pm.eval()
    return pm, to_adapter(pm), state


def layer_kwargs(peft_model, name: str, *, groups: bool = False) -> dict:
    """The conv hyper-parameters of module ``name`` (empty for other layers); ``groups`` too if asked."""
    import torch.nn as nn

    base = peft_layer(peft_model, name).get_base_layer()
    if isinstance(base, nn.modules.conv._ConvNd):
        kw = dict(stride=tuple(base.stride), padding=tuple(base.padding), dilation=tuple(base.dilation))
        return dict(kw, groups=base.groups) if groups else kw
    return {}


def make_input(peft_model, name: str, *, seed: int = 5, batch: int = 3, dtype: str = "float32") -> np.ndarray:
    """A NumPy input for module ``name``: token ids for an Embedding, (batch, C, 7, ...) for a conv."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    base = peft_layer(peft_model, name).get_base_layer()
    rng = np.random.default_rng(seed)
    if isinstance(base, nn.Embedding):
        return rng.integers(0, base.num_embeddings, size=(batch, 5))
    if isinstance(base, nn.modules.conv._ConvNd):
        nd = len(base.kernel_size)
        shape = (batch, base.in_channels) + ((9, 8, 7)[:nd] if nd < 3 else (6, 5, 5))
    elif isinstance(base, Conv1D):
        shape = (batch, 4, base.weight.shape[0])
    else:
        shape = (batch, 4, base.in_features)
    x = rng.standard_normal(shape).astype(np.float32)
    return x.astype(BF16) if dtype == "bfloat16" else x


def peft_forward(peft_model, name: str, x: np.ndarray) -> np.ndarray:
    """PEFT's (unmerged) adapted output of module ``name`` for input ``x``."""
    import torch

    with torch.no_grad():
        return t2n(peft_layer(peft_model, name)(n2t(x)))


def adapter_to_torch(adapter):
    """The same adapter with its tensors (shared ones included) as torch tensors (peftmath computing
    with torch kernels)."""
    from peftmath import Adapter

    params = {m: {s: n2t(np.asarray(a)) for s, a in p.items()} for m, p in adapter.params.items()}
    return Adapter(adapter.config, params, shared={k: n2t(np.asarray(v)) for k, v in adapter.shared.items()})


def in_namespace(adapter, namespace: str):
    """``(adapter, to_x, to_n)`` for computing in ``namespace`` ("numpy" or "torch"): the adapter with
    its tensors in that library, and the conversions of a state dict into it and back to NumPy."""
    if namespace == "torch":
        return (adapter_to_torch(adapter), lambda d: {k: n2t(v) for k, v in d.items()},
                lambda d: {k: t2n(v) for k, v in d.items()})
    return adapter, (lambda d: d), (lambda d: d)


def assert_compat_bits(got: dict, want: dict, *, namespace: str, what=()) -> None:
    """``peft_compat=True`` results (bf16 state dicts by key) against PEFT's: bit-identical with torch's
    kernels. NumPy's BLAS / reductions may sum in another order (measured: 0 differing elements): at
    most 0.1% of the elements may differ there, by one bf16 ulp each."""
    for key in want:
        n_diff = bits_differ(got[key], want[key])
        if namespace == "torch":
            assert n_diff == 0, (*what, key, n_diff)
        else:
            assert n_diff <= max(1, want[key].size // 1000), (*what, key, n_diff)
            assert np.all(bf16_ulps(got[key], want[key]) <= 1.0), (*what, key)


def check_inplace_and_unmerge(pm, adapter, state, merged, *, records=None) -> None:
    """After ``pm.merge_adapter()`` gave PEFT's merged weights ``merged`` (float32): peftmath's in-place
    merge (``copy=False``) gives them too and its in-place unmerge the base ``state``; then PEFT
    unmerges, and peftmath's unmerge of ``merged`` (with the ``records`` of its merge: DoRA's norms)
    equals PEFT's unmerged weights and the base. All within TOL_W."""
    inplace = {k: v.copy() for k, v in state.items()}
    inplace_records: dict = {}
    adapter.merge(inplace, copy=False, records=inplace_records)
    for key, want in merged.items():
        assert_close(inplace[key], want, **TOL_W, what=f"merge copy=False {key}")
    adapter.unmerge(inplace, records=inplace_records, copy=False)
    for key in merged:
        assert_close(inplace[key], state[key], **TOL_W, what=f"unmerge copy=False {key}")
    pm.unmerge_adapter()
    unmerged = peft_weights(pm, adapter.modules)
    back = adapter.unmerge(merged, records=records)
    for key, want in unmerged.items():
        assert_close(back[key], want, **TOL_W, what=f"unmerge {key}")
        assert_close(back[key], state[key], **TOL_W, what=f"unmerge -> base {key}")


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
def load_peft_checkpoint(peft_model, folder):
    """PEFT's ``save_pretrained(folder)`` (its warnings silenced), read back by ``peftmath.load_adapter``."""
    import peftmath

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(folder)
    return peftmath.load_adapter(folder)


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    """Two ``{module: {suffix: array}}`` dicts hold the same modules, suffixes, dtypes, shapes and bits."""
    assert sorted(ours) == sorted(theirs)
    for module in theirs:
        assert sorted(ours[module]) == sorted(theirs[module]), module
        for suffix, want in theirs[module].items():
            got = np.asarray(ours[module][suffix])
            assert got.dtype == want.dtype and got.shape == want.shape, (module, suffix, got.dtype, want.dtype)
            assert bits_differ(got, want) == 0, (module, suffix)


def assert_saves_back_identically(adapter, folder) -> None:
    """``peftmath.save_adapter`` of ``adapter`` (loaded from the PEFT checkpoint in ``folder``) writes
    PEFT's files again: the same adapter_config.json and the same tensors (names, dtypes, bits)."""
    import peftmath
    from peftmath.io.safetensors import load_file

    out = peftmath.save_adapter(adapter, folder / "again")
    assert json.loads((out / "adapter_config.json").read_text()) == \
        json.loads((folder / "adapter_config.json").read_text())
    t1, t2 = load_file(folder / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(t1) == sorted(t2)
    for key in t1:
        assert t1[key].dtype == t2[key].dtype and bits_differ(t1[key], t2[key]) == 0, key


def check_reloaded_in_peft(peft_model, adapter, base, folder, inputs: dict, **tol) -> None:
    """``peftmath.save_adapter(adapter, folder)``, loaded by ``PeftModel.from_pretrained(base, folder)``:
    each module's output (``inputs`` by module name) equals ``peft_model``'s within ``tol``
    (``np.testing.assert_allclose`` keywords)."""
    import peft
    import peftmath

    peftmath.save_adapter(adapter, folder)
    fresh = peft.PeftModel.from_pretrained(base, folder)
    for name, x in inputs.items():
        np.testing.assert_allclose(peft_forward(fresh, name, x), peft_forward(peft_model, name, x), **tol)


def load_in_peft(model, folder, **kwargs):
    """``peft.PeftModel.from_pretrained(model, folder, **kwargs)`` that must use every tensor of the
    checkpoint: no warning about missing, unexpected or absent keys, and loading the folder a second
    time (adapter "again") reports no missing and no unexpected keys. Returns the PEFT model in eval
    mode with adapter "default" active."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, folder, **kwargs)
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    result = pm.load_adapter(folder, adapter_name="again", **kwargs)
    assert result.missing_keys == [] and result.unexpected_keys == [], result
    pm.set_adapter("default")
    pm.eval()
    return pm


def peft_attention_out_projection(pmodel, attention: str, x: np.ndarray) -> np.ndarray:
    """PEFT's out-projection of ``attention`` as its forward applies it: PEFT 0.21.2's attention merges its
    adapters, and torch's attention then computes ``F.linear(·, out_proj.weight, out_proj.bias)``; computed here
    on a copy of the layer (PEFT's model is left as it was)."""
    import copy

    import torch

    layer = copy.deepcopy(peft_layer(pmodel, attention))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    inner = layer.get_base_layer().out_proj
    with torch.no_grad():
        return t2n(torch.nn.functional.linear(n2t(x), inner.weight, inner.bias))
