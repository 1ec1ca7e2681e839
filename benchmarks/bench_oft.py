#!/usr/bin/env python
"""OFT and BOFT merge / unmerge on Linear(4096, 4096) float32, block size 32: peftmath vs the floor vs PEFT.

Everything is measured side by side in one process, 2 threads (``_results.limit_threads``)::

    python benchmarks/bench_oft.py            # full run (a few minutes: PEFT's dense products are slow)
    python benchmarks/bench_oft.py --quick    # smoke run (~30 s): 3 rounds, no PEFT, no exact-Cayley row

What is timed, per case (OFT with the Cayley-Neumann series, OFT with the exact Cayley map, BOFT m=1 and
m=2), round-robin (one call of each contestant per round, the order rotating, after a warm-up round; ms =
median per contestant, ratio = median over rounds of the per-round ratio):

* the floor: one batched matmul of W's blocks, ``np.matmul(X, Rᵀ, out=Y)`` with ``X`` W's 32-column blocks
  stored contiguously ``(r, 4096, 32)`` and ``Y`` preallocated (the cheapest way to do the work; BOFT m=2:
  blocks of 64, the size of its composed rotation, as many flops as its two butterfly levels of 32);
* one copy of W: ``np.copyto(dst, W)`` into a preallocated ``dst``;
* ``Module.merge/unmerge(W, copy=False)`` (in place; W reset untimed before each call) and with
  ``copy=True`` (the default);
* a bfloat16 W merged in place (OFT rows), reported against the float32 floor;
* PEFT's ``layer.merge()`` / ``layer.unmerge()`` (dense n x n products; full runs only, fewer rounds).

Targets (issue 20): in place <= 1.5x the floor, ``copy=True`` <= 1.3x (copy + floor); peak extra allocation
(``tracemalloc``) of the in-place merge a small fraction of W. Writes the "oft" section of RESULTS.md
(``--no-write`` prints it only).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

# --threads N (default 2, the project's convention) is read before NumPy loads its BLAS
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv[:-1] else 2
THREAD_NOTE = _results.limit_threads(THREADS)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from _results import machine_line, paired_ratio, peak_alloc, race, write_section  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import boft, oft  # noqa: E402

N = 4096
BLOCK = 32


def _peft_layer(kind, config, W0, params):
    import peft
    import torch
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Linear(N, N, bias=False))
        pmodel = peft.get_peft_model(model, config)
    lay = pmodel.base_model.model[0]
    with torch.no_grad():
        lay.base_layer.weight.copy_(torch.from_numpy(W0))
        if kind == "oft":
            lay.oft_R["default"].weight.copy_(torch.from_numpy(params["oft_R.weight"]))
        else:
            lay.boft_R["default"].copy_(torch.from_numpy(params["boft_R"]))
            lay.boft_s["default"].copy_(torch.from_numpy(params["boft_s"]))
    return lay


def _case(label, kind, rng, *, m=1, cayley_neumann=True):
    """(module, params, peft config or None) for one case on a Linear(N, N)."""
    r = N // BLOCK
    if kind == "oft":
        cfg = oft.OFTConfig(oft_block_size=BLOCK, use_cayley_neumann=cayley_neumann)
        params = {"oft_R.weight": rng.normal(0.0, 0.01, (r, BLOCK * (BLOCK - 1) // 2)).astype(np.float32)}
        mod = oft.OFTModule("0", cfg, params, Layer.of((N, N)))
    else:
        cfg = boft.BOFTConfig(boft_block_size=BLOCK, boft_n_butterfly_factor=m)
        params = {"boft_R": rng.normal(0.0, 0.01, (m, r, BLOCK, BLOCK)).astype(np.float32),
                  "boft_s": rng.normal(1.0, 0.05, (N, 1)).astype(np.float32)}
        mod = boft.BOFTModule("0", cfg, params, Layer.of((N, N)))
    pcfg = None
    if m == 1:
        import peft

        pcfg = (peft.OFTConfig(target_modules=["0"], oft_block_size=BLOCK, use_cayley_neumann=cayley_neumann)
                if kind == "oft" else peft.BOFTConfig(target_modules=["0"], boft_block_size=BLOCK))
    return mod, params, pcfg


def settled(contestants: dict, seconds: float) -> dict:
    """The contestants with ``seconds`` of idle time added to each untimed setup (before a reset, if any).

    OpenBLAS's worker threads spin for about 0.1 s after a multithreaded call (the floor's) before they
    sleep: on a 2-core machine the spinning worker takes a core from whatever runs next (measured: the
    row-tile merge right after the floor used 7 ms more CPU time than after a pause). A merge in a model
    runs after other merges, not after a threaded BLAS call, so every contestant starts on a settled
    machine (the floor too: waking its workers is part of its time)."""
    import time

    if seconds <= 0:
        return contestants

    def pause(setup):
        def run():
            time.sleep(seconds)
            if setup is not None:
                setup()
        return run

    return {name: (fn, pause(setup)) for name, (fn, setup) in contestants.items()}


def run(args) -> str:
    import torch

    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    W0 = (rng.standard_normal((N, N)) / 64).astype(np.float32)
    W = W0.copy()
    dst = np.empty_like(W0)
    Wb0 = W0.astype(ml_dtypes.bfloat16)
    Wb = Wb0.copy()
    r = N // BLOCK
    # the floor's operands, per block size: W's blocks stored contiguously (k, N, b), the transposed rotation
    # blocks (k, b, b), a preallocated output of the same layout
    floors = {}
    for b in (BLOCK, 2 * BLOCK):
        k = N // b
        X = np.ascontiguousarray(W0.reshape(N, k, b).transpose(1, 0, 2))
        q = rng.normal(0, 0.01, (k, b * (b - 1) // 2)).astype(np.float32)
        RT = np.ascontiguousarray(np.swapaxes(oft.rotation_blocks(q, block_size=b), 1, 2))
        floors[b] = (X, RT, np.empty_like(X))
    load_before = os.getloadavg()[0]

    def reset():
        np.copyto(W, W0)

    cases = [("OFT (Cayley-Neumann, default)", "oft", {}),
             ("OFT (exact Cayley)", "oft", {"cayley_neumann": False}),
             ("BOFT (m=1)", "boft", {}),
             ("BOFT (m=2, composed blocks of 64)", "boft", {"m": 2})]
    if args.quick:
        cases = [c for c in cases if "exact" not in c[0]]
    rows, mem_rows, peft_rows = [], [], []
    for label, kind, kw in cases:
        print(f"[bench_oft] {label} ...", file=sys.stderr, flush=True)
        mod, params, pcfg = _case(label, kind, rng, **kw)
        # the floor: one batched matmul of W's blocks, of the size the merge multiplies by (BOFT m=2: its two
        # butterfly levels composed into blocks of 64, the flops of the two levels of 32)
        X, RT, Y = floors[BLOCK * 2 ** (kw.get("m", 1) - 1)]
        contestants = {
            "floor": (lambda X=X, RT=RT, Y=Y: np.matmul(X, RT, out=Y), None),
            "copy": (lambda: np.copyto(dst, W0), None),
            "merge": (lambda: mod.merge(W, copy=False), reset),
            "unmerge": (lambda: mod.unmerge(W, copy=False), reset),
            "merge_copy": (lambda: mod.merge(W0), None),
            "unmerge_copy": (lambda: mod.unmerge(W0), None),
        }
        if label.startswith("OFT (Cayley"):
            contestants["bf16_merge"] = (lambda: mod.merge(Wb, copy=False), lambda: np.copyto(Wb, Wb0))
        med, rounds = race(settled(contestants, args.settle), repeats=args.repeats)

        def ratio(num, *den):
            import statistics

            return statistics.median(rd[num] / sum(rd[d] for d in den) for rd in rounds)

        def add(what, name, ref_label, den, target):
            value = ratio(name, *den)
            ok = "reported" if target is None else ("met" if value <= target else "**missed**")
            ref_ms = sum(med[d] for d in den)
            rows.append(f"| {label} | {what} | {med[name]:.1f} | {ref_label} | {ref_ms:.1f} | {value:.2f}x | "
                        f"{'-' if target is None else f'<= {target}x'} | {ok} |")

        fl = "floor" if X.shape[-1] == BLOCK else f"floor (blocks of {X.shape[-1]})"
        add("merge, in place", "merge", fl, ("floor",), 1.5)
        add("unmerge, in place", "unmerge", fl, ("floor",), 1.5)
        add("merge, copy=True", "merge_copy", f"copy + {fl}", ("copy", "floor"), 1.3)
        add("unmerge, copy=True", "unmerge_copy", f"copy + {fl}", ("copy", "floor"), 1.3)
        if "bf16_merge" in med:
            add("merge, bfloat16 W, in place", "bf16_merge", "float32 floor", ("floor",), None)

        # correctness (untimed): the in-place result against float64, the round trip
        reset()
        mod.merge(W, copy=False)
        merged = W.copy()
        mod.unmerge(W, copy=False)
        rt = float(np.abs(W - W0).max())
        reset()
        mib = lambda b: f"{b / 2**20:.2f} MiB ({100 * b / W0.nbytes:.1f}% of W)"  # noqa: E731
        p_in = peak_alloc(lambda: mod.merge(W, copy=False), setup=reset)
        p_un = peak_alloc(lambda: mod.unmerge(W, copy=False), setup=reset)
        p_cp = peak_alloc(lambda: mod.merge(W0))
        mem_rows.append(f"| {label} | {mib(p_in)} | {mib(p_un)} | {mib(p_cp)} | {rt:.1e} |")

        if pcfg is not None and not args.quick and not args.no_peft:
            lay = _peft_layer(kind, pcfg, W0, params)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pc = {
                    "peft_merge": (lay.merge, lambda: lay.merged and lay.unmerge()),
                    "peft_unmerge": (lay.unmerge, lambda: (not lay.merged) and lay.merge()),
                    "merge": (lambda: mod.merge(W, copy=False), reset),
                    "merge_copy": (lambda: mod.merge(W0), None),
                    "unmerge": (lambda: mod.unmerge(W, copy=False), reset),
                }
                pmed, prounds = race(pc, repeats=args.peft_repeats)
                if lay.merged:
                    lay.unmerge()
                lay.merge()
                err = float(np.abs(lay.base_layer.weight.detach().numpy() - merged).max())
            peft_rows.append(
                f"| {label} | {pmed['peft_merge']:.0f} | {pmed['merge']:.1f} / {pmed['merge_copy']:.1f} | "
                f"{paired_ratio(prounds, 'peft_merge', 'merge'):.0f}x / {paired_ratio(prounds, 'peft_merge', 'merge_copy'):.0f}x | "
                f"{pmed['peft_unmerge']:.0f} | {pmed['unmerge']:.1f} | {paired_ratio(prounds, 'peft_unmerge', 'unmerge'):.0f}x | "
                f"{err:.1e} |")
            del lay

    lines = [
        "## oft: OFT and BOFT merge / unmerge, Linear(4096, 4096) float32, block size 32 (`benchmarks/bench_oft.py`)",
        "",
        f"Round-robin, {args.repeats} rounds after a warm-up round; ms = median per contestant, ratio = median over "
        f"rounds of the per-round ratio" + (" — **--quick run**" if args.quick else "") + (
            f"; each call starts after {args.settle:g} s idle (OpenBLAS's workers spin ~0.1 s after a threaded "
            f"call and would take a core from the next contestant)" if args.settle > 0 else "") + ". Floor: one "
        f"batched "
        f"matmul of W's blocks, `np.matmul(X, Rᵀ, out=Y)` with X W's 32-column blocks stored contiguously "
        f"(r, 4096, 32) and Y preallocated (BOFT m=2: blocks of 64, (64, 4096, 64), the block size of its "
        f"composed rotation, whose flops are those of its two butterfly levels of 32); the rotation's own "
        f"preparation (Cayley-Neumann series, Cayley solve, block inverse to unmerge) is timed in the merge, not "
        f"in the floor. copy: `np.copyto(dst, W)` into a preallocated dst. Adapter "
        f"parameters ~ N(0, 0.01²), boft_s ~ N(1, 0.05²).",
        "",
        f"Machine: {machine_line()}.  ",
        f"Threads: {THREAD_NOTE}; peftmath's row tiles run on as many threads (`oft.tile_threads()` = "
        f"{getattr(oft, 'tile_threads', lambda: 'n/a')()}). Load average (1 min) {load_before:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} cores."
        + (f" **{THREADS} thread{'s' if THREADS > 1 else ''}, not the project's 2**: a run on a busy machine, where "
           "2-thread BLAS calls (the floor's) wait for their second thread to be scheduled and the ratios "
           "measure the load; the reference run uses 2 threads on an idle machine." if THREADS != 2 else ""),
        "",
        "| case | operation | peftmath ms | reference | reference ms | ratio | target | result |",
        "|---|---|---:|---|---:|---:|---|---|",
        *rows,
        "",
        "Peak extra allocation while the call runs (`tracemalloc`; W is 64 MiB), and the in-place round trip's "
        "max abs error:",
        "",
        "| case | merge copy=False | unmerge copy=False | merge copy=True | round trip |",
        "|---|---|---|---|---|",
        *mem_rows,
    ]
    if peft_rows:
        lines += [
            "",
            f"Against PEFT ({args.peft_repeats} round-robin rounds; PEFT builds the dense 4096 x 4096 rotation and "
            "multiplies by it, and inverts it densely for OFT's unmerge):",
            "",
            "| case | PEFT merge ms | peftmath merge ms (in place / copy=True) | speed-up | PEFT unmerge ms | "
            "peftmath unmerge ms (in place) | speed-up | max abs diff vs PEFT merge |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *peft_rows,
        ]
    lines += [
        "",
        "How: merge and unmerge work on row tiles of W (`oft.rotate_rows`): per tile, one batched matmul of its "
        "blocks into a reused buffer (`out=`), copied back while in cache (in place) or written straight into "
        "the new result (`copy=True`: W read once, the result written once; no copy of W first); a tile has as "
        "many rows as keep two tiles and the factors in 768 KiB of a core's cache, at least 8 "
        "(`oft.factor_tile_rows`: 8 rows of 16 KiB beside 512 KiB of blocks here); bfloat16 tiles are widened "
        "to float32 and rounded once; the tiles spread over the BLAS thread count (`oft.tile_threads`), and so "
        "do the batched Cayley solves and block inverses (`oft.split_stack`). "
        "BOFT's butterfly levels compose into one block-diagonal rotation (`boft.composed_blocks`) when that is "
        "not more flops than the levels (m <= 3 or blocks <= 128), else the levels run per tile.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, no PEFT, no exact-Cayley case")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 9, --quick 3)")
    ap.add_argument("--peft-repeats", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true", help="skip the (slow) PEFT comparison")
    ap.add_argument("--threads", type=int, default=2, help="BLAS / torch threads for every contestant (default 2)")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write RESULTS.md")
    ap.add_argument("--settle", type=float, default=0.25,
                    help="idle seconds before each timed call, for BLAS worker threads to stop spinning (0: none)")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    body = run(args)
    print(body)
    if not args.no_write:
        write_section("oft", body)


if __name__ == "__main__":
    main()
