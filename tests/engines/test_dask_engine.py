"""peftmath.engines.dask: the streamed merge, unmerge and extraction as dask.distributed tasks write the serial
command's bytes (sharded models, DoRA records, casts, resharding, a process cluster, a worker killed mid-task),
a failed task leaves nothing behind, many small jobs batch, and the blockwise merge of one tensor equals the
NumPy merge with about one block per thread in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

import peftmath as pm  # noqa: E402
from peftmath.adapter import Adapter  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.engines import dask as engine  # noqa: E402
from peftmath.engines import rows  # noqa: E402
from peftmath.errors import CheckpointError, NonFiniteError, UnsupportedError  # noqa: E402
from peftmath.extract import extract_lora  # noqa: E402
from peftmath.io import stream  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods.lora import LoraConfig, LoraModule  # noqa: E402
from tests.cli.conftest import BF16, N_LAYERS, make_lora, model_state, tree_digest, write_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TARGETS = [f"model.layers.{i}.{p}" for i in range(N_LAYERS) for p in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def client():
    with engine.client(2) as c:  # two worker threads in this process
        yield c


def _outputs(out: Path) -> dict[str, str]:
    """sha256 of the output (a file or every file of a folder, by name) and of its records sibling."""
    found = {}
    for q in ([out] if out.is_file() else sorted(out.iterdir())):
        found[q.name] = tree_digest(q)[str(q)]
    rec = stream.records_path(out)
    if rec.exists():
        found["records"] = tree_digest(rec)[str(rec)]
    return found


def _leftovers(folder: Path) -> list[str]:
    return sorted(q.name for q in folder.iterdir() if ".peftmath-" in q.name)


def _adapters(tmp_path: Path, state: dict, dtype=np.float32) -> tuple[Path, Path]:
    lora, dora = tmp_path / "lora", tmp_path / "dora"
    make_lora(lora, state, TARGETS, r=4, dtype=dtype)
    make_lora(dora, state, TARGETS[:4], r=2, use_dora=True, seed=3, dtype=dtype)
    return lora, dora


def _bias_adapter(state: dict, *, poison: str | None = None) -> Adapter:
    """LoRA with a trained bias of layer 1's q_proj (replaces the base bias before the merge), optionally an
    inf in one module's B."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, bias="lora_only")
    params = {}
    for j, m in enumerate(TARGETS):
        w = state[f"{m}.weight"].astype(np.float32)
        p, _ = LoraModule.initialize(m, cfg, Layer.of(w.shape), weight=w, seed=50 + j)
        params[m] = {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}
        if m == poison:
            params[m]["lora_B.weight"][0, 0] = np.inf
    return Adapter(cfg, params, other={"model.layers.1.q_proj.bias": (np.arange(16) / 7).astype(np.float32)})


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_cli_merge_and_unmerge_on_workers_write_the_serial_bytes(tmp_path, dtype, client, capsys):
    """`merge --workers 2` and `unmerge --scheduler ADDRESS` (LoRA then DoRA, on 3 shards) write what the
    serial command writes: every shard, the index, config.json and the DoRA records, byte for byte."""
    state = model_state(dtype, seed=4)
    base = write_model(tmp_path / "base", state, shards=3)
    lora, dora = _adapters(tmp_path, model_state(np.float32, seed=4), dtype)
    before = tree_digest(base, lora, dora)
    for mode in ("serial", "engine"):
        extra = ["--workers", "2"] if mode == "engine" else []
        assert main(["merge", str(base), str(lora), str(dora), "-o", str(tmp_path / f"m-{mode}"), "-q", *extra]) == 0
        extra = ["--scheduler", client.scheduler.address] if mode == "engine" else []
        assert main(["unmerge", str(tmp_path / f"m-{mode}"), str(dora), "-o", str(tmp_path / f"u-{mode}"), "-q",
                     *extra]) == 0
    capsys.readouterr()
    merged = _outputs(tmp_path / "m-serial")
    assert merged == _outputs(tmp_path / "m-engine")
    assert len(merged) == 6 and "records" in merged  # 3 shards, index, config.json, DoRA records
    assert _outputs(tmp_path / "u-serial") == _outputs(tmp_path / "u-engine")
    # what the bytes hold: the unmerge of DoRA gives back the LoRA-only merge (within rounding)
    only_lora = tmp_path / "lora-only"
    assert main(["merge", str(base), str(lora), "-o", str(only_lora), "-q"]) == 0
    a, b = stream.open_model(only_lora), stream.open_model(tmp_path / "u-engine")
    for k in a.keys():
        x, y = a.read(k).astype(np.float64), b.read(k).astype(np.float64)
        tol = 1e-5 if dtype == np.float32 else 2e-2
        np.testing.assert_allclose(y, x, rtol=tol, atol=tol * np.max(np.abs(x)), err_msg=k)
    assert tree_digest(base, lora, dora) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["single-file", "cast-bf16", "reshard", "replaced-bias"])
