#!/usr/bin/env python
"""peftmath.engines.dask against the serial command, and the blockwise merge of one large tensor::

    python benchmarks/bench_engines.py [--quick] [--no-write]

1. A sharded Llama-shaped float32 model (LoRA r=16 on every linear layer): the serial streamed merge
   (``io.stream.transform``, pipelined) against the same units as ``dask.distributed`` tasks on a LocalCluster
   of 2 worker threads (the cluster started once, outside the timings; its start-up time is reported); and the
   extraction of a rank-8 LoRA from the merged model, serial against one task per tensor. Outputs are checked
   byte-identical.
2. One 8192 x 8192 float32 weight (256 MiB, a memory-mapped ``.npy``) merged with LoRA r=16 into another memory
   map: NumPy (read it whole, the in-place merge, write it), the blockwise merge
   (``engines.dask.blockwise_merge``, 32 MiB row blocks, the in-place kernel per block, ``da.store``) and the
   generic dask path (``lora`` merge on the dask array: ``W + s·B@A`` as dask operations, same chunks), on dask's
   threaded scheduler with 2 threads (both dask paths read the memory map by row blocks,
   ``engines.dask.row_blocks``); times and ``tracemalloc`` peaks (measured in a separate run).

2 threads everywhere, contestants round-robin (median of per-round ratios). Section "engines" of RESULTS.md;
scratch files under ``benchmarks/_out/engines`` (about 1.2 GB; 0.5 GB with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import limit_threads, machine_line, paired_ratio, peak_alloc, race, write_section  # noqa: E402

THREADS = limit_threads(2)

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out" / "engines"


def _model(folder: Path, layers: int, hidden: int, inter: int, seed: int = 0) -> dict:
    """A Llama-shaped float32 model in shards of about 4 layers (with an index), and its state's shapes."""
    from peftmath.io.safetensors import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (4096, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.{n}.weight": (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        shapes.update({f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                       f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,)})
    shapes["lm_head.weight"] = (4096, hidden)
    keys = list(shapes)
    per = max(1, len(keys) // max(1, layers // 4))
    weight_map = {}
    for s, start in enumerate(range(0, len(keys), per)):
        name = f"model-{s + 1:05d}.safetensors"
        part = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02) for k in keys[start:start + per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    import json

    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return shapes


def _lora(shapes: dict, r: int = 16):
    from peftmath.adapter import Adapter
    from peftmath.methods.lora import LoraConfig

    rng = np.random.default_rng(1)
    targets = sorted({k[: -len(".weight")] for k in shapes if "proj" in k})
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    params = {m: {"lora_A.weight": rng.standard_normal((r, shapes[f"{m}.weight"][1]), dtype=np.float32) * 0.01,
                  "lora_B.weight": rng.standard_normal((shapes[f"{m}.weight"][0], r), dtype=np.float32) * 0.01}
              for m in targets}
    return Adapter(cfg, params)


def _digest(folder: Path) -> dict:
    import hashlib

    return {q.name: hashlib.sha256(q.read_bytes()).hexdigest() for q in sorted(folder.iterdir())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, 2 rounds")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    import dask
    import dask.array as da

    from peftmath.engines import dask as engine
    from peftmath.extract import extract_lora
    from peftmath.io import stream
    from peftmath.layers import Layer
    from peftmath.methods.lora import LoraModule

    repeats, warmup = (2, 0) if args.quick else (4, 1)
    layers, hidden, inter = (8, 512, 1408) if args.quick else (16, 768, 2048)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    load_before = os.getloadavg()[0]
    shapes = _model(OUT / "base", layers, hidden, inter)
    ad = _lora(shapes)
    base = stream.open_model(OUT / "base")
    model_mb = sum(f.path.stat().st_size for f in base.files.values()) / 2**20
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"model written ({model_mb:.0f} MiB)")

    t0 = time.perf_counter()
    cm = engine.client(2)
    c = cm.__enter__()
    start_s = time.perf_counter() - t0
    try:
        def clear(*names):
            def run():
                for n in names:
                    p = OUT / n
                    if p.exists():
                        shutil.rmtree(p)
            return run

        merge = {"serial merge": (lambda: stream.transform(base, [ad], OUT / "m-serial"), clear("m-serial")),
                 "engine merge (2 workers)": (lambda: engine.transform(base, [ad], OUT / "m-engine", client=c),
                                              clear("m-engine"))}
        med_m, rounds_m = race(merge, repeats=repeats, warmup=warmup)
        same_merge = _digest(OUT / "m-serial") == _digest(OUT / "m-engine")
        log("merges timed")
        tuned = str(OUT / "m-serial")
        ext = {"serial extract": (lambda: extract_lora(str(OUT / "base"), tuned, str(OUT / "x-serial"), rank=8),
                                  clear("x-serial")),
               "engine extract (2 workers)": (lambda: engine.extract(str(OUT / "base"), tuned, str(OUT / "x-engine"),
                                                                     client=c, rank=8), clear("x-engine"))}
        med_x, rounds_x = race(ext, repeats=repeats, warmup=warmup)
        same_extract = _digest(OUT / "x-serial") == _digest(OUT / "x-engine")
        log("extractions timed")
    finally:
        cm.__exit__(None, None, None)

    # --- one large tensor ---------------------------------------------------------------------------
    n, r, block = 8192, 16, 1024
    rng = np.random.default_rng(2)
    W = np.lib.format.open_memmap(OUT / "w.npy", mode="w+", dtype=np.float32, shape=(n, n))
    for i in range(0, n, block):
        W[i:i + block] = rng.standard_normal((block, n), dtype=np.float32) * 0.02
    W.flush()
    del W
    W = np.load(OUT / "w.npy", mmap_mode="r")
    from peftmath.methods.lora import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["w"], init_lora_weights=False)
    params = {"lora_A.weight": rng.standard_normal((r, n), dtype=np.float32) * 0.01,
              "lora_B.weight": rng.standard_normal((n, r), dtype=np.float32) * 0.01}
    mod = LoraModule("w", cfg, params, Layer.of((n, n)))
    out = np.lib.format.open_memmap(OUT / "o.npy", mode="w+", dtype=np.float32, shape=(n, n))

    def numpy_merge():
        w = np.array(W)
        mod.merge(w, copy=False)
        out[:] = w
        out.flush()

    def blockwise():
        with dask.config.set(scheduler="threads", num_workers=2):
            da.store(engine.blockwise_merge(W, mod, block_rows=block), out, lock=False)
        out.flush()

    lazy_mod = LoraModule("w", cfg, {k: da.from_array(v) for k, v in params.items()}, Layer.of((n, n)))

    def generic():
        with dask.config.set(scheduler="threads", num_workers=2):
            da.store(lazy_mod.merge(engine.row_blocks(W, block), copy=True).weight, out, lock=False)
        out.flush()

    big = {"NumPy (whole tensor, in place)": (numpy_merge, None), "blockwise (rows, in-place kernel)": (blockwise, None),
           "generic dask (W + s·B@A)": (generic, None)}
    log("tensor written")
    med_b, rounds_b = race(big, repeats=repeats, warmup=warmup)
    blockwise()
    ref = np.array(W)
    mod.merge(ref, copy=False)
    blk_equal = bool(np.array_equal(np.asarray(out), ref))
    del ref
    log("tensor merges timed")
    peaks = {name: peak_alloc(fn) for name, (fn, _) in big.items()}
    load_after = os.getloadavg()[0]

    tensor_mb = n * n * 4 / 2**20
    lines = [f"Machine: {machine_line()}; dask {dask.__version__}, distributed "
             f"{__import__('distributed').__version__}. {THREADS}. Load average {load_before:.1f} before, "
             f"{load_after:.1f} after. {'Quick mode (--quick): a smaller model, 2 rounds.' if args.quick else ''}",
             "",
             f"### Whole model: {len(shapes)} tensors, {len(base.files)} shards, {model_mb:.0f} MiB float32, LoRA r=16 on "
             f"every projection", "",
             f"LocalCluster of 2 worker threads, started once in {start_s:.2f} s (not in the times below).", "",
             "| contender | median time | vs serial (median of per-round ratios) | output |", "|---|---|---|---|",
             f"| serial merge (`io.stream.transform`, pipelined) | {med_m['serial merge'] / 1e3:.2f} s | 1.00x | |",
             f"| engine merge (one task per unit) | {med_m['engine merge (2 workers)'] / 1e3:.2f} s | "
             f"{paired_ratio(rounds_m, 'engine merge (2 workers)', 'serial merge'):.2f}x | byte-identical: "
             f"{'yes' if same_merge else 'NO'} |",
             f"| serial extract (rank 8) | {med_x['serial extract'] / 1e3:.2f} s | 1.00x | |",
             f"| engine extract (one task per tensor) | {med_x['engine extract (2 workers)'] / 1e3:.2f} s | "
             f"{paired_ratio(rounds_x, 'engine extract (2 workers)', 'serial extract'):.2f}x | byte-identical: "
             f"{'yes' if same_extract else 'NO'} |",
             "", f"### One {n} x {n} float32 tensor ({tensor_mb:.0f} MiB), LoRA r={r}, memory map to memory map", "",
             f"Row blocks of {block} rows ({block * n * 4 / 2**20:.0f} MiB); dask's threaded scheduler, 2 threads.", "",
             "| contender | median time | vs NumPy | tracemalloc peak | peak / block |", "|---|---|---|---|---|"]
    npname = "NumPy (whole tensor, in place)"
    for name in big:
        lines.append(f"| {name} | {med_b[name] / 1e3:.2f} s | {paired_ratio(rounds_b, name, npname):.2f}x | "
                     f"{peaks[name] / 2**20:.0f} MiB | {peaks[name] / (block * n * 4):.1f} |")
    lines += ["", f"The blockwise result equals the NumPy merge bit for bit: {'yes' if blk_equal else 'NO'}. The "
              "blockwise merge keeps about one block per thread (plus the one being stored); the NumPy merge holds "
              "the whole tensor; the generic path holds the delta's blocks beside the sums."]
    if max(load_before, load_after) > (os.cpu_count() or 1):
        lines += ["", f"**The machine was busy** (load average above its {os.cpu_count()} cores): re-run on an idle "
                  "machine; the peaks do not depend on the load."]
    body = "\n".join(lines)
    print(body)
    shutil.rmtree(OUT, ignore_errors=True)
    if not args.no_write:
        write_section("engines", body)


if __name__ == "__main__":
    main()
