"""The streamed merge's pipeline (peftmath.io.pipeline): the same bytes as the sequential path, bounded
memory, and errors from any thread that leave no output and the inputs untouched."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import CheckpointError, NonFiniteError
from peftmath.io import pipeline, stream
from peftmath.io.pipeline import ReadAhead, WriteBehind
from peftmath.io.safetensors import DTYPES, SafeTensorsFile
from peftmath.io.stream import open_model, transform
from peftmath.layers import Layer
from peftmath.methods.lora import LoraConfig, LoraModule
from tests.cli.conftest import N_LAYERS, model_state, write_model

BF16 = DTYPES["BF16"]
LAYERS = N_LAYERS


def _state(dtype) -> dict[str, np.ndarray]:
    return model_state(dtype, seed=3)


def _write_model(path: Path, state: dict[str, np.ndarray], shards: int) -> Path:
    return write_model(path, state, shards=shards)


def _adapter(state, dtype, *, bias: bool = True, poison: str | None = None) -> Adapter:
    """LoRA r=4 on every q_proj and v_proj; with ``bias``, a trained bias of layer 1's q_proj (it replaces
    the base bias of that group, as PEFT's bias="lora_only"); ``poison``: a module whose B holds an inf."""
    targets = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     bias="lora_only" if bias else "none")
    params = {}
    for j, m in enumerate(targets):
        w = state[f"{m}.weight"].astype(np.float32)
        p, _ = LoraModule.initialize(m, cfg, Layer.of(w.shape), weight=w, seed=100 + j)
        params[m] = {k: np.asarray(v).astype(dtype) for k, v in p.items()}
        if m == poison:
            params[m]["lora_B.weight"][0, 0] = np.inf
    other = {"model.layers.1.q_proj.bias": (np.arange(16) / 7).astype(dtype)} if bias else None
    return Adapter(cfg, params, other=other)


def _digest(folder: Path) -> dict[str, str]:
    return {q.name: hashlib.sha256(q.read_bytes()).hexdigest() for q in sorted(folder.iterdir())}


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(q.name for q in folder.iterdir() if q.name.startswith(f".{name}") or q.name.startswith(name))


@pytest.fixture(params=[np.float32, BF16], ids=["float32", "bfloat16"])
def model(request, tmp_path):
    dtype = request.param
    state = _state(dtype)
    return _write_model(tmp_path / "base", state, shards=3), state, dtype


@pytest.mark.parametrize("limit", [None, 1], ids=["default-limit", "one-tensor-at-a-time"])
def test_pipeline_writes_the_sequential_bytes(model, tmp_path, monkeypatch, limit):
    base_dir, state, dtype = model
    ad = _adapter(state, dtype)
    base = open_model(base_dir)
    before = _digest(base_dir)
    transform(base, [ad], tmp_path / "seq", pipeline=False)
    kicks = []
    if limit is not None:  # also start the write-back every 256 bytes (posix_fadvise: a hint, same bytes)
        monkeypatch.setattr(stream, "MAX_STAGE_BYTES", limit)
        monkeypatch.setattr(pipeline, "WRITEBACK_BYTES", 256)
        if pipeline._FADVISE:
            real = pipeline.os.posix_fadvise
            monkeypatch.setattr(pipeline.os, "posix_fadvise", lambda *a: (kicks.append(a[1:3]), real(*a))[1])
    transform(base, [ad], tmp_path / "pipe", pipeline=True)
    if limit is not None and pipeline._FADVISE:
        assert len(kicks) > 3 and all(n >= 256 for _, n in kicks)
    seq, pipe = _digest(tmp_path / "seq"), _digest(tmp_path / "pipe")
    assert seq == pipe and len(seq) == 5  # 3 shards, index, config.json: byte for byte
    assert _digest(base_dir) == before
    # what the bytes hold: untouched tensors copied, the merged ones equal W + s B A rounded once, the bias replaced
    out = open_model(tmp_path / "pipe")
    merged = ad.merge({k: v.copy() for k, v in state.items()})
    for k, v in state.items():
        got = out.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        if k.endswith("proj.weight") or k == "model.layers.1.q_proj.bias":
            assert not np.array_equal(got, v), k
        else:  # copied: norms, embeddings, lm_head, an int64 tensor, the biases no adapter replaces
            assert got.tobytes() == v.tobytes(), k
    for k in merged:
        np.testing.assert_array_equal(out.read(k).astype(np.float64), np.asarray(merged[k]).astype(np.float64),
                                      err_msg=k)
    np.testing.assert_array_equal(out.read("model.layers.1.q_proj.bias").astype(np.float64),
                                  (np.arange(16) / 7).astype(dtype).astype(np.float64))


def test_pipeline_with_dtype_conversion_and_resharding(model, tmp_path):
    """--dtype (every float tensor cast: the bf16 <-> f32 integer casts) and max_shard_size: same bytes."""
    base_dir, state, dtype = model
    other = np.float32 if dtype == BF16 else BF16
    ad = _adapter(state, dtype, bias=False)
    base = open_model(base_dir)
    for pipe in (False, True):
        transform(base, [ad], tmp_path / f"cast-{pipe}", dtype=np.dtype(other), pipeline=pipe)
        transform(base, [ad], tmp_path / f"shard-{pipe}", max_shard_size=800, pipeline=pipe)
    assert _digest(tmp_path / "cast-False") == _digest(tmp_path / "cast-True")
    assert _digest(tmp_path / "shard-False") == _digest(tmp_path / "shard-True")
    assert len(list((tmp_path / "shard-True").glob("*.safetensors"))) > 3
    cast = open_model(tmp_path / "cast-True")
    np.testing.assert_array_equal(cast.read("model.embed_tokens.weight"),
                                  state["model.embed_tokens.weight"].astype(other))  # ml_dtypes' own cast


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("peftmath-")}


