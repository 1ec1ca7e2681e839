"""Fault tolerance of `peftmath merge`: SIGKILL at random points while writing, and a full disk.

After every kill the output is either absent or complete and equal to a reference merge (with its
DoRA merge records beside it, renamed into place just before the model), the inputs are byte-identical,
and the next run removes the killed run's temporary files (and records left without their model).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peftmath.cli import main
from peftmath.io.safetensors import load_file
from peftmath.io.stream import records_path
from tests.cli.conftest import make_lora, tree_digest, write_model

RUNS = int(os.environ.get("PEFTMATH_FAULT_RUNS", 20))


def _big_state(seed=0, layers=6, width=384):
    rng = np.random.default_rng(seed)
    st = {}
    for i in range(layers):
        st[f"model.layers.{i}.q_proj.weight"] = rng.standard_normal((width, width)).astype(np.float32)
        st[f"model.layers.{i}.mlp.weight"] = rng.standard_normal((width, width)).astype(np.float32)
    return st


def _read_model(path: Path) -> dict[str, np.ndarray]:
    if path.is_file():
        return {k: np.array(v) for k, v in load_file(path).items()}
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: np.array(v) for k, v in load_file(f).items()})
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".peftmath-" in p.name)


@pytest.mark.parametrize("shards,use_dora", [(1, False), (3, False), (3, True)])
def test_sigkill_during_merge_leaves_no_partial_output(tmp_path, shards, use_dora):
    state = _big_state()
    base = write_model(tmp_path / ("base.safetensors" if shards == 1 else "base"), state, shards=shards)
    adapter = tmp_path / "lora"
    make_lora(adapter, state, [k[:-7] for k in state if "q_proj" in k], r=8, use_dora=use_dora)
    ref = tmp_path / ("ref.safetensors" if shards == 1 else "ref")
    assert main(["merge", str(base), str(adapter), "-o", str(ref), "-q"]) == 0
    expected = _read_model(ref)
    expected_records = load_file(records_path(ref)) if use_dora else {}
    assert bool(expected_records) == use_dora
    runs = RUNS if not use_dora else max(4, RUNS // 2)  # the DoRA run checks the records beside the model
    before = tree_digest(base, adapter)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "peftmath.cli", "merge", str(base), str(adapter), "-q"]
    start = time.perf_counter()
    subprocess.run(cmd + ["-o", str(out_dir / ("timing" + (".safetensors" if shards == 1 else "")))], check=True)
    full = time.perf_counter() - start
    rng = random.Random(1234 + shards)
    outcomes = {"absent": 0, "complete": 0}
    for i in range(runs):
        out = out_dir / (f"run{i}" + (".safetensors" if shards == 1 else ""))
        proc = subprocess.Popen(cmd + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2:  # a random moment of the whole run
            time.sleep(rng.uniform(0.0, full * 1.1))
        else:      # a random moment once the temporary output exists: a kill while writing
            deadline = time.perf_counter() + 2 * full
            mine = f".{out.name}.pid{proc.pid}."
            while proc.poll() is None and time.perf_counter() < deadline and \
                    not any(n.startswith(mine) for n in _leftovers(out_dir)):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            got = _read_model(out)
            assert got.keys() == expected.keys()
            for k in expected:
                np.testing.assert_array_equal(got[k], expected[k])
            if use_dora:  # a complete model always has its records
                got_records = load_file(records_path(out))
                assert got_records.keys() == expected_records.keys()
                for k in expected_records:
                    np.testing.assert_array_equal(got_records[k], expected_records[k])
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        assert tree_digest(base, adapter) == before
    # the next run cleans up whatever the killed runs left beside their outputs
    final = out_dir / ("final" + (".safetensors" if shards == 1 else ""))
    for i in range(runs):
        target = out_dir / (f"run{i}" + (".safetensors" if shards == 1 else ""))
        if not target.exists():
            assert main(["merge", str(base), str(adapter), "-o", str(target), "-q"]) == 0
    assert main(["merge", str(base), str(adapter), "-o", str(final), "-q"]) == 0
    assert _leftovers(out_dir) == []
    # every records file belongs to a model (one left by a kill between the two renames was replaced)
    for rec in out_dir.glob("*.merge-records.safetensors"):
        assert Path(str(rec)[: -len(".merge-records.safetensors")]).exists(), rec
    assert sum(outcomes.values()) == runs


def test_full_disk_gives_a_clear_error_and_no_output(tmp_path, monkeypatch, capsys):
    state = _big_state(layers=2, width=64)
    base = write_model(tmp_path / "base", state, shards=2)
    adapter = tmp_path / "lora"
    make_lora(adapter, state, [k[:-7] for k in state if "q_proj" in k], r=4)
    before = tree_digest(base, adapter)
    import peftmath.io.stream as stream

    real_write = os.write
    written = {"n": 0}

    def full_disk(fd, data):
        written["n"] += len(data)
        if written["n"] > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(stream.os, "write", full_disk)
    out = tmp_path / "merged"
    rc = main(["merge", str(base), str(adapter), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    assert tree_digest(base, adapter) == before
