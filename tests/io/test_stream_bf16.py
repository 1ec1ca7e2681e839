"""The streamed merge of a bfloat16 model: plain LoRA weights merged by the task itself in float32 row tiles of
their bits (peftmath.io.stream.float32_weights, _merge_bf16_bits) write the same bytes as the module's own
bfloat16 path (its own float32 row tiles, of other sizes) and as the public API's whole-state merge, and the bytes
are W + s·B·A rounded once."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from peftmath.adapter import Adapter
from peftmath.backends import backend_for
from peftmath.io import stream
from peftmath.io.safetensors import DTYPES, save_file
from peftmath.io.stream import compute_unit, open_model, plan, prepare, transform
from peftmath.layers import Layer
from peftmath.methods.lora import LoraConfig, LoraModule

BF16 = DTYPES["BF16"]
#: odd shapes (rows not a multiple of the module path's row tiles once those are made small)
SHAPES = {"q_proj": (37, 24), "v_proj": (24, 24)}
LAYERS = 2
TARGETS = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in SHAPES]


def _state(seed: int = 0, *, specials: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    st = {"model.embed_tokens.weight": rng.standard_normal((20, 24))}
    for i in range(LAYERS):
        for p, shape in SHAPES.items():
            st[f"model.layers.{i}.{p}.weight"] = rng.standard_normal(shape) / 4
        st[f"model.layers.{i}.q_proj.bias"] = rng.standard_normal(37) / 10
    st = {k: v.astype(np.float32).astype(BF16) for k, v in st.items()}
    if specials:  # NaN (a payload, a negative one), infinities, subnormals, the largest finite bf16 values
        w = st["model.layers.0.q_proj.weight"].view(np.uint16)
        w[0, :8] = [0x7F81, 0xFFC1, 0x7F80, 0xFF80, 0x0001, 0x8003, 0x7F7F, 0xFF7F]
        b = st["model.layers.0.q_proj.bias"].view(np.uint16)
        b[:2] = [0x7F81, 0xFFFF]  # NaNs with payloads in a bias no adapter touches: copied bit for bit
    return st


def _write(path: Path, state: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _lora(state, *, seed: int = 1, use_dora: bool = False, bias: bool = False, dtype=np.float32) -> Adapter:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora,
                     lora_bias=bias)
    params = {}
    for j, m in enumerate(TARGETS):
        w = state[f"{m}.weight"].astype(np.float32)
        p, _ = LoraModule.initialize(m, cfg, Layer.of(w.shape), weight=np.nan_to_num(w), seed=seed * 100 + j)
        params[m] = {k: np.asarray(v).astype(dtype) for k, v in p.items()}
    return Adapter(cfg, params)


def _module_path(monkeypatch):
    """Turn the widening off: every weight takes the module's own bfloat16 path (the reference)."""
    monkeypatch.setattr(stream, "float32_weights", lambda *a, **k: frozenset())


def _bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


@pytest.fixture
def small_tiles(monkeypatch):
    """The module path's float32 row tiles of 2 rows of 24 (many tiles, a remainder of 1 row for 37 rows), and the
    stream's of 5 rows (other tile edges: remainders of 2 and 4 rows)."""
    monkeypatch.setattr(type(backend_for(np)), "tile_bytes", 2 * 24 * 4)
    monkeypatch.setattr(stream, "BF16_TILE_BYTES", 5 * 24 * 4)


def test_which_weights_are_widened(tmp_path):
    state = _state()
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state)
    keys = {f"{m}.weight" for m in TARGETS}
    assert stream.float32_weights(plan(base, [ad]), safe=False, peft_compat=False) == keys
    for kw in ({"safe": True, "peft_compat": False}, {"safe": False, "peft_compat": True}):
        assert stream.float32_weights(plan(base, [ad]), **kw) == frozenset()  # rounded / checked in bf16
    assert stream.float32_weights(plan(base, [ad]), safe=False, peft_compat=False, backend=True) == frozenset()
    # two adapters on a weight: the bfloat16 path rounds between them; DoRA, lora_bias: other kernels
    assert stream.float32_weights(plan(base, [ad, _lora(state, seed=2)]), safe=False, peft_compat=False) == frozenset()
    for other in (_lora(state, use_dora=True), _lora(state, bias=True)):
        assert stream.float32_weights(plan(base, [other]), safe=False, peft_compat=False) == frozenset()
    # --dtype float32: the work dtype is float32 already; a float32 model: nothing to widen
    assert stream.float32_weights(plan(base, [ad], dtype=np.dtype(np.float32)), safe=False,
                                  peft_compat=False) == frozenset()
    f32 = {k: v.astype(np.float32) for k, v in state.items()}
    base32 = open_model(_write(tmp_path / "f32", f32))
    assert stream.float32_weights(plan(base32, [_lora(f32)]), safe=False, peft_compat=False) == frozenset()


