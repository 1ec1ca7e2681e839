"""peftmath.io._blas: capping OpenBLAS's threads during the streamed merge, and the bits it must not change."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from peftmath.adapter import Adapter
from peftmath.io import _blas, stream
from peftmath.io.safetensors import DTYPES, save_file
from peftmath.io.stream import open_model, transform
from peftmath.methods.lora import LoraConfig

BF16 = DTYPES["BF16"]


def _libraries():
    pytest.importorskip("scipy.linalg")  # SciPy ships its own OpenBLAS: load it
    libs = _blas.openblas_libraries()
    if not libs:
        pytest.skip("no OpenBLAS library found in this process (another BLAS, or not Linux)")
    return libs


def test_cap_and_restore():
    libs = _libraries()
    before = [get() for get, _ in libs]
    for _, put in libs:
        put(3)
    try:
        with _blas.blas_threads(2):
            assert [get() for get, _ in libs] == [2] * len(libs)
            with _blas.blas_threads(5):  # never raised: a library at or below n is left alone
                assert [get() for get, _ in libs] == [2] * len(libs)
        assert [get() for get, _ in libs] == [3] * len(libs)
    finally:
        for (_, put), n in zip(libs, before):
            put(n)


@pytest.mark.parametrize("r", [1, 4, 16, 64, stream.LOW_RANK])
def test_low_rank_gemm_bits_do_not_depend_on_the_thread_count(r):
    """The merge's gemm (SciPy's sgemm, beta=1, on W's transpose) of a rank up to LOW_RANK gives the same bits
    with 1 and 2 threads, on shapes whose rows and columns split unevenly between threads."""
    from scipy.linalg import blas

    libs = _libraries()
    rng = np.random.default_rng(r)
    before = [get() for get, _ in libs]
    try:
        for m, n in [(2816, 1024), (1024, 1000), (333, 4096), (17, 2048)]:
            W = rng.standard_normal((m, n)).astype(np.float32)
            A = rng.standard_normal((r, n)).astype(np.float32)
            B = rng.standard_normal((m, r)).astype(np.float32)
            outs = []
            for threads in (1, 2):
                for _, put in libs:
                    put(threads)
                c = W.copy()
                blas.sgemm(0.5, A.T, B.T, beta=1.0, c=c.T, overwrite_c=True)
                outs.append(c.view(np.uint32))
            assert np.array_equal(outs[0], outs[1]), (m, n, r)
    finally:
        for (_, put), n in zip(libs, before):
            put(n)


def _model(tmp_path: Path, dtype) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    state = {f"l{i}.weight": (rng.standard_normal((64, 48)) / 4).astype(np.float32).astype(dtype) for i in range(3)}
    state["emb.weight"] = rng.standard_normal((10, 48)).astype(np.float32).astype(dtype)
    (tmp_path / "base").mkdir()
    save_file(state, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    return tmp_path / "base", state


def _lora(state, r: int, dtype=np.float32, use_dora: bool = False) -> Adapter:
    rng = np.random.default_rng(r)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["l0", "l1", "l2"], use_dora=use_dora)
    params = {}
    for m in ("l0", "l1", "l2"):
        params[m] = {"lora_A.weight": rng.standard_normal((r, 48)).astype(dtype) / 8,
                     "lora_B.weight": rng.standard_normal((64, r)).astype(dtype) / 8}
        if use_dora:
            params[m]["lora_magnitude_vector"] = (1 + rng.random(64)).astype(dtype)
    return Adapter(cfg, params)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["low-rank", "high-rank", "dora", "sequential"])
def test_transform_caps_only_low_rank_lora(tmp_path, monkeypatch, dtype, case):
    """The pipelined merge caps the BLAS threads for plain LoRA of rank <= LOW_RANK only (a higher rank's bits
    could change with the count; DoRA computes norms too), never without the pipeline; the bytes equal the
    sequential merge's either way."""
    made = []
    real = stream.BlasThreads
    monkeypatch.setattr(stream, "BlasThreads", lambda n: made.append(n) or real(n))
    base_dir, state = _model(tmp_path, dtype)
    r = stream.LOW_RANK + 1 if case == "high-rank" else 4
    ad = _lora(state, r, use_dora=case == "dora")
    base = open_model(base_dir)
    transform(base, [ad], tmp_path / "seq", pipeline=False, records_out=tmp_path / "r0")
    assert made == []
    transform(base, [ad], tmp_path / "out", pipeline=case != "sequential", records_out=tmp_path / "r1")
    assert len(made) == (1 if case == "low-rank" else 0)
    assert all(n >= 1 for n in made)
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("seq", "out")]
    assert digest[0] == digest[1]
