#!/usr/bin/env python
"""(IA)³ and VeRA merge / unmerge: peftmath vs the hardware floor vs Hugging Face PEFT, in one run.

One ``Linear(4096, 4096)`` float32 weight (with bias), measured side by side in one process::

    python benchmarks/bench_ia3_vera.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_ia3_vera.py --quick    # smoke run: fewer repeats

What is timed (median of the repeats, after a warm-up round; contestants run round-robin):

* IA3 (output scaling ``(out, 1)``, and input scaling ``(1, in)``): ``ia3.merge`` / ``ia3.unmerge`` with
  ``copy=False`` (``W *= l`` in place) and ``copy=True``; the floor ``np.multiply(W, l, out=W)``; PEFT's
  ``merge_adapter()`` / ``unmerge_adapter()`` on a one-Linear model with the same W, b and l;
* VeRA, r = 256: ``vera.merge`` / ``vera.unmerge`` with ``copy=False`` (one BLAS gemm with beta=1 on the
  scaled factors) and ``copy=True``; the floor ``sgemm(1, A.T, B.T, beta=1, c=W.T)`` on pre-scaled
  factors; PEFT's ``merge_adapter()`` / ``unmerge_adapter()``;
* the peak extra allocation of the in-place paths (``tracemalloc``).

The results go to ``benchmarks/RESULTS.md``, section "ia3_vera" (``--no-write`` to skip).
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

THREADS = 2
THREAD_NOTE = _results.limit_threads(THREADS)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

from peftmath.methods import ia3, vera  # noqa: E402
from _results import one_linear, paired_ratio, peak_alloc, race  # noqa: E402

OUT = IN = 4096
R = 256


def build_peft_ia3(W0, b0, l, *, feedforward: bool):
    import torch
    from peft import IA3Config, get_peft_model

    cfg = IA3Config(target_modules=["lin"], feedforward_modules=["lin"] if feedforward else [], init_ia3_weights=False)
    model = get_peft_model(one_linear(IN, OUT, bias=True), cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W0))
        layer.base_layer.bias.copy_(torch.from_numpy(b0))
        layer.ia3_l["default"].copy_(torch.from_numpy(l))
    model.eval()
    return model, layer


def build_peft_vera(W0, b0):
    import torch
    from peft import VeraConfig, get_peft_model

    model = get_peft_model(one_linear(IN, OUT, bias=True), VeraConfig(r=R, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W0))
        layer.base_layer.bias.copy_(torch.from_numpy(b0))
    model.eval()
    return model, layer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repeats")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not write RESULTS.md")
    ap.add_argument("--section", default="ia3_vera", help="RESULTS.md section to write (default: ia3_vera)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # PEFT warns "Unmerge result can be inaccurate" on every IA3 unmerge

    import torch

    from _results import machine_line

    torch.set_num_threads(THREADS)
    reps = 3 if args.quick else 15
    load_before = os.getloadavg()[0]

    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((OUT, IN), dtype=np.float32) / np.float32(64)
    b0 = rng.standard_normal(OUT, dtype=np.float32) / np.float32(8)
    l_out = (rng.uniform(0.25, 4.0, (OUT, 1)) * rng.choice([-1.0, 1.0], (OUT, 1))).astype(np.float32)
    l_in = (rng.uniform(0.25, 4.0, (1, IN)) * rng.choice([-1.0, 1.0], (1, IN))).astype(np.float32)
    W = W0.copy()
    reset = lambda: np.copyto(W, W0)  # noqa: E731

    with torch.no_grad():
        ia_model, ia_layer = build_peft_ia3(W0, b0, l_out, feedforward=False)
        ff_model, ff_layer = build_peft_ia3(W0, b0, l_in, feedforward=True)
        ve_model, ve_layer = build_peft_vera(W0, b0)
        vA = ve_model.base_model.vera_A["default"].numpy().copy()
        vB = ve_model.base_model.vera_B["default"].numpy().copy()
        lb = ve_layer.vera_lambda_b["default"].numpy().copy()
        ld = ve_layer.vera_lambda_d["default"].numpy().copy()
        Bs = np.ascontiguousarray(lb[:, None] * vB[:OUT])
        As = np.ascontiguousarray(ld[:, None] * vA[:, :IN])

        # --- correctness vs PEFT (untimed) ----------------------------------------------------------
        errs = {}
        for tag, model, layer, fn in (
            ("ia3", ia_model, ia_layer, lambda: ia3.merge(W0, l_out, bias=b0)[0]),
            ("ia3_ff", ff_model, ff_layer, lambda: ia3.merge(W0, l_in, bias=b0)[0]),
            ("vera", ve_model, ve_layer, lambda: vera.merge(W0, lb, ld, vA, vB)),
        ):
            model.base_model.merge_adapter()
            errs[tag] = float(np.max(np.abs(layer.base_layer.weight.numpy().astype(np.float64) - fn())))
            model.base_model.unmerge_adapter()
        reset()
        ia3.merge(W, l_out, copy=False)
        ia3.unmerge(W, l_out, copy=False)
        errs["ia3_roundtrip"] = float(np.max(np.abs(W - W0) / np.maximum(np.abs(W0), 1e-30)))
        reset()
        vera.merge(W, lb, ld, vA, vB, copy=False)
        vera.unmerge(W, lb, ld, vA, vB, copy=False)
        errs["vera_roundtrip"] = float(np.max(np.abs(W - W0)))

        peaks = {
            "ia3_merge": peak_alloc(lambda: ia3.merge(W, l_out, copy=False), reset),
            "ia3_unmerge": peak_alloc(lambda: ia3.unmerge(W, l_out, copy=False), reset),
            "ia3_ff_merge": peak_alloc(lambda: ia3.merge(W, l_in, copy=False), reset),
            "vera_merge": peak_alloc(lambda: vera.merge(W, lb, ld, vA, vB, copy=False), reset),
            "vera_unmerge": peak_alloc(lambda: vera.unmerge(W, lb, ld, vA, vB, copy=False), reset),
        }

        def peft_pair(model, layer):
            bm = model.base_model
            return ((bm.merge_adapter, lambda: layer.merged and bm.unmerge_adapter()),
                    (bm.unmerge_adapter, lambda: layer.merged or bm.merge_adapter()))

        ia_m, ia_u = peft_pair(ia_model, ia_layer)
        ff_m, ff_u = peft_pair(ff_model, ff_layer)
        ve_m, ve_u = peft_pair(ve_model, ve_layer)
        ia_times, ia_rounds = race({
            "floor": (lambda: np.multiply(W, l_out, out=W), reset),
            "merge": (lambda: ia3.merge(W, l_out, copy=False), reset),
            "unmerge": (lambda: ia3.unmerge(W, l_out, copy=False), reset),
            "merge_copy": (lambda: ia3.merge(W0, l_out, bias=b0), None),
            "ff_merge": (lambda: ia3.merge(W, l_in, copy=False), reset),
            "ff_unmerge": (lambda: ia3.unmerge(W, l_in, copy=False), reset),
            "peft_merge": ia_m,
            "peft_unmerge": ia_u,
            "peft_ff_merge": ff_m,
            "peft_ff_unmerge": ff_u,
        }, repeats=reps)
        ve_times, ve_rounds = race({
            "floor": (lambda: blas.sgemm(1.0, As.T, Bs.T, beta=1.0, c=W.T, overwrite_c=True), reset),
            "merge": (lambda: vera.merge(W, lb, ld, vA, vB, copy=False), reset),
            "unmerge": (lambda: vera.unmerge(W, lb, ld, vA, vB, copy=False), reset),
            "merge_copy": (lambda: vera.merge(W0, lb, ld, vA, vB), None),
            "peft_merge": ve_m,
            "peft_unmerge": ve_u,
        }, repeats=reps)
    load_after = os.getloadavg()[0]

    def row(label, times, rounds, ours, peft, floor="floor"):
        sp = paired_ratio(rounds, peft, ours)
        return (f"| {label} | {times[ours]:.1f} | {times[peft]:.1f} | **{sp:.1f}x** "
                f"| {paired_ratio(rounds, ours, floor):.2f} |"), sp

    rows = []
    speedups = {}
    for label, times, rounds, ours, peft in (
        ("IA3 merge, (out, 1), in place", ia_times, ia_rounds, "merge", "peft_merge"),
        ("IA3 unmerge, (out, 1), in place", ia_times, ia_rounds, "unmerge", "peft_unmerge"),
        ("IA3 merge, (1, in) feedforward, in place", ia_times, ia_rounds, "ff_merge", "peft_ff_merge"),
        ("IA3 unmerge, (1, in) feedforward, in place", ia_times, ia_rounds, "ff_unmerge", "peft_ff_unmerge"),
        ("IA3 merge, copy=True (new W and b)", ia_times, ia_rounds, "merge_copy", "peft_merge"),
        (f"VeRA r={R} merge, in place", ve_times, ve_rounds, "merge", "peft_merge"),
        (f"VeRA r={R} unmerge, in place", ve_times, ve_rounds, "unmerge", "peft_unmerge"),
        (f"VeRA r={R} merge, copy=True", ve_times, ve_rounds, "merge_copy", "peft_merge"),
    ):
        text, sp = row(label, times, rounds, ours, peft)
        rows.append(text)
        speedups[label] = sp
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    target_rows = [k for k in speedups if "copy=True" not in k]
    misses = [k for k in target_rows if speedups[k] < 2.0]
    body = "\n".join([
        "## (IA)³ and VeRA merge / unmerge (`benchmarks/bench_ia3_vera.py`)",
        "",
        f"Machine: {machine_line()}. {THREAD_NOTE}. Load average {load_before:.2f} before, {load_after:.2f} after.",
        f"`Linear({IN}, {OUT})` float32 with bias; IA3 |l| in [0.25, 4] with random signs; VeRA r = {R}, "
        f"projections from PEFT. Median of {reps} round-robin rounds; ratios are medians of per-round ratios.",
        "",
        "| operation | peftmath ms | PEFT ms | speed-up vs PEFT | time / floor |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Floors: IA3 `np.multiply(W, l, out=W)` {ia_times['floor']:.1f} ms; VeRA `sgemm(beta=1)` on pre-scaled "
        f"factors {ve_times['floor']:.1f} ms.",
        f"Peak extra allocation (tracemalloc), W is {mib(W0.nbytes)}: IA3 merge {mib(peaks['ia3_merge'])}, "
        f"unmerge {mib(peaks['ia3_unmerge'])}, feedforward merge {mib(peaks['ia3_ff_merge'])}; "
        f"VeRA merge {mib(peaks['vera_merge'])}, unmerge {mib(peaks['vera_unmerge'])} "
        f"(the two scaled factors, 2·r·4096·4 B = {mib(2 * R * IN * 4)}).",
        f"Max |peftmath − PEFT| of the merged weight: IA3 {errs['ia3']:.1e}, IA3 feedforward {errs['ia3_ff']:.1e}, "
        f"VeRA {errs['vera']:.1e}. Round trip: IA3 max relative {errs['ia3_roundtrip']:.1e}, "
        f"VeRA max abs {errs['vera_roundtrip']:.1e}.",
        "",
        ("Target (>= 2x faster than PEFT for every in-place merge and unmerge): "
         + ("met." if not misses else f"**missed** for {', '.join(misses)}.")),
        *([""] + [
            "Why VeRA cannot reach 2x here: its merge is one rank-r product, out·in·r multiply-adds, and peftmath's "
            "in-place merge already runs at the floor (time / floor ≈ 1), a single BLAS gemm with beta=1 on factors "
            "scaled in O(r·(in + out)). PEFT runs the same product (torch's gemm) into a 64 MiB temporary and adds "
            "it; what peftmath saves is that temporary and the add, not the arithmetic. Going further would need a "
            "faster gemm than the floor's, not a different algorithm."
        ] if any("VeRA" in m for m in misses) else []),
    ])
    print(body)
    if not args.no_write:
        _results.write_section(args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