def test_engine_transform_variants_write_the_serial_bytes(tmp_path, client, case):
    state = model_state(np.float32, seed=6)
    single = case == "single-file"
    base = stream.open_model(write_model(tmp_path / ("base.safetensors" if single else "base"), state,
                                         shards=1 if single else 2))
    lora, dora = _adapters(tmp_path, state)
    ads = [pm.load_adapter(lora), pm.load_adapter(dora)] if case != "replaced-bias" else [_bias_adapter(state)]
    opts = {"cast-bf16": {"dtype": np.dtype(BF16)}, "reshard": {"max_shard_size": 700}}.get(case, {})
    name = "out.safetensors" if single else "out"
    (tmp_path / "s").mkdir()
    (tmp_path / "e").mkdir()
    serial = stream.transform(base, ads, tmp_path / "s" / name, provenance=[{"adapter": "x"}], **opts)
    rep = engine.transform(base, ads, tmp_path / "e" / name, client=client, provenance=[{"adapter": "x"}], **opts)
    assert _outputs(tmp_path / "s" / name) == _outputs(tmp_path / "e" / name)
    assert (rep.tensors, rep.adapted, rep.bytes_written, rep.records) == (
        serial.tensors, serial.adapted, serial.bytes_written, serial.records)
    if case == "reshard":
        assert len(list((tmp_path / "e" / name).glob("model-*.safetensors"))) > 2
    if case == "replaced-bias":
        got = stream.open_model(tmp_path / "e" / name).read("model.layers.1.q_proj.bias")
        np.testing.assert_array_equal(got, (np.arange(16) / 7).astype(np.float32))