@pytest.mark.parametrize("specials", [False, True], ids=["normal", "nan-inf-subnormal"])
@pytest.mark.parametrize("factors", [np.float32, BF16], ids=["f32-factors", "bf16-factors"])
def test_same_bytes_as_the_module_path(tmp_path, monkeypatch, small_tiles, specials, factors):
    state = _state(specials=specials)
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state, dtype=factors)
    for pipe in (True, False):
        transform(base, [ad], tmp_path / f"wide-{pipe}", pipeline=pipe)
    rep = transform(base, [ad], tmp_path / "wide-unmerged", direction="unmerge")
    with monkeypatch.context() as mp:
        _module_path(mp)
        transform(base, [ad], tmp_path / "module")
        transform(base, [ad], tmp_path / "module-unmerged", direction="unmerge")
    assert rep is not None
    assert _bytes(tmp_path / "wide-True") == _bytes(tmp_path / "wide-False") == _bytes(tmp_path / "module")
    assert _bytes(tmp_path / "wide-unmerged") == _bytes(tmp_path / "module-unmerged")
    # and the module path is the whole-state merge of the public API, in bfloat16
    out = open_model(tmp_path / "wide-True")
    merged = ad.merge({k: v.copy() for k, v in state.items()})
    for k, v in state.items():
        got = out.read(k)
        assert got.dtype == BF16
        if k in merged and k.endswith("proj.weight"):
            assert got.view(np.uint16).tobytes() == np.asarray(merged[k]).view(np.uint16).tobytes(), k
        else:
            assert got.view(np.uint16).tobytes() == v.view(np.uint16).tobytes(), k  # copied bit for bit


def test_the_bytes_are_w_plus_delta_rounded_once(tmp_path):
    """Against float64: each merged element is within half a bfloat16 ulp (plus float32 rounding of the sum) of
    W + s·B·A, and NaN / infinity stay what they were."""
    state = _state(specials=True)
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state)
    transform(base, [ad], tmp_path / "out")
    out = open_model(tmp_path / "out")
    s = ad.module(TARGETS[0], weight_shape=SHAPES["q_proj"]).scaling
    for m in TARGETS:
        p = ad.params[m]
        with np.errstate(invalid="ignore"):  # (ml_dtypes' cast of a NaN)
            w = state[f"{m}.weight"].astype(np.float64)
            got = out.read(f"{m}.weight").astype(np.float64)
        delta = s * (p["lora_B.weight"].astype(np.float64) @ p["lora_A.weight"].astype(np.float64))
        want = w + delta
        finite = np.isfinite(w)
        # one rounding to bfloat16 (unit roundoff 2^-8) of a float32 sum (a few 2^-24 of its terms)
        bound = np.abs(want) * 2.0 ** -8 + (np.abs(w) + 4 * np.abs(delta)) * 2.0 ** -22 + 2.0 ** -133
        assert np.all(np.abs(got[finite] - want[finite]) <= bound[finite]), m
        assert np.any(got[finite] != w[finite]), m
        np.testing.assert_array_equal(np.isnan(got), np.isnan(w))
        np.testing.assert_array_equal(got[np.isinf(w)], w[np.isinf(w)])


def test_the_job_pickles_without_its_buffers_and_reruns(tmp_path):
    """An engine's task: the pickled job keeps the choice, not the thread buffers; a unit run on the copy, run
    again, or run in another thread writes the same bytes."""
    state = _state()
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state)
    outp = prepare(base, [ad], tmp_path / "out")
    try:
        job = outp.job
        assert job.float32_weights == {f"{m}.weight" for m in TARGETS}
        units = [u for u in job.units if u.kind == "group"]
        first = compute_unit(job, units[0])[0]
        wkey = job.plan.key_group[units[0].keys[0]]
        assert first[wkey].dtype == np.uint16  # the weight's bfloat16 bits as written (its bias: as stored)
        buf = job.float32_buffer(SHAPES["q_proj"])
        assert buf.dtype == np.float32 and buf.shape == SHAPES["q_proj"]
        assert np.shares_memory(job.float32_buffer(SHAPES["v_proj"]), buf)  # reused, not reallocated
        state = job.__getstate__()  # what a task carries (distributed pickles it with cloudpickle)
        assert "_buffers" not in state and "_buffers" in job.__dict__
        copy = object.__new__(stream.Job)
        copy.__dict__.update(pickle.loads(pickle.dumps({"float32_weights": state.pop("float32_weights")})))
        copy.__dict__.update(state)
        assert copy.float32_weights == job.float32_weights
        other: list = []
        t = threading.Thread(target=lambda: other.append((job.float32_buffer(SHAPES["q_proj"]),
                                                          compute_unit(job, units[0])[0])))
        t.start()
        t.join()
        assert not np.shares_memory(other[0][0], buf)  # one buffer per thread
        runs = [first, other[0][1]] + [compute_unit(j, units[0])[0] for j in (copy, job)]
        for res in runs[1:]:
            assert res.keys() == first.keys()
            for k in first:
                assert res[k].dtype == first[k].dtype and res[k].tobytes() == first[k].tobytes()
        for u in units[1:]:  # the others, on the copy and on the job (its buffer reused for smaller weights)
            a, b = compute_unit(copy, u)[0], compute_unit(job, u)[0]
            assert all(a[k].view(np.uint16).tobytes() == b[k].view(np.uint16).tobytes() for k in a)
    finally:
        outp.abort()


