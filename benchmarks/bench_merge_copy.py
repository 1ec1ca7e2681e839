#!/usr/bin/env python
"""The default merge / unmerge (``copy=True``) of every method vs one copy of W plus that method's floor.

Issue 20, item 1: ``copy=True`` should cost at most 1.3x of (one copy of ``W`` + the method's in-place
floor) and allocate nothing of ``W``'s size besides the result. One ``Linear(4096, 4096)`` weight, r = 16
(VeRA r = 256), float32, plus bfloat16 rows (ml_dtypes) for the methods whose kernels tile half precision::

    python benchmarks/bench_merge_copy.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_merge_copy.py --quick    # smoke run: 2 rounds
    python benchmarks/bench_merge_copy.py --no-write # print the section, leave RESULTS.md alone

Each method runs in a process of its own (``--together``: all methods in one process, where the memory one method
frees changes the page faults of the next), its contestants round-robin (``_results.race``, the starting contestant
rotating each round, each call after 0.15 s idle: OpenBLAS's workers spin ~0.1 s after a threaded call and would
take a core from the next contestant). For each method the ratio is the median over rounds of ``t_method / (t_copy + t_floor)``
with the three times taken in the same round (11 rounds: the median holds while 5 of them stall); beside it, the
ratio of the fastest rounds, ``min t_method / (min t_copy + min t_floor)``. "One copy of W" is ``np.copyto(dst, W)`` into a
preallocated ``dst`` (float32 or bfloat16, as the row). The floors, each timed in place on a scratch
C-ordered copy that is reset (untimed) before every call:

* LoRA, AdaLoRA (factors ``B``, ``E ⊙ A``), DeLoRA (``B ⊙ s``, ``A ⊙ w``), VeRA (``λ_b ⊙ B``, ``λ_d ⊙ A``,
  r = 256): one ``scipy.linalg.blas.sgemm(1, A'.T, B'.T, beta=1, c=W.T, overwrite_c=True)`` on factors
  scaled beforehand (untimed);
* DoRA: that gemm, then the row norms (``np.einsum("ij,ij->i")``) and the in-place row scaling ``W *= g``;
* IA3 (output scaling ``(out, 1)``): ``np.multiply(W, l, out=W)``;
* MiSS (default form): one in-place broadcast add of the shared block, ``W.reshape(out, in/r, r) += Dᵀ``;
* HiRA: ``T = B @ A`` by sgemm into a preallocated buffer, then ``W *= T`` (one elementwise pass; the
  ``1 + s·T`` folded into the buffer untimed);
* LoHa: two rank-r sgemms into two preallocated buffers, ``T1 *= T2``, ``W += T1``;
* FourierFT (k = 1000): its own ``ΔW`` (``delta_weight()``, the inverse real FFT) plus one in-place add
  ``np.add(W, ΔW, out=W)``;
* OFT (block size 32): one batched ``np.matmul`` of W's column blocks by the blocks into a preallocated
  buffer;
* RoAd, LoKr, BOFT: no hardware floor is defined here; the floor is the method's own ``copy=False`` call
  (marked "own in place"), so the ratio measures only what ``copy=True`` adds.

bfloat16 rows: the floor is the backend's own float32-row-tile kernel on a bfloat16 scratch
(``NumpyBackend().addmm_`` for LoRA and VeRA, ``dora_merge_`` for DoRA, ``ia3.merge(copy=False)`` for IA3).

Peak memory: ``tracemalloc``'s peak during one ``copy=True`` call beyond what was allocated before it,
as a multiple of ``W.nbytes`` (the result itself is 1.0). NumPy reports its buffers to tracemalloc; BLAS
work space is not traced. The section "merge_copy" of ``benchmarks/RESULTS.md`` receives the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

THREADS = 2
THREAD_NOTE = _results.limit_threads(THREADS)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

from _results import peak_alloc, race  # noqa: E402

OUT = IN = 4096
R = 16
R_VERA = 256
S = 2.0
TARGET = 1.3


class Case:
    """One method: its copy=True merge and unmerge, its floor (in place on ``scratch``) and the weight."""

    def __init__(self, name, W, merge, unmerge, floor, *, own_floor=False):
        self.name, self.W, self.merge, self.unmerge, self.floor, self.own_floor = \
            name, W, merge, unmerge, floor, own_floor
        self.scratch = np.empty_like(W)  # C-ordered
        self.reset = lambda: np.copyto(self.scratch, W)


def _gemm_floor(case_scratch, Bs, As):
    return lambda: blas.sgemm(1.0, As.T, Bs.T, beta=1.0, c=case_scratch().T, overwrite_c=True)


def float32_cases(rng) -> list[Case]:
    from peftmath.layers import Layer
    from peftmath.methods import (adalora, boft, delora, dora, fourierft, hira, ia3, loha, lokr, lora, miss, oft, road,
                                  vera)

    f32 = np.float32
    W0 = (rng.standard_normal((OUT, IN), dtype=f32) / f32(64))
    small = lambda *shape: rng.standard_normal(shape, dtype=f32) / f32(8)  # noqa: E731
    cases: list[Case] = []

    def add(name, merge, unmerge, floor_of, *, own_floor=False):
        c = Case(name, W0, merge, unmerge, None, own_floor=own_floor)
        c.floor = floor_of(c)
        cases.append(c)

    A, B = small(R, IN), small(OUT, R)
    add("LoRA", lambda: lora.merge(W0, A, B, scaling=S), lambda: lora.unmerge(W0, A, B, scaling=S),
        lambda c: _gemm_floor(lambda: c.scratch, B * f32(S), A))

    mag = dora.init_magnitude(W0, A, B, scaling=S) * f32(1.1)
    n_rec = dora.merge(W0, A, B, mag, scaling=S).record

    def dora_floor(c):
        Bs = B * f32(S)

        def run():
            M = c.scratch
            blas.sgemm(1.0, A.T, Bs.T, beta=1.0, c=M.T, overwrite_c=True)
            n = np.sqrt(np.einsum("ij,ij->i", M, M))
            M *= (mag / n)[:, None]
        return run

    add("DoRA", lambda: dora.merge(W0, A, B, mag, scaling=S),
        lambda: dora.unmerge(W0, A, B, mag, scaling=S, weight_norm=n_rec), dora_floor)

    vA, vB = small(R_VERA, IN), small(OUT, R_VERA)
    lb, ld = small(OUT), small(R_VERA)
    add(f"VeRA r={R_VERA}", lambda: vera.merge(W0, lb, ld, vA, vB), lambda: vera.unmerge(W0, lb, ld, vA, vB),
        lambda c: _gemm_floor(lambda: c.scratch, lb[:, None] * vB, ld[:, None] * vA))

    l_out = rng.uniform(0.5, 2.0, (OUT, 1)).astype(f32)
    add("IA3 (out, 1)", lambda: ia3.merge(W0, l_out)[0], lambda: ia3.unmerge(W0, l_out)[0],
        lambda c: (lambda: np.multiply(c.scratch, l_out, out=c.scratch)))

    aA, aE, aB = small(R, IN), small(R, 1), small(OUT, R)
    add("AdaLoRA", lambda: adalora.merge(W0, aA, aE, aB, scaling=S, ranknum=R),
        lambda: adalora.unmerge(W0, aA, aE, aB, scaling=S, ranknum=R),
        lambda c: _gemm_floor(lambda: c.scratch, aB * f32(S / R), aA * aE))

    dp = delora.init_weights(Layer.of((OUT, IN)), R, W0, init=False, seed=1)
    dA, dB, dl, dw = (dp[k] for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
    ds = np.asarray(delora.scales(dA, dB, dl, dtype=np.float32))
    add("DeLoRA", lambda: delora.merge(W0, dA, dB, dl, dw), lambda: delora.unmerge(W0, dA, dB, dl, dw),
        lambda c: _gemm_floor(lambda: c.scratch, dB * ds, dA * dw))

    D = small(R, OUT)
    Dt = np.ascontiguousarray(D.T)
    add("MiSS", lambda: miss.merge(W0, D), lambda: miss.unmerge(W0, D),
        lambda c: (lambda: np.add(c.scratch.reshape(OUT, IN // R, R), Dt[:, None, :],
                                  out=c.scratch.reshape(OUT, IN // R, R))))

    hA, hB = small(R, IN), small(OUT, R)
    hbuf = np.empty_like(W0)

    def hira_floor(c):
        def run():
            blas.sgemm(1.0, hA.T, hB.T, beta=0.0, c=hbuf.T, overwrite_c=True)
            np.multiply(c.scratch, hbuf, out=c.scratch)
        return run

    add("HiRA", lambda: hira.merge(W0, hA, hB), lambda: hira.unmerge(W0, hA, hB), hira_floor)

    l1a, l1b, l2a, l2b = small(OUT, R), small(R, IN), small(OUT, R), small(R, IN)
    t1, t2 = np.empty_like(W0), np.empty_like(W0)

    def loha_floor(c):
        def run():
            blas.sgemm(S, l1b.T, l1a.T, beta=0.0, c=t1.T, overwrite_c=True)
            blas.sgemm(1.0, l2b.T, l2a.T, beta=0.0, c=t2.T, overwrite_c=True)
            np.multiply(t1, t2, out=t1)
            np.add(c.scratch, t1, out=c.scratch)
        return run

    add("LoHa", lambda: loha.merge(W0, l1a, l1b, l2a, l2b, scaling=S),
        lambda: loha.unmerge(W0, l1a, l1b, l2a, l2b, scaling=S), loha_floor)

    bs = 32
    Q = np.linalg.qr(rng.standard_normal((IN // bs, bs, bs)))[0].astype(f32)
    obuf = np.empty((IN // bs, OUT, bs), dtype=f32)
    QT = np.ascontiguousarray(np.swapaxes(Q, 1, 2))

    def oft_floor(c):
        return lambda: np.matmul(c.scratch.reshape(OUT, IN // bs, bs).transpose(1, 0, 2), QT, out=obuf)

    add("OFT b=32", lambda: oft.merge(W0, Q), lambda: oft.unmerge(W0, Q), oft_floor)

    fmod = fourierft.FourierFTModule("m", fourierft.FourierFTConfig(n_frequency=1000, scaling=150.0),
                                     {"fourierft_spectrum": small(1000) / f32(1000)}, Layer.of((OUT, IN)))
    fmod.delta_weight()  # the cached index maps

    def fourier_floor(c):
        return lambda: np.add(c.scratch, fmod.delta_weight(), out=c.scratch)

    add("FourierFT k=1000", lambda: fmod.merge(W0).weight, lambda: fmod.unmerge(W0).weight, fourier_floor)

    kp = {"lokr_w1": small(8, 8), "lokr_w2": small(OUT // 8, IN // 8)}

    def own(fn):
        return lambda c: (lambda: fn(c.scratch))

    add("LoKr", lambda: lokr.merge(W0, kp, scaling=S), lambda: lokr.unmerge(W0, kp, scaling=S),
        own(lambda M: lokr.merge(M, kp, scaling=S, copy=False)), own_floor=True)

    theta, alpha = small(OUT // 2), 1 + small(OUT // 2)
    add("RoAd road_1", lambda: road.merge(W0, theta, alpha)[0], lambda: road.unmerge(W0, theta, alpha)[0],
        own(lambda M: road.merge(M, theta, alpha, copy=False)), own_floor=True)

    bR = np.linalg.qr(rng.standard_normal((2, IN // bs, bs, bs)))[0].astype(f32)
    b_s = 1 + small(OUT, 1)
    add("BOFT m=2 b=32", lambda: boft.merge(W0, bR, b_s), lambda: boft.unmerge(W0, bR, b_s),
        own(lambda M: boft.merge(M, bR, b_s, copy=False)), own_floor=True)
    return cases


def bfloat16_cases(rng) -> list[Case]:
    import ml_dtypes

    from peftmath.backends import NumpyBackend
    from peftmath.methods import dora, ia3, lora, vera

    f32, bf16 = np.float32, ml_dtypes.bfloat16
    W0 = (rng.standard_normal((OUT, IN), dtype=f32) / f32(64)).astype(bf16)
    small = lambda *shape: rng.standard_normal(shape, dtype=f32) / f32(8)  # noqa: E731
    nb = NumpyBackend()
    cases: list[Case] = []

    def add(name, merge, unmerge, floor_of):
        c = Case(name, W0, merge, unmerge, None)
        c.floor = floor_of(c)
        cases.append(c)

    A, B = small(R, IN), small(OUT, R)
    add("LoRA bf16", lambda: lora.merge(W0, A, B, scaling=S), lambda: lora.unmerge(W0, A, B, scaling=S),
        lambda c: (lambda: nb.addmm_(c.scratch, B, A, S)))
    mag = dora.init_magnitude(W0, A, B, scaling=S) * f32(1.1)
    n_rec = dora.merge(W0, A, B, mag, scaling=S).record
    add("DoRA bf16", lambda: dora.merge(W0, A, B, mag, scaling=S),
        lambda: dora.unmerge(W0, A, B, mag, scaling=S, weight_norm=n_rec),
        lambda c: (lambda: nb.dora_merge_(c.scratch, B, A, S, mag)))
    vA, vB = small(R_VERA, IN), small(OUT, R_VERA)
    lb, ld = small(OUT), small(R_VERA)
    Bs, As = lb[:, None] * vB, ld[:, None] * vA
    add(f"VeRA r={R_VERA} bf16", lambda: vera.merge(W0, lb, ld, vA, vB), lambda: vera.unmerge(W0, lb, ld, vA, vB),
        lambda c: (lambda: nb.addmm_(c.scratch, Bs, As, 1.0)))
    l_out = rng.uniform(0.5, 2.0, (OUT, 1)).astype(f32)
    add("IA3 (out, 1) bf16", lambda: ia3.merge(W0, l_out)[0], lambda: ia3.unmerge(W0, l_out)[0],
        lambda c: (lambda: ia3.merge(c.scratch, l_out, copy=False)))
    return cases


def measure(cases: list[Case], rounds: int) -> list[dict]:
    W0 = cases[0].W
    dst = np.empty_like(W0)
    # "copy": into preallocated memory (the floor); "fresh copy": np.copy, which also gets new pages as
    # every copy=True result must (64 MiB comes from mmap: fresh pages each call)
    contestants = {"copy": (lambda: np.copyto(dst, W0), None), "fresh copy": (lambda: np.copy(W0), None)}
    for c in cases:
        contestants[f"{c.name}|floor"] = (c.floor, c.reset)
        contestants[f"{c.name}|merge"] = (c.merge, None)
        contestants[f"{c.name}|unmerge"] = (c.unmerge, None)
    times, per_round = race(contestants, repeats=rounds, settle=0.15)  # OpenBLAS's workers spin after a threaded call
    rows = []
    for c in cases:
        ratio = {op: statistics.median(r[f"{c.name}|{op}"] / (r["copy"] + r[f"{c.name}|floor"]) for r in per_round)
                 for op in ("merge", "unmerge")}
        fresh = {op: statistics.median(r[f"{c.name}|{op}"] / (r["fresh copy"] + r[f"{c.name}|floor"])
                                       for r in per_round) for op in ("merge", "unmerge")}
        # the fastest round of each: what the code costs when no call meets a fresh-memory stall
        best = {op: min(r[f"{c.name}|{op}"] for r in per_round)
                / (min(r["copy"] for r in per_round) + min(r[f"{c.name}|floor"] for r in per_round))
                for op in ("merge", "unmerge")}
        peak = {op: peak_alloc(getattr(c, op)) / W0.nbytes for op in ("merge", "unmerge")}
        rows.append({"name": c.name, "own_floor": c.own_floor, "copy_ms": times["copy"],
                     "floor_ms": times[f"{c.name}|floor"], "merge_ms": times[f"{c.name}|merge"],
                     "unmerge_ms": times[f"{c.name}|unmerge"], "ratio": ratio, "peak": peak,
                     "fresh_ms": times["fresh copy"], "fresh": fresh, "best": best})
    return rows


def _isolated(name: str, quick: bool) -> dict:
    """The row of case ``name``, measured by this script in a fresh process (``--child``)."""
    cmd = [sys.executable, __file__, "--child", name] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    (row,) = json.loads(out.strip().splitlines()[-1])
    return row


def table(rows: list[dict]) -> list[str]:
    out = ["| method | copy ms | floor ms | merge ms | merge ratio | unmerge ms | unmerge ratio | peak merge / unmerge (x W) "
           "| fresh copy ms | merge / unmerge vs fresh copy + floor | merge / unmerge, fastest rounds |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = lambda x: f"**{x:.2f}**" if x <= TARGET else f"{x:.2f} (miss)"  # noqa: E731
        floor = f"{r['floor_ms']:.1f}" + (" (own in place)" if r["own_floor"] else "")
        out.append(f"| {r['name']} | {r['copy_ms']:.1f} | {floor} | {r['merge_ms']:.1f} | {mark(r['ratio']['merge'])} "
                   f"| {r['unmerge_ms']:.1f} | {mark(r['ratio']['unmerge'])} "
                   f"| {r['peak']['merge']:.2f} / {r['peak']['unmerge']:.2f} "
                   f"| {r['fresh_ms']:.1f} | {r['fresh']['merge']:.2f} / {r['fresh']['unmerge']:.2f} "
                   f"| {r['best']['merge']:.2f} / {r['best']['unmerge']:.2f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write RESULTS.md")
    ap.add_argument("--only", default="", help="comma-separated method names to keep (substring match)")
    ap.add_argument("--together", action="store_true",
                    help="race every method in one process (default: each method in a process of its own)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one case, by exact name; JSON rows out
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else 11
    if args.child is not None:
        rng = np.random.default_rng(0)
        cases = [c for c in float32_cases(rng) + bfloat16_cases(rng) if c.name == args.child]
        print(json.dumps(measure(cases, rounds)))
        return 0
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    keep = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    pick = lambda cs: [c for c in cs if not keep or any(k in c.name.lower() for k in keep)]  # noqa: E731
    fc = pick(float32_cases(rng))
    bf = pick(bfloat16_cases(rng))
    if args.together:
        f32 = measure(fc, rounds) if fc else []
        b16 = measure(bf, rounds) if bf else []
    else:
        f32, b16 = [_isolated(c.name, args.quick) for c in fc], [_isolated(c.name, args.quick) for c in bf]
    load_after = os.getloadavg()[0]
    mode = ("every method raced in one process" if args.together else
            "each method in a process of its own (its copy, floor, merge and unmerge raced together; `--together` "
            "races all methods in one process, where one method's freed memory changes the next one's page faults)")
    body = "\n".join([
        "## Default merge / unmerge (`copy=True`) vs one copy of W + the in-place floor (`benchmarks/bench_merge_copy.py`)",
        "",
        f"Machine: {_results.machine_line()}. {THREAD_NOTE}. Load average {load_before:.2f} before, "
        f"{load_after:.2f} after. `Linear({IN}, {OUT})`, r = {R} (VeRA r = {R_VERA}); {mode}; {rounds} round-robin rounds; "
        f"ratio = median over rounds of t / (t_copy + t_floor) (target <= {TARGET}); floors in the script's "
        f"docstring; copy = `np.copyto` into a preallocated array; peak = tracemalloc peak of one call / W.nbytes. "
        f"The last two columns measure against `np.copy(W)` instead, which gets fresh pages as every copy=True result "
        f"must (reported beside the target, not instead of it). The last column is min(t) / (min(t_copy) + "
        f"min(t_floor)) over the rounds: the code's cost when no call meets one of this virtual machine's random "
        f"fresh-memory stalls (also beside the target, not instead of it).",
        "",
        "float32:",
        "",
        *table(f32),
        "",
        "bfloat16 (ml_dtypes; floor = the backend's float32 row-tile kernel in place):",
        "",
        *table(b16),
    ])
    print(body)
    if not args.no_write:
        _results.write_section("merge_copy", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