def test_a_failed_task_leaves_nothing(tmp_path, client):
    """A task raising (a NaN check of --safe; an injected error after another task wrote its bytes) fails the
    run with that error: no output, no records, no temporary file or folder; the inputs are untouched."""
    state = model_state(np.float32, seed=2)
    base_dir = write_model(tmp_path / "base", state, shards=3)
    base = stream.open_model(base_dir)
    before = tree_digest(base_dir)
    with pytest.raises(NonFiniteError, match="model.layers.2.v_proj"):
        engine.transform(base, [_bias_adapter(state, poison="model.layers.2.v_proj")], tmp_path / "out", client=client,
                         safe=True)
    marks = tmp_path / "marks"
    marks.mkdir()

    def failing(job, i):  # (the task is serialized: it reports through files)
        if i == len(job.units) - 1:
            for _ in range(500):  # until another task has written into the temporary output
                if any(marks.iterdir()):
                    break
                import time

                time.sleep(0.01)
            raise CheckpointError("injected failure in the last unit")
        res = stream.run_unit(job, i)
        (marks / str(i)).touch()
        return res

    with pytest.raises(CheckpointError, match="injected"):
        engine.transform(base, [_bias_adapter(state)], tmp_path / "out", client=client, task=failing)
    assert any(marks.iterdir())  # other tasks had written into the temporary output
    assert not (tmp_path / "out").exists() and not stream.records_path(tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []
    assert tree_digest(base_dir) == before
    engine.transform(base, [_bias_adapter(state)], tmp_path / "out", client=client)  # the next run works
    assert (tmp_path / "out" / stream.INDEX_NAME).is_file()


def _garbage_then(job, i, fail):
    """Write garbage over every byte unit ``i`` owns, then ``fail()``: a task cut short."""
    u = job.units[i]
    for k in u.keys:
        f, off = job.where[k]
        job.write(f, off, np.full(job.plan.ops[k].nbytes, 0xAB, dtype=np.uint8))
    fail()


def test_a_retried_task_writes_the_same_bytes(tmp_path, client):
    state = model_state(np.float32, seed=8)
    base = stream.open_model(write_model(tmp_path / "base", state, shards=2))
    lora, dora = _adapters(tmp_path, state)
    ads = [pm.load_adapter(lora), pm.load_adapter(dora)]
    stream.transform(base, ads, tmp_path / "serial")
    tried = tmp_path / "tried"
    tried.mkdir()

    def flaky(job, i):  # every unit's first try writes garbage over its bytes and fails (files: it is serialized)
        if not (tried / str(i)).exists():
            (tried / str(i)).touch()
            _garbage_then(job, i, lambda: (_ for _ in ()).throw(OSError(5, "injected I/O error")))
        return stream.run_unit(job, i)

    engine.transform(base, ads, tmp_path / "retried", client=client, task=flaky, retries=1)
    assert _outputs(tmp_path / "serial") == _outputs(tmp_path / "retried")
    assert len(list(tried.iterdir())) > 3 and _leftovers(tmp_path) == []


def die_once(job, i):
    """Kill the worker process (no cleanup, as a crash or an OOM kill) the first time unit 1 runs, after it has
    written garbage over its bytes; later runs (on another worker) do the real work."""
    flag = Path(job.files[0].path).parent.parent / "died-once"
    if i == 1 and not flag.exists():
        flag.write_text("x")
        _garbage_then(job, i, lambda: os._exit(1))
    return stream.run_unit(job, i)


def test_process_cluster_and_a_killed_worker(tmp_path):
    """Worker processes: the job and adapters are pickled (DoRA records come back); a worker killed in the
    middle of a task has it re-run elsewhere, and the output is still the serial command's, byte for byte."""
    state = model_state(np.float32, seed=9)
    base = stream.open_model(write_model(tmp_path / "base", state, shards=2))
    lora, dora = _adapters(tmp_path, state)
    ads = [pm.load_adapter(lora), pm.load_adapter(dora)]
    (tmp_path / "s").mkdir()
    (tmp_path / "p").mkdir()
    stream.transform(base, ads, tmp_path / "s" / "out")
    import dask

    # generous timeouts: two fresh interpreters importing numpy, dask and peftmath on a busy 2-core machine
    slow = {"distributed.comm.timeouts.connect": "180s", "distributed.comm.timeouts.tcp": "180s"}
    with dask.config.set(slow), engine.client(2, processes=True) as c:
        rep = engine.transform(base, ads, tmp_path / "p" / "out", client=c, task=die_once)
    assert (tmp_path / "died-once").exists() or (tmp_path / "p" / "died-once").exists()
    assert rep.records > 0
    assert _outputs(tmp_path / "s" / "out") == _outputs(tmp_path / "p" / "out")
    assert _leftovers(tmp_path / "p") == []


def test_extract_on_workers_writes_the_serial_adapter(tmp_path, client):
    state = model_state(np.float32, seed=11)
    base = write_model(tmp_path / "base", state, shards=2)
    lora, _ = _adapters(tmp_path, state)
    tuned = tmp_path / "tuned"
    stream.transform(stream.open_model(base), [pm.load_adapter(lora)], tuned)
    spectra_s, spectra_e, tot_s, tot_e = {}, {}, {}, {}
    rep_s = extract_lora(str(base), str(tuned), str(tmp_path / "x-serial"), rank=3, singular_values=spectra_s,
                         totals=tot_s)
    rep_e = engine.extract(str(base), str(tuned), str(tmp_path / "x-engine"), client=client, rank=3,
                           singular_values=spectra_e, totals=tot_e)
    assert rep_s == rep_e and tot_s == tot_e and len(rep_e) == len(TARGETS)
    assert all(np.array_equal(spectra_s[m], spectra_e[m]) for m in spectra_s)
    assert _outputs(tmp_path / "x-serial") == _outputs(tmp_path / "x-engine")
    assert 0 < tot_e["relative_error"] < 1  # rank 3 of a rank-4 delta: some of it, not all
    # the command: --workers N runs the same tasks on its own local cluster
    assert main(["extract", str(base), str(tuned), "--rank", "3", "-o", str(tmp_path / "x-cli"), "-q", "--json",
                 "--workers", "2"]) == 0
    assert _outputs(tmp_path / "x-serial") == _outputs(tmp_path / "x-cli")


def _delta_norm(ad: Adapter, module: str) -> float:
    return float(np.linalg.norm(np.asarray(ad.delta_weight(module), dtype=np.float64)))


def test_map_adapters_batches_and_keeps_the_order(tmp_path, client):
    state = model_state(np.float32, seed=12)
    many = []
    for s in range(7):
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[:1], init_lora_weights=False)
        w = state[f"{TARGETS[0]}.weight"]
        p, _ = LoraModule.initialize(TARGETS[0], cfg, Layer.of(w.shape), weight=w, seed=s)
        many.append(Adapter(cfg, {TARGETS[0]: p}))
    got = engine.map_adapters(_delta_norm, many, client=client, batch=3, module=TARGETS[0])
    assert got == [_delta_norm(a, TARGETS[0]) for a in many]
    assert len(set(got)) == len(got)  # seven different adapters, seven results, in order
    with pytest.raises(pm.errors.ConfigError, match="batch"):
        engine.map_adapters(_delta_norm, many, client=client, batch=0)


