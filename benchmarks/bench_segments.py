#!/usr/bin/env python
"""The mixed batch's adapter terms against their bytes floor (issue 23, item 4).

A batch of 64 rows (one token each: a decoding step) over N LoRA adapters of heterogeneous ranks (8 to 64)
on a ``Linear(4096, 4096)``, a few rows naming ``"__base__"``. Only the adapter terms ``s·B A x_b`` are
timed (the base layer is the same for every method and would hide them):

* **segmented**: peftmath's ``multi._segmented_terms`` (rows grouped by adapter, each adapter's factors
  read once for its segment, terms put back in batch order);
* **per-row gather**: the previous method, kept here as the comparison: factors stacked (ranks
  zero-padded), each row gathers its own copy of ``A`` and ``B``, two batched matmuls;
* **bytes floor**: one matrix-vector product with each distinct factor (``A @ v``, ``B @ h``): the least
  work that reads every used adapter's factors once;
* **grouped-gemm floor**: the two products of every adapter on its rows, the rows already grouped and
  contiguous (what a segmented kernel cannot avoid: with several rows per adapter and large ranks the
  products' flops, not the factors' bytes, bound the time).

The three run round-robin in one process, 2 threads; the ratio is the median of the per-round ratios.
Target (issue 23): segmented ≤ 1.5x the bytes floor for N ≤ 64. Section "segments" of RESULTS.md::

    python benchmarks/bench_segments.py [--quick] [--no-write] [--torch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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


def run(xp_name: str, n_adapters: int, rounds: int, rng: np.random.Generator,
        rank: int | None = None) -> tuple[float, float, float, float, int]:
    import array_api_compat

    from peftmath import multi
    from peftmath._array import as_compute

    n, rows = 4096, 64
    ads, batch, x = _case(xp_name, n_adapters, rows, n, rng, rank)
    xp = array_api_compat.array_namespace(x)
    mods = {nm: ad.module("lin", weight_shape=(n, n)) for nm, ad in ads.items() if nm in batch}
    order = list(mods)
    layer = next(iter(mods.values())).layer
    cd = xp.float32

    def segmented():
        return multi._segmented_terms(xp, x, mods, order, batch, layer, cd, None)

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

    def grouped_floor():  # the products alone, on rows already grouped
        for m, xs in grouped.items():
            xp.matmul(xp.matmul(xs, xp.matrix_transpose(mods[m].A)) * mods[m].scaling, xp.matrix_transpose(mods[m].B))

    want = np.stack([np.zeros(n, np.float32) if b == "__base__" else
                     np.asarray(as_compute(xp, (mods[b].B @ (mods[b].A @ x[i, 0, :])) * mods[b].scaling, cd))
                     for i, b in enumerate(batch)])
    np.testing.assert_allclose(np.asarray(segmented())[:, 0, :], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gather())[:, 0, :], want, rtol=1e-4, atol=1e-5)
    fns = {"seg": segmented, "gather": gather, "floor": floor, "grouped": grouped_floor}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    seg_ratio = statistics.median(s / f for s, f in zip(times["seg"], times["floor"]))
    gather_ratio = statistics.median(g / f for g, f in zip(times["gather"], times["floor"]))
    grouped_ratio = statistics.median(s / g for s, g in zip(times["seg"], times["grouped"]))
    nbytes = sum(4 * m.r * 2 * n for m in mods.values())
    return statistics.median(times["floor"]) * 1e3, seg_ratio, gather_ratio, grouped_ratio, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rounds = 5 if args.quick else 30
    rng = np.random.default_rng(0)
    libs = ["numpy"]
    try:
        import torch

        torch.set_num_threads(2)
        libs.append("torch")
    except ImportError:
        pass
    lines = ["## Mixed batch: adapter terms against the bytes floor (64 rows, 1 token each, Linear(4096, 4096))", "",
             f"Script: `benchmarks/bench_segments.py`. Machine: {machine_line()}; {THREADS}. Ranks drawn from "
             f"8/16/32/64 per adapter; about 1 row in 16 on the base model; {rounds} round-robin rounds, medians of "
             "per-round ratios. The floor is one matrix-vector product with every used factor (each byte of the "
             "used factors read once).", "",
             "| library | adapters (ranks) | factor MiB | bytes floor ms | segmented / bytes floor | per-row gather / "
             "bytes floor | segmented / grouped-gemm floor | target ≤ 1.5x (bytes) |",
             "|---|---|---|---|---|---|---|---|"]
    for lib in libs:
        for count, rank in ((16, 16), (4, None), (16, None), (64, None)):
            floor_ms, seg, gather, grouped, nbytes = run(lib, count, rounds, rng, rank)
            label = f"{count} (r = {rank})" if rank else f"{count} (8-64)"
            lines.append(f"| {lib} | {label} | {nbytes / 2**20:.1f} | {floor_ms:.2f} | {seg:.2f}x | {gather:.2f}x | "
                         f"{grouped:.2f}x | {'met' if seg <= 1.5 else 'missed'} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("segments", text)


if __name__ == "__main__":
    main()
