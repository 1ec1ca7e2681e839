#!/usr/bin/env python
"""The mixed batch's adapter terms against their bytes floor (issue 23, item 4).

A batch of 64 rows (one token each: a decoding step) over N LoRA adapters of heterogeneous ranks (8 to 64)
on a ``Linear(4096, 4096)``, a few rows naming ``"__base__"``. Only the adapter terms ``s·B A x_b`` are
timed (the base layer is the same for every method and would hide them):

* **segmented**: the path ``AdapterSet.mixed_batch_forward`` takes, factors already prepared (on NumPy
  ``multi._numpy_terms``: one sort and one gather of the rows, products on contiguous slices into one
  buffer, one scatter back; the factors laid out and ``s`` folded into ``B`` once per adapter, as a server
  holds them from one step to the next; elsewhere ``multi._segmented_terms``);
* **generic** (NumPy only): ``multi._segmented_terms``, the array-API path every other library takes and
  NumPy took before (per-segment gathers, factors cast and transposed on every call), for before/after;
* **per-row gather**: the previous method, kept here as the comparison: factors stacked (ranks
  zero-padded), each row gathers its own copy of ``A`` and ``B``, two batched matmuls;
* **bytes floor**: one matrix-vector product with each distinct factor (``A @ v``, ``B @ h``): the least
  work that reads every used adapter's factors once;
* **grouped-gemm floor**: the two products of every adapter on its rows, the rows already grouped and
  contiguous, in the faster of the two operand orders (``(X Aᵀ) Bᵀ`` or ``B (A Xᵀ)``). This is the honest
  floor for the rows each adapter has: the factors are read once, but with ``k`` rows on an adapter the
  products do ``k`` times the matrix-vector flops, and while the factors sit in cache those flops, not the
  bytes, bound the time (the table shows by how much this floor exceeds the bytes floor).

Every case runs twice: caches **warm** (each timed call follows an untimed call of the same contestant, so
the factors of up to 16 adapters sit in the 32 MiB L3; without it the per-row gather's 64 MiB stacks evicted
them before whichever contestant came next) and **cold** (a 64 MiB buffer is written, untimed, before every
timed call, so every call reads the factors from memory: what a decoding step sees after the rest of the
model went through the caches; the bytes floor is then the memory's bandwidth).

All run round-robin in one process, 2 threads; each ratio is the median of the per-round ratios.
Target (issue 23): segmented ≤ 1.5x the bytes floor for N ≤ 64. Section "segments" of RESULTS.md::

    python benchmarks/bench_segments.py [--quick] [--rounds N] [--no-write] [--numpy-only] [--warm-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import limit_threads, machine_line, write_section  # noqa: E402

THREADS = limit_threads(2)

import numpy as np  # noqa: E402


def _case(xp_name: str, n_adapters: int, rows: int, n: int, rng: np.random.Generator, rank: int | None = None):
    import peftmath as pm
    from peftmath.adapter import Adapter

    names = [f"a{i}" for i in range(n_adapters)]
    ranks = {nm: rank or int(rng.choice([8, 16, 32, 64])) for nm in names}
    ads = {}
    for nm in names:
        r = ranks[nm]
        p = {"lora_A.weight": (rng.standard_normal((r, n)) / 64).astype(np.float32),
             "lora_B.weight": (rng.standard_normal((n, r)) / 64).astype(np.float32)}
        if xp_name == "torch":
            import torch

            p = {k: torch.from_numpy(v) for k, v in p.items()}
        ads[nm] = Adapter(pm.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"]), {"lin": p})
    # every adapter appears at least once; the rest uniform, about 1 in 16 rows on the base model
    batch = names + list(rng.choice(names + ["__base__"], rows - n_adapters)) if rows >= n_adapters else names[:rows]
    rng.shuffle(batch)
    x = rng.standard_normal((rows, 1, n)).astype(np.float32)
    if xp_name == "torch":
        import torch

        x = torch.from_numpy(x)
    return ads, list(batch), x


def peak(xp_name: str) -> float:
    """The library's float32 matmul rate (GFLOP/s) on a 2048² product at the benchmark's threads: what the
    flops floor divides by (best of 5)."""
    import time

    a = np.random.default_rng(1).standard_normal((2048, 2048)).astype(np.float32)
    if xp_name == "torch":
        import torch

        a = torch.from_numpy(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def run(xp_name: str, n_adapters: int, rounds: int, rng: np.random.Generator, rank: int | None = None,
        cold: bool = False, peak_gflops: float = float("inf")) -> dict[str, float]:
    import array_api_compat

    from benchmarks._results import race
    from peftmath import multi
    from peftmath._array import as_compute

    n, rows = 4096, 64
    ads, batch, x = _case(xp_name, n_adapters, rows, n, rng, rank)
    xp = array_api_compat.array_namespace(x)
    mods = {nm: ad.module("lin", weight_shape=(n, n)) for nm, ad in ads.items() if nm in batch}
    order = list(mods)
    layer = next(iter(mods.values())).layer
    cd = xp.float32

    def generic():
        return multi._segmented_terms(xp, x, mods, order, batch, layer, cd, None)

    if xp_name == "numpy":
        prepared = [multi._numpy_factors(multi._Prepared(ads[nm], "lin", mods[nm]), np.float32) for nm in order]
        at = {nm: i for i, nm in enumerate(order)}

        def segmented():
            return multi._numpy_terms(x, prepared, at, batch, layer, np.float32)
    else:
        segmented = generic

    r_max = max(m.r for m in mods.values())
    zero = len(order)
    idx = np.asarray([order.index(b) if b in mods else zero for b in batch])
    if xp_name == "torch":
        import torch

        idx = torch.from_numpy(idx)

    def gather():  # the per-row method this replaced
        def pad(a, shape):
            full = xp.zeros(shape, dtype=cd)
            full[:a.shape[0], :a.shape[1]] = a
            return full

        A_stack = xp.stack([pad(mods[m].A, (r_max, n)) for m in order] + [xp.zeros((r_max, n), dtype=cd)])
        B_stack = xp.stack([pad(mods[m].B * mods[m].scaling, (n, r_max)) for m in order] + [xp.zeros((n, r_max), dtype=cd)])
        A_rows, B_rows = xp.take(A_stack, idx, axis=0), xp.take(B_stack, idx, axis=0)
        return xp.matmul(xp.matmul(x, xp.matrix_transpose(A_rows)), xp.matrix_transpose(B_rows))

    v = x[0, 0, :]

    def floor():  # every used factor read once: one matrix-vector product each
        for m in mods.values():
            h = xp.matmul(m.A, v)
            xp.matmul(m.B, h)

    grouped = {m: x[[i for i, b in enumerate(batch) if b == m], 0, :] for m in order}  # contiguous copies

    # the products alone, on rows already grouped and contiguous, in either operand order (BLAS libraries
    # differ in which one they run faster: the floor is the faster of the two in each round)
    def grouped_rows():  # (X Aᵀ) Bᵀ: (k, r) then (k, out)
        for m, xs in grouped.items():
            xp.matmul(xp.matmul(xs, xp.matrix_transpose(mods[m].A)) * mods[m].scaling, xp.matrix_transpose(mods[m].B))

    def grouped_cols():  # B (A Xᵀ): (r, k) then (out, k)
        for m, xs in grouped.items():
            xp.matmul(mods[m].B, xp.matmul(mods[m].A, xp.matrix_transpose(xs)) * mods[m].scaling)

    want = np.stack([np.zeros(n, np.float32) if b == "__base__" else
                     np.asarray(as_compute(xp, (mods[b].B @ (mods[b].A @ x[i, 0, :])) * mods[b].scaling, cd))
                     for i, b in enumerate(batch)])
    np.testing.assert_allclose(np.asarray(segmented())[:, 0, :], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(generic())[:, 0, :], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gather())[:, 0, :], want, rtol=1e-4, atol=1e-5)
    # cold: a 64 MiB buffer (twice the L3 cache) is written before every timed call, so each call reads the
    # factors from memory, as a serving step does after the rest of the model went through the caches
    buf = np.zeros(64 * 2**20 // 8)

    def evict():
        np.add(buf, 1.0, out=buf)

    fns = {"seg": segmented, "gather": gather, "floor": floor, "rows": grouped_rows, "cols": grouped_cols}
    if xp_name == "numpy":
        fns["generic"] = generic
    _, times = race({k: (f, evict if cold else f) for k, f in fns.items()}, repeats=rounds)
    for t in times:
        t["grouped"] = min(t["rows"], t["cols"])

    def ratio(a, b):
        return statistics.median(t[a] / t[b] for t in times)

    flops = sum(2 * batch.count(nm) * m.r * 2 * n for nm, m in mods.items())   # both products, every row
    return {"floor_ms": statistics.median(t["floor"] for t in times), "seg": ratio("seg", "floor"),
            "flops_ms": flops / (peak_gflops * 1e6),
            "seg_ms": statistics.median(t["seg"] for t in times),
            "gather": ratio("gather", "floor"), "grouped": ratio("grouped", "floor"),
            "seg_grouped": ratio("seg", "grouped"), "mib": sum(4 * m.r * 2 * n for m in mods.values()) / 2**20,
            "generic": ratio("generic", "floor") if "generic" in fns else None,
            "seg_generic": ratio("seg", "generic") if "generic" in fns else None}


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--numpy-only", action="store_true")
    ap.add_argument("--warm-only", action="store_true", help="skip the cold-cache half")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 30, --quick 5)")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 30)
    load0 = os.getloadavg()[0]
    libs = ["numpy"]
    if not args.numpy_only:
        try:
            import torch

            torch.set_num_threads(2)
            libs.append("torch")
        except ImportError:
            pass
    lines = ["## Mixed batch: adapter terms against the bytes floor (64 rows, 1 token each, Linear(4096, 4096))", "",
             (f"Script: `benchmarks/bench_segments.py`. Machine: {machine_line()}; {THREADS}. Ranks drawn from "
             f"8/16/32/64 per adapter; about 1 row in 16 on the base model; {rounds} round-robin rounds, medians of "
             "per-round ratios. Bytes floor: one matrix-vector product with every used factor (each byte of the "
             "used factors read once). Grouped-gemm floor: each adapter's two products on its rows, already "
             "grouped and contiguous (the factors read once, the flops of every row done; the faster operand "
             "order of the two in each round). Segmented: the path an AdapterSet takes, factors prepared once "
             "(NumPy: one sort, one gather, products into one buffer, one scatter); generic: the array-API path "
             "(other libraries, and NumPy before). Caches warm: each timed call follows an untimed call of the "
             "same contestant, so the factors sit in the 32 MiB L3 (except 64 adapters); cold: a 64 MiB buffer "
             "is written before every timed call, so the factors come from memory as in a serving step."), "",
             ("| library | adapters (ranks) | caches | factor MiB | bytes floor ms | segmented / bytes floor | "
             "generic / bytes floor | segmented / generic | flops floor ms | segmented / max(bytes, flops floor) (medians) | "
             "grouped-gemm floor / bytes floor | "
             "segmented / grouped-gemm floor | per-row gather / bytes floor | target ≤ 1.5x (bytes) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lib in libs:
        gflops = peak(lib)
        lines[3:3] = ["", f"{lib}: float32 matmul peak {gflops:.0f} GFLOP/s (2048², best of 5). Flops floor: the adapter "
                          "terms' flops (2·k·r·(in + out) for an adapter with k rows) at that rate; with several rows per "
                          "adapter it exceeds the bytes floor, and no method reaches the bytes floor there."]
        for cold in (False,) if args.warm_only else (False, True):
            rng = np.random.default_rng(0)  # the same batches warm and cold
            for count, rank in ((16, 16), (4, None), (16, None), (64, None)):
                r = run(lib, count, rounds, rng, rank, cold, gflops)
                label = f"{count} (r = {rank})" if rank else f"{count} (8-64)"
                lines.append(f"| {lib} | {label} | {'cold' if cold else 'warm'} | {r['mib']:.1f} | {r['floor_ms']:.2f} | "
                             f"{r['seg']:.2f}x | {_x(r['generic'])} | {_x(r['seg_generic'])} | {r['flops_ms']:.2f} | "
                             f"{r['seg_ms'] / max(r['floor_ms'], r['flops_ms']):.2f}x | {r['grouped']:.2f}x | "
                             f"{r['seg_grouped']:.2f}x | {r['gather']:.2f}x | "
                             f"{'met' if r['seg'] <= 1.5 else 'missed'} |")
                print(lines[-1], flush=True)
    load = os.getloadavg()[0]
    lines += ["", (f"1-minute load average at the start {load0:.1f}, at the end {load:.1f} (2 cores: above 1 the "
                   "other processes share the cores, and the 2-thread gemms suffer first).")]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("segments", text)


if __name__ == "__main__":
    main()