def test_a_widened_merge_never_asks_for_the_bfloat16_dtype(tmp_path, monkeypatch):
    """Planning, laying out, reading, merging and writing a bfloat16 model whose adapted layers have no bias
    go by dtype codes, names and ``uint16`` bits: nothing in the stream asks for ml_dtypes' bfloat16 (so a
    reader that resolves dtypes only when asked never imports ml_dtypes for such a merge). Same bytes."""
    state = {k: v for k, v in _state().items() if not k.endswith("bias")}
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state)
    transform(base, [ad], tmp_path / "ref")
    real = stream.DTYPES
    asked: list[str] = []

    class Guard(dict):
        def __getitem__(self, code):
            if code != "F32":
                asked.append(code)
            return real[code]

    monkeypatch.setattr(stream, "DTYPES", Guard())
    real_dtype = stream.Model.dtype
    monkeypatch.setattr(stream.Model, "dtype", lambda self, key: (asked.append(key), real_dtype(self, key))[1])
    for pipe in (True, False):
        transform(base, [ad], tmp_path / f"out-{pipe}", pipeline=pipe)
        assert _bytes(tmp_path / f"out-{pipe}") == _bytes(tmp_path / "ref")
    assert asked == []
    # a group with a bias reads that bias in its dtype (the guard sees it): the guard works
    with_bias = _state()
    transform(open_model(_write(tmp_path / "biased", with_bias)), [_lora(with_bias)], tmp_path / "out-bias")
    assert "BF16" in asked


def _pools(monkeypatch) -> list:
    """Every float32 buffer pool transform makes (to look at its buffers afterwards)."""
    pools = []
    real = stream._Buffers

    def make(size):
        pool = real(size)
        pools.append(pool)
        return pool

    monkeypatch.setattr(stream, "_Buffers", make)
    return pools


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "merge-returns-a-copy"])
def test_widened_weights_reuse_a_few_buffers(tmp_path, monkeypatch, in_place):
    """The pipelined merge reads each weight's bfloat16 bits into one of a few buffers (read-ahead thread), merges
    them there in float32 row tiles (the computing thread's own small float32 buffer), writes them (write-behind
    thread) and reuses the buffer: at most four exist (one read ahead, one merged, two in the write-behind stage),
    and the bytes are the sequential merge's. A merge that returns a new array instead (a float32 model's weight
    merged with copy=True: its buffer is never given back) still writes the same bytes: the pool makes another
    buffer, nothing waits for it."""
    state = _state(3)
    if not in_place:
        state = {k: v.astype(np.float32) for k, v in state.items()}
    base = open_model(_write(tmp_path / "base", state))
    ad = _lora(state)
    transform(base, [ad], tmp_path / "seq", pipeline=False)
    if not in_place:
        monkeypatch.setattr(stream, "_in_place", lambda fn, st, **kw: fn(st, copy=True, **kw))
    pools = _pools(monkeypatch)
    monkeypatch.setattr(stream, "MAX_STAGE_BYTES", 1)  # one tensor per stage: the tightest pipeline
    transform(base, [ad], tmp_path / "pipe", pipeline=True)
    assert _bytes(tmp_path / "seq") == _bytes(tmp_path / "pipe")
    (pool,) = pools
    assert pool.nbytes == (2 if in_place else 4) * max(37 * 24, 24 * 24)  # bfloat16 bits / float32 weights
    if in_place:
        assert 1 <= len(pool._free) <= 4 and not pool._lent
    else:
        assert pool._free == []  # never given back (the copies were written)


def test_buffers_ignore_arrays_they_did_not_lend():
    pool = stream._Buffers(48)
    a = pool.take(np.float32, (3, 4))
    b = pool.take(np.float64, (2, 2))
    assert a.base is not b.base and a.shape == (3, 4) and b.shape == (2, 2) and b.dtype == np.float64
    assert pool.lent(a) and pool.lent(b[1:]) and not pool.lent(a.copy())
    pool.give_back(np.zeros((3, 4), np.float32))  # not one of them
    pool.give_back(a.copy())
    assert pool._free == []
    pool.give_back(a)
    pool.give_back(a)  # twice: kept once
    assert len(pool._free) == 1 and not pool.lent(a) and pool.take(np.uint8, (1,)).base is a.base
