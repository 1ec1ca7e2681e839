#!/usr/bin/env python
"""AdaLoRA merge / unmerge: peftmath vs Hugging Face PEFT vs the BLAS floor, side by side in one run.

One ``Linear(4096, 4096)`` float32 weight, ``init_r = 12`` (``E`` random, so the adapter is not a
no-op), ``lora_alpha = 32``::

    python benchmarks/bench_adalora.py            # full run (about half a minute on 2 cores)
    python benchmarks/bench_adalora.py --quick    # smoke run

What is timed (median of interleaved rounds, after a warm-up):

* the floor: ``sgemm(c, (A⊙E).T, B.T, beta=1, c=W.T, overwrite_c=True)``, the in-place rank-r update alone;
* ``AdaLoraModule.merge`` / ``unmerge`` with ``copy=False`` (in place: one gemm on ``B`` and ``A ⊙ E``)
  and ``copy=True`` (a copy of W, then the same gemm on the copy);
* PEFT's ``SVDLinear.merge()`` / ``unmerge()`` on the same W, A, E, B (``get_peft_model``);
* the peak extra allocation of the in-place path (``tracemalloc``).

The results go to ``benchmarks/RESULTS.md``, section "adalora" (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

THREADS = 2
_results.limit_threads(THREADS)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402
from scipy.linalg import blas  # noqa: E402

from _results import one_linear, paired_ratio as ratio, peak_alloc, race  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import adalora  # noqa: E402

OUT = IN = 4096
R = 12
ALPHA = 32


def build_peft(W0, A, E, B):
    import peft
    import torch

    cfg = peft.AdaLoraConfig(init_r=R, lora_alpha=ALPHA, target_modules=["lin"], total_step=100,
                             init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(one_linear(IN, OUT, bias=False), cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W0))
        layer.lora_A["default"].copy_(torch.from_numpy(A))
        layer.lora_E["default"].copy_(torch.from_numpy(E))
        layer.lora_B["default"].copy_(torch.from_numpy(B))
    model.eval()
    return model, layer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repeats")
    ap.add_argument("--no-write", action="store_true", help="print the table, do not write RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    reps = 3 if args.quick else 11
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((OUT, IN), dtype=np.float32) / np.float32(64)
    A = rng.standard_normal((R, IN), dtype=np.float32) / np.float32(64)
    E = rng.standard_normal((R, 1), dtype=np.float32)
    B = rng.standard_normal((OUT, R), dtype=np.float32) / np.float32(4)
    config = adalora.AdaLoraConfig(init_r=R, lora_alpha=ALPHA, total_step=100, target_modules=["lin"])
    config.validate()
    mod = adalora.AdaLoraModule("lin", config, {"lora_A": A, "lora_E": E, "lora_B": B}, Layer.of((OUT, IN)))
    c = adalora.rank_scale(ALPHA, R)
    AE = A * E
    W = W0.copy()
    reset = lambda: np.copyto(W, W0)  # noqa: E731

    # --- correctness and memory (untimed) -----------------------------------------------------------
    ref = W0.astype(np.float64) + c * (B.astype(np.float64) @ (A.astype(np.float64) * E.astype(np.float64)))
    reset()
    mod.merge(W, copy=False)
    merge_err = float(np.max(np.abs(W - ref)))
    mod.unmerge(W, copy=False)
    roundtrip_err = float(np.max(np.abs(W - W0)))
    peak_merge = peak_alloc(lambda: mod.merge(W, copy=False), setup=reset)
    model, layer = build_peft(W0, A, E, B)
    with torch.no_grad():
        layer.merge()
        peft_err = float(np.max(np.abs(layer.base_layer.weight.numpy() - mod.merge(W0).weight)))
        layer.unmerge()

        contestants = {
            "floor": (lambda: blas.sgemm(c, AE.T, B.T, beta=1.0, c=W.T, overwrite_c=True), reset),
            "merge": (lambda: mod.merge(W, copy=False), reset),
            "unmerge": (lambda: mod.unmerge(W, copy=False), reset),
            "merge_copy": (lambda: mod.merge(W0, copy=True), None),
            "peft_merge": (layer.merge, lambda: layer.merged and layer.unmerge()),
            "peft_unmerge": (layer.unmerge, lambda: layer.merged or layer.merge()),
        }
        med, rounds = race(contestants, repeats=reps)
    r_merge = ratio(rounds, "peft_merge", "merge")
    r_unmerge = ratio(rounds, "peft_unmerge", "unmerge")
    verdict = lambda r: "met" if r >= 2 else "**missed**"  # noqa: E731
    body = f"""## AdaLoRA (`benchmarks/bench_adalora.py`)

Linear(4096, 4096) float32, init_r = 12, lora_alpha = 32, E random; median of {reps} interleaved rounds.
Machine: {_results.machine_line()}; {THREADS} threads for torch and BLAS.

| operation | peftmath (ms) | PEFT 0.21.2 (ms) | PEFT / peftmath | target >= 2x |
|---|---:|---:|---:|---|
| merge (in place, `copy=False`) | {med['merge']:.1f} | {med['peft_merge']:.1f} | {r_merge:.1f}x | {verdict(r_merge)} |
| unmerge (in place) | {med['unmerge']:.1f} | {med['peft_unmerge']:.1f} | {r_unmerge:.1f}x | {verdict(r_unmerge)} |
| merge, `copy=True` (copy of W + the same gemm) | {med['merge_copy']:.1f} | | {ratio(rounds, 'peft_merge', 'merge_copy'):.1f}x | reference |
| BLAS floor: `sgemm(beta=1)` on `B`, `A⊙E` | {med['floor']:.1f} | | merge / floor = {ratio(rounds, 'merge', 'floor'):.2f} | |

The in-place merge is one gemm with `beta=1` on the factors `B` (4096×12) and `A ⊙ E` (12×4096); PEFT
builds `B @ (A*E)`, multiplies by `s`, divides by `ranknum + 1e-5` (three passes over a 4096×4096
temporary) and adds it. Peak extra allocation of the in-place merge: {peak_merge / 2**20:.2f} MiB
(W is {W0.nbytes / 2**20:.0f} MiB). Max |merged − float64 reference| = {merge_err:.2e}; merge → unmerge
max |W'' − W| = {roundtrip_err:.2e}; max |peftmath − PEFT| merged = {peft_err:.2e}.
"""
    print(body)
    if not args.no_write:
        _results.write_section("adalora", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