@pytest.mark.parametrize("where", ["read", "write", "compute", "fsync"])
def test_error_in_any_thread_leaves_nothing(model, tmp_path, monkeypatch, where):
    base_dir, state, dtype = model
    poison = "model.layers.2.v_proj" if where == "compute" else None
    ad = _adapter(state, dtype, poison=poison)
    base = open_model(base_dir)
    before = _digest(base_dir)
    calls = {"n": 0}
    if where == "read":
        real = stream.Model.read

        def read(self, key, **kw):  # (kw: the reused buffer the pipeline reads an adapted weight into)
            if key == "model.layers.2.v_proj.weight":
                raise CheckpointError(f"{key}: injected read failure")
            return real(self, key, **kw)

        monkeypatch.setattr(stream.Model, "read", read)
        expect = (CheckpointError, "injected read failure")
    elif where == "write":
        real_write = pipeline.write_all

        def write_all(fd, data):
            calls["n"] += 1
            if calls["n"] == 7:
                raise OSError(28, "No space left on device (injected)")
            return real_write(fd, data)

        monkeypatch.setattr(pipeline, "write_all", write_all)
        expect = (OSError, "No space left")
    elif where == "fsync":
        real_fsync = pipeline.os.fsync

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(5, "Input/output error (injected)")
            return real_fsync(fd)

        monkeypatch.setattr(pipeline.os, "fsync", fsync)
        expect = (OSError, "Input/output error")
    else:
        expect = (NonFiniteError, "v_proj")
    with pytest.raises(expect[0], match=expect[1]):
        transform(base, [ad], tmp_path / "out", safe=True)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, "out") == []  # no temporary folder, no records
    assert _digest(base_dir) == before
    assert _threads() == set()  # every thread stopped
    monkeypatch.undo()
    transform(base, [_adapter(state, dtype)], tmp_path / "out")  # and the next run works
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_read_ahead_is_bounded_and_ordered():
    held = {"now": 0, "max": 0}
    lock = threading.Lock()

    def read(key):
        with lock:
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])
        return np.full(25, int(key), dtype=np.float32)  # 100 bytes

    keys = [str(i) for i in range(40)]
    ra = ReadAhead(read, keys, lambda k: 100, limit=250)
    got = []
    for k in keys:
        got.append(int(ra.take(k)[0]))
        with lock:
            held["now"] -= 1
    ra.close()
    assert got == list(range(40))
    assert held["max"] == 2  # 2 x 100 bytes fit in 250; a third waits
    assert int(ra.take("7")[0]) == 7  # a key out of order is read directly


def test_write_behind_is_bounded(tmp_path):
    """The caller waits while the writer holds ``limit`` bytes: never more than that in flight."""
    gate = threading.Event()
    seen = []
    real = pipeline.write_all

    def slow_write(fd, data):
        gate.wait(5)
        seen.append(data.nbytes)
        real(fd, data)

    wb = WriteBehind(limit=300)
    wb.open(tmp_path / "f.bin", b"head")
    try:
        pipeline.write_all = slow_write
        arrays = [np.full(25, i, np.float32) for i in range(5)]  # 100 bytes each
        t = threading.Thread(target=lambda: [wb.write(a) for a in arrays])
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked: 300 bytes are queued behind the stalled write
        assert wb._budget.used <= 300
        gate.set()
        t.join(5)
        wb.end_file()
        wb.finish()
    finally:
        pipeline.write_all = real
        wb.abort()
    data = (tmp_path / "f.bin").read_bytes()
    assert data[:4] == b"head"
    np.testing.assert_array_equal(np.frombuffer(data[4:], np.float32), np.repeat(np.arange(5, dtype=np.float32), 25))


def test_transform_on_the_cli_path_is_unchanged(model, tmp_path, capsys):
    """`peftmath merge` (pipelined) writes what transform(pipeline=False) writes."""
    from peftmath.cli import main

    base_dir, state, dtype = model
    ad = _adapter(state, dtype, bias=False)
    pm.save_adapter(ad, tmp_path / "lora")
    assert main(["merge", str(base_dir), str(tmp_path / "lora"), "-o", str(tmp_path / "cli"), "-q"]) == 0
    transform(open_model(base_dir), [pm.load_adapter(tmp_path / "lora")], tmp_path / "seq", pipeline=False,
              provenance=json.loads(SafeTensorsFile(next((tmp_path / "cli").glob("*.safetensors"))).metadata[
                  stream.PROVENANCE_KEY]))
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "seq")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # NumPy's float16 cast says so
@pytest.mark.parametrize("out_dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_safe_refuses_a_cast_that_overflows(tmp_path, out_dtype):
    """--safe: a float32 value that rounds to infinity in the output dtype (3.4e38 in bfloat16, 7e4 in
    float16) is refused, for bfloat16 too, naming the tensor; nothing is written. Without it, inf is written."""
    state = _state(np.float32)
    big = 3.4e38 if out_dtype == BF16 else 7e4
    state["model.layers.1.norm.weight"][3] = big
    base_dir = _write_model(tmp_path / "base", state, shards=2)
    base = open_model(base_dir)
    ad = _adapter(state, np.float32, bias=False)
    assert np.isinf(np.float32(big).astype(out_dtype))
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.norm\.weight"):
        transform(base, [ad], tmp_path / "out", dtype=np.dtype(out_dtype), safe=True)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []
    transform(base, [ad], tmp_path / "out", dtype=np.dtype(out_dtype))
    assert np.isinf(open_model(tmp_path / "out").read("model.layers.1.norm.weight").astype(np.float32)[3])
