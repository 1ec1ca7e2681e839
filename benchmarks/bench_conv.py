#!/usr/bin/env python
"""Convolutions: peftmath's ``conv`` on torch tensors (torch's own ``F.conv2d`` behind it) against the
portable reference on the same tensors and against ``F.conv2d`` called directly; and on NumPy arrays
(shifted-window gemms) against the portable reference, with ``tracemalloc`` peaks::

    python benchmarks/bench_conv.py [--quick] [--no-write]

One ``Conv2d(64, 64, 3, padding=1)`` on a batch ``(8, 64, 56, 56)`` float32, 2 threads, all contestants
round-robin in one process (median of per-round ratios). The reference is ``peftmath._array.reference_conv``
(one matmul per kernel offset) and, for the before/after comparison, the im2col reference peftmath used
before (a ``prod(kernel)``-fold column buffer and one matmul, re-implemented here as it was). Section
"conv" of RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import limit_threads, machine_line, paired_ratio, peak_alloc, race, write_section  # noqa: E402

THREADS = limit_threads(2)

import numpy as np  # noqa: E402


def im2col_conv(x, w, padding: int):
    """The im2col reference peftmath used before (groups=1, stride 1, symmetric padding): the stacked
    shifted windows (a column buffer ``prod(kernel)`` times the input), one matmul."""
    import array_api_compat

    xp = array_api_compat.array_namespace(x, w)
    n, c_in = x.shape[:2]
    c_out, kernel = w.shape[0], tuple(w.shape[2:])
    if padding:
        import array_api_extra as xpx

        x = xpx.pad(x, [(0, 0), (0, 0)] + [(padding, padding)] * len(kernel), xp=xp)
    out_sp = tuple(s - k + 1 for s, k in zip(x.shape[2:], kernel))
    offsets = np.ndindex(*kernel)
    cols = xp.stack([x[(slice(None), slice(None)) + tuple(slice(o, o + s) for o, s in zip(off, out_sp))]
                     for off in offsets], axis=2)
    cols = xp.reshape(cols, (n, c_in * math.prod(kernel), math.prod(out_sp)))
    out = xp.matmul(xp.reshape(w, (c_out, c_in * math.prod(kernel))), cols)
    return xp.reshape(out, (n, c_out, *out_sp))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 rounds, a batch of 2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch
    import array_api_compat.torch as xpt

    from peftmath._array import conv, reference_conv

    torch.set_num_threads(2)
    batch, rounds = (2, 3) if args.quick else (8, 10)
    shape, kshape = (batch, 64, 56, 56), (64, 64, 3, 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal(kshape) / 24).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    norm = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1)

    # the same numbers from every contestant before timing them
    want = torch.nn.functional.conv2d(xt.double(), wt.double(), padding=1).numpy()
    for name, y in {"torch conv": conv(xt, wt, padding=1).numpy(), "numpy conv": conv(x, w, padding=1),
                    "reference": reference_conv(x, w, None, xp=np, **norm)}.items():
        err = float(np.max(np.abs(y - want)))
        assert err < 1e-3, f"{name}: max error {err}"

    contestants = {
        "F.conv2d (torch)": (lambda: torch.nn.functional.conv2d(xt, wt, padding=1), None),
        "conv (torch)": (lambda: conv(xt, wt, padding=1), None),
        "reference (torch)": (lambda: reference_conv(xt, wt, None, xp=xpt, **norm), None),
        "im2col (torch)": (lambda: im2col_conv(xt, wt, 1), None),
        "conv (numpy)": (lambda: conv(x, w, padding=1), None),
        "reference (numpy)": (lambda: reference_conv(x, w, None, xp=np, **norm), None),
        "im2col (numpy)": (lambda: im2col_conv(x, w, 1), None),
    }
    load_before = os.getloadavg()[0]
    medians, per_round = race(contestants, repeats=rounds, warmup=1)
    load_after = os.getloadavg()[0]
    peaks = {name: peak_alloc(contestants[name][0]) for name in ("conv (numpy)", "reference (numpy)", "im2col (numpy)")}

    def ratio(a: str, b: str) -> str:
        return f"{paired_ratio(per_round, a, b):.2f}"

    lines = [
        "## conv",
        "",
        f"`benchmarks/bench_conv.py{' --quick' if args.quick else ''}`: `Conv2d(64, 64, 3, padding=1)` on "
        f"`{shape}` float32, {rounds} round-robin rounds after a warm-up, median of per-round ratios. "
        f"{machine_line()}. {THREADS}. Load average {load_before:.2f} before, {load_after:.2f} after.",
        "",
        "| contestant | median ms | ratio | to |",
        "|---|---|---|---|",
    ]
    for name, against in [("conv (torch)", "F.conv2d (torch)"), ("reference (torch)", "F.conv2d (torch)"),
                          ("im2col (torch)", "F.conv2d (torch)"), ("conv (numpy)", "F.conv2d (torch)"),
                          ("conv (numpy)", "im2col (numpy)"), ("reference (numpy)", "im2col (numpy)")]:
        lines.append(f"| {name} | {medians[name]:.1f} | {ratio(name, against)} | {against} ({medians[against]:.1f} ms) |")
    lines += [
        "",
        "`tracemalloc` peak of one NumPy call beyond its inputs (the input is "
        f"{x.nbytes / 2**20:.1f} MiB, the output the same):",
        "",
        "| NumPy path | peak MiB | × input |",
        "|---|---|---|",
    ]
    for name, peak in peaks.items():
        lines.append(f"| {name} | {peak / 2**20:.1f} | {peak / x.nbytes:.2f} |")
    lines += [
        "",
        "\"conv (torch)\" is peftmath's `conv` dispatching to `F.conv2d` (issue #20 item 6: it was the im2col "
        "reference, the \"im2col (torch)\" row); \"conv (numpy)\" is the stride-1 shifted-window path "
        "(`peftmath._conv.shifted_gemm_conv`), \"reference\" the portable per-offset matmuls that array-api-strict, "
        "dask and strided NumPy convolutions run (and torch float32 on CUDA while cuDNN may use TF32).",
    ]
    if max(load_before, load_after) > (os.cpu_count() or 1):
        lines += ["", f"**The machine was busy** (load average above its {os.cpu_count()} cores): 2-thread BLAS calls "
                  "wait for their second thread, so these timings are noisy (a contestant against itself, `conv (torch)` "
                  "vs `F.conv2d`, shows the spread); re-run on an idle machine. The peaks do not depend on the load."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("conv", body)


if __name__ == "__main__":
    main()