def _demo_modules(peft_types):
    """(label, bound module, base weight) of every Linear / Embedding module of the demo examples."""
    from peftmath import demo
    from peftmath.methods import describe_method

    state = demo.build_model()
    for pt in peft_types:
        method = describe_method(pt)
        for label, fields in method.examples.items():
            ad, new = demo._build_adapter(method, label, dict(fields), state, 7)
            st = {**state, **new}
            for m in ad.modules:
                if demo.LAYER_KINDS[m] == "Linear" or (demo.LAYER_KINDS[m] == "Embedding" and pt == "LORA"):
                    w = st[f"{m}.weight"]
                    yield f"{label}:{m}", ad.module(m, weight_shape=w.shape, kind=demo.LAYER_KINDS[m]), w


ROW_LOCAL_CASES = list(_demo_modules(sorted(rows.ROW_LOCAL)))


@pytest.mark.parametrize("label,mod,w", ROW_LOCAL_CASES, ids=[c[0] for c in ROW_LOCAL_CASES])
def test_blockwise_merge_equals_the_numpy_merge(label, mod, w, client):
    """Blocks of 7 rows (uneven, the last one short; LoKr: rounded to whole rows of w1) on a Fortran-ordered
    weight, a read-only array and a dask array chunked on both axes: the additive methods give the NumPy
    merge's bits, the rotations agree to a few float32 ulps; unmerge returns the weight; the caller's array
    is never written."""
    if label.startswith("DoRA") and "embed" in label:
        with pytest.raises(UnsupportedError, match="DoRA on an Embedding"):
            engine.blockwise_merge(w, mod, block_rows=7)
        return
    if "lora_diag" in mod.params:  # KaSA drops the r smallest singular components of the whole W: no row stands alone
        with pytest.raises(UnsupportedError, match=r"\['lora_diag'\] are not described as row-local"):
            engine.blockwise_merge(w, mod, block_rows=7)
        return
    ref = np.asarray(mod.merge(w.copy(), None, copy=True).weight)
    rotation = mod.peft_type in ("OFT", "BOFT")
    for src in (np.asfortranarray(w), _read_only(w), da.from_array(w, chunks=(5, 6))):
        keep = np.array(src)
        got = engine.blockwise_merge(src, mod, block_rows=7).compute()
        assert got.dtype == w.dtype and got.shape == w.shape
        if rotation:
            np.testing.assert_allclose(got, ref, rtol=0, atol=16 * np.finfo(np.float32).eps * np.max(np.abs(ref)))
        else:
            np.testing.assert_array_equal(got, ref, err_msg=label)
        assert np.array_equal(np.array(src), keep)
    if not mod.needs_record():
        back = engine.blockwise_merge(ref, mod, block_rows=7, unmerge=True).compute()
        np.testing.assert_allclose(back, w, rtol=0, atol=1e-5 * (1 + np.max(np.abs(w))))


def _read_only(w):
    v = w.copy()
    v.setflags(write=False)
    return v


@pytest.mark.parametrize("peft_type,reason", [("FOURIERFT", "inverse DFT"), ("ROAD", "pairs of output features")])
def test_blockwise_merge_refuses_methods_whose_rows_depend_on_other_rows(peft_type, reason):
    label, mod, w = next(c for c in _demo_modules([peft_type]) if "fc_in" in c[0])
    with pytest.raises(UnsupportedError, match=reason) as info:
        engine.blockwise_merge(w, mod, block_rows=4)
    assert peft_type in str(info.value) and "fc_in" in str(info.value)
    assert peft_type in rows.NOT_ROW_LOCAL and peft_type not in rows.ROW_LOCAL


