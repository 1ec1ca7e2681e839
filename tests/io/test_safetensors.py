"""peftmath.io.safetensors: round trips, interop with the safetensors library, strict refusal of bad files."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from peftmath.errors import CheckpointError
from peftmath.io.safetensors import DTYPES, SafeTensorsFile, dtype_code, load_file, save_file

CODES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"]


def _sample(code, shape, seed=0):
    dt = DTYPES[code]
    rng = np.random.default_rng(seed)
    if code == "BOOL":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dt)
    return (rng.standard_normal(shape) * 4).astype(dt)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes() if a.dtype != np.bool_ else a.tobytes()


def test_round_trip_every_dtype(tmp_path):
    tensors = {f"t.{code}": _sample(code, (3, 5), i) for i, code in enumerate(CODES)}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float16)
    tensors["fortran"] = np.asfortranarray(_sample("F32", (4, 3)))
    p = tmp_path / "a.safetensors"
    save_file(tensors, p, metadata={"format": "pt", "note": "x"})
    f = SafeTensorsFile(p)
    assert f.metadata == {"format": "pt", "note": "x"}
    assert sorted(f) == sorted(tensors)
    for k, v in tensors.items():
        got = f[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert _bits(got) == _bits(v), k
        assert f.dtype_code(k) == dtype_code(v.dtype)
    assert f.dtype_code("t.BF16") == "BF16" and f.dtype("t.F8_E4M3") == np.dtype(ml_dtypes.float8_e4m3fn)
    loaded = load_file(p)
    assert not loaded["t.F32"].flags.writeable  # memory-mapped, read-only
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_reads_files_written_by_safetensors_library(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    tensors = {c: _sample(c, (2, 7), i) for i, c in enumerate(["F64", "F32", "F16", "I64", "I32", "U8", "BOOL"])}
    p = tmp_path / "lib.safetensors"
    st_np.save_file(tensors, str(p), metadata={"k": "v"})
    f = SafeTensorsFile(p)
    assert f.metadata == {"k": "v"}
    for k, v in tensors.items():
        assert _bits(f[k]) == _bits(v) and f[k].dtype == v.dtype, k


def test_safetensors_library_reads_our_files(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    tensors = {c: _sample(c, (3, 2), i) for i, c in enumerate(["F64", "F32", "F16", "I64", "I8", "BOOL"])}
    p = tmp_path / "ours.safetensors"
    save_file(tensors, p, metadata={"format": "np"})
    back = st_np.load_file(str(p))
    for k, v in tensors.items():
        assert _bits(back[k]) == _bits(v), k


def test_bf16_and_fp8_interop_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = {"bf16": torch.randn(4, 3).to(torch.bfloat16), "f8": torch.randn(5).to(torch.float8_e4m3fn),
         "f8b": torch.randn(2, 2).to(torch.float8_e5m2)}
    p = tmp_path / "torch.safetensors"
    st_torch.save_file(t, str(p))
    f = SafeTensorsFile(p)
    np.testing.assert_array_equal(f["bf16"].astype(np.float32), t["bf16"].float().numpy())
    np.testing.assert_array_equal(f["f8"].astype(np.float32), t["f8"].float().numpy())
    np.testing.assert_array_equal(f["f8b"].astype(np.float32), t["f8b"].float().numpy())
    # and back: our bf16/fp8 files load in torch with the same values
    q = tmp_path / "ours.safetensors"
    save_file({k: f[k] for k in f}, q)
    back = st_torch.load_file(str(q))
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k].float(), t[k].float()), k


def test_big_endian_input_is_written_little_endian(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    p = tmp_path / "be.safetensors"
    save_file({"a": a}, p)
    np.testing.assert_array_equal(SafeTensorsFile(p)["a"], a.astype("<f4"))


def test_unsupported_dtype_refused_when_writing(tmp_path):
    with pytest.raises(CheckpointError, match="complex128"):
        save_file({"c": np.zeros(2, dtype=np.complex128)}, tmp_path / "c.safetensors")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# corrupted files
# --------------------------------------------------------------------------------------------------
def _raw(header, data=b"", *, header_len=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}

BAD = {
    "empty file": (b"", "too short"),
    "truncated header": (_raw(GOOD, b"\0" * 12)[:20], "runs past the end"),
    "truncated data": (_raw(GOOD, b"\0" * 10), "data_offsets"),
    "bad header length": (_raw(GOOD, b"\0" * 12, header_len=2**40), "exceeds"),
    "bad JSON": (_raw(b'{"a": {"dtype": "F32",', b""), "not valid JSON"),
    "header not an object": (_raw(b"[1, 2]"), "expected an object"),
    "not UTF-8": (_raw(b'{"\xff": 1}'), "UTF-8"),
    "overlap": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
    "gap": (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "gap of 4 bytes"),
    "wrong byte count": (_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                         r"\(12 bytes\) but data_offsets span 8"),
    "trailing bytes": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),
                       "cover 8 bytes of the 12"),
    "unknown dtype": (_raw({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
                      "unknown dtype 'F128'"),
    "negative dim": (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "invalid shape"),
    "bad offsets": (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "invalid data_offsets"),
    "duplicate keys": (_raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "duplicate key 'a'"),
    "bad metadata": (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
    "entry not an object": (_raw({"a": [1, 2]}), "not an object"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_corrupted_files_raise_checkpoint_error_naming_the_file(tmp_path, name):
    raw, message = BAD[name]
    p = tmp_path / "bad.safetensors"
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match=message) as info:
        SafeTensorsFile(p)
    assert str(p) in str(info.value)


def test_good_handmade_file_loads(tmp_path):
    p = tmp_path / "good.safetensors"
    data = np.array([1.5, -2.0], np.float32).tobytes() + np.array([0.25, 3.0], np.float16).tobytes()
    p.write_bytes(_raw(GOOD, data))
    f = SafeTensorsFile(p)
    np.testing.assert_array_equal(f["a"], [1.5, -2.0])
    np.testing.assert_array_equal(f["b"], np.array([0.25, 3.0], np.float16))


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "x.pth", "w.ckpt"])
def test_pickles_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x80\x04K\x01.")  # a pickle; never unpickled
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded") as info:
        SafeTensorsFile(p)
    assert name in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        SafeTensorsFile(tmp_path / "nope.safetensors")


def test_control_characters_in_names_are_escaped(tmp_path):
    p = tmp_path / "ctl.safetensors"
    p.write_bytes(_raw({"a\x1b[31m": {"dtype": "X", "shape": [], "data_offsets": [0, 0]}}))
    with pytest.raises(CheckpointError) as info:
        SafeTensorsFile(p)
    assert "\x1b" not in str(info.value) and "\\x1b" in str(info.value)


def test_ml_dtypes_is_imported_only_for_bfloat16_and_float8(tmp_path):
    """Importing peftmath.io and reading, planning and merging a float32 model never import ml_dtypes (0.9 s);
    the first bfloat16 tensor does, and gets ml_dtypes' bfloat16."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    save_file({"w": np.ones((4, 3), np.float32), "n": np.arange(3, dtype=np.int64)}, tmp_path / "f32.safetensors")
    save_file({"w": np.ones((4, 3), np.float32).astype(DTYPES["BF16"])}, tmp_path / "bf16.safetensors")
    code = f"""
import sys, numpy as np
import peftmath.io, peftmath.io.stream as st
from peftmath.io.safetensors import DTYPES, SafeTensorsFile, dtype_code
m = st.open_model({str(tmp_path / "f32.safetensors")!r})
assert m.read("w").dtype == np.float32 and dtype_code(np.float32) == "F32" and "F32" in DTYPES and "BF16" in DTYPES
assert st._wider(np.dtype(np.float32), np.dtype(np.float16)) == np.float32 and "bfloat16" in st.OUTPUT_DTYPES
print("before", "ml_dtypes" in sys.modules)
a = SafeTensorsFile({str(tmp_path / "bf16.safetensors")!r})["w"]
print("after", "ml_dtypes" in sys.modules, a.dtype.name, dtype_code(a.dtype), dtype_code("bfloat16"))
"""
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=root)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["before", "False", "after", "True", "bfloat16", "BF16", "BF16"]


def test_dtype_table_is_the_full_mapping():
    """DTYPES behaves as the dict it was: every code, in order, to its NumPy / ml_dtypes dtype, and back."""
    expect = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
              "BOOL": np.bool_}
    assert list(DTYPES) == list(expect) and len(DTYPES) == len(expect)
    assert dict(DTYPES.items()) == {k: np.dtype(v) for k, v in expect.items()}
    assert all(dtype_code(v) == k for k, v in expect.items())
    assert "C64" not in DTYPES and 3 not in DTYPES and DTYPES.get("C64") is None
    with pytest.raises(KeyError):
        DTYPES["C64"]
    with pytest.raises(CheckpointError, match="complex64"):
        dtype_code(np.complex64)