PEAK_SCRIPT = r"""
import json, os, sys, tracemalloc
import numpy as np, dask, dask.array as da
from peftmath.engines import rows
from peftmath.engines.dask import blockwise_merge
from peftmath.layers import Layer
from peftmath.methods.lora import LoraConfig, LoraModule
d, threads, n, cols, block = sys.argv[1], int(sys.argv[2]), 4096, 512, 256
W = np.lib.format.open_memmap(os.path.join(d, "w.npy"), mode="w+", dtype=np.float32, shape=(n, cols))
W[:] = np.random.default_rng(0).standard_normal((n, cols), dtype=np.float32)
W.flush(); del W
W = np.load(os.path.join(d, "w.npy"), mmap_mode="r")
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["m"], init_lora_weights=False)
p, _ = LoraModule.initialize("m", cfg, Layer.of((n, cols)), weight=np.array(W[:2]), seed=1)
mod = LoraModule("m", cfg, p, Layer.of((n, cols)))
out = np.lib.format.open_memmap(os.path.join(d, "o.npy"), mode="w+", dtype=np.float32, shape=(n, cols))
with dask.config.set(scheduler="threads", num_workers=threads):
    rows.merge_rows(mod, W[:block], 0)  # warm-up: the imports of the kernel and of dask's store
    da.store(da.from_array(np.zeros((2 * block, cols), np.float32), chunks=(block, -1)).map_blocks(np.array),
             out[:2 * block], lock=False)
    tracemalloc.start()
    da.store(blockwise_merge(W, mod, block_rows=block), out, lock=False)  # building the graph included
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
out.flush()
ref = mod.merge(np.array(W), copy=True).weight
print(json.dumps({"peak_blocks": peak / (block * cols * 4), "equal": bool(np.array_equal(np.asarray(out), ref))}))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_peak_memory_is_about_one_block_per_thread(tmp_path, threads):
    """A 8 MiB memory-mapped weight merged in 512 KiB blocks into another memory map (``da.store``): the
    traced peak (tracemalloc, in a fresh interpreter) stays within ``threads + 1`` blocks, and the stored
    result is the NumPy merge's bits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(threads)], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["equal"]
    assert got["peak_blocks"] <= threads + 1, got


def test_the_serial_command_never_imports_the_engine(tmp_path):
    """`peftmath merge` without --workers / --scheduler (and --help) imports neither peftmath.engines nor dask."""
    state = model_state(np.float32, seed=1)
    base = write_model(tmp_path / "base.safetensors", state)
    make_lora(tmp_path / "lora", state, TARGETS[:2])
    code = (f"import sys, contextlib, io\nfrom peftmath.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    main(['merge', '--help'])\n"
            f"assert main(['merge', {str(base)!r}, {str(tmp_path / 'lora')!r}, '-o', {str(tmp_path / 'o.safetensors')!r},"
            f" '-q']) == 0\n"
            f"print(sorted(m for m in sys.modules if m.startswith(('peftmath.engines', 'distributed', 'dask'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "o.safetensors").is_file()


def test_a_large_adapter_travels_in_the_graph_without_a_warning(tmp_path, client):
    """The job (plan and adapters) is a task argument on purpose (a dead worker's copy is rebuilt), so
    distributed's "Sending large graph" advice is silenced for it; the output is still the serial merge's."""
    import warnings

    from peftmath.io.safetensors import save_file

    rng = np.random.default_rng(5)
    state = {"lin.weight": rng.standard_normal((1024, 1024)).astype(np.float32)}
    (tmp_path / "base").mkdir()
    save_file(state, tmp_path / "base" / "model.safetensors")
    r = 1400  # factors of 2 x 1400 x 1024 float32 = 11 MiB: over distributed's 10 MB warning threshold
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["lin"])
    ad = Adapter(cfg, {"lin": {"lora_A.weight": rng.standard_normal((r, 1024)).astype(np.float32) * 0.01,
                               "lora_B.weight": rng.standard_normal((1024, r)).astype(np.float32) * 0.01}})
    base = stream.open_model(tmp_path / "base")
    stream.transform(base, [ad], tmp_path / "serial")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.transform(base, [ad], tmp_path / "engine", client=client)
    assert [str(w.message) for w in caught if "large graph" in str(w.message)] == []
    assert _outputs(tmp_path / "serial") == _outputs(tmp_path / "engine")
