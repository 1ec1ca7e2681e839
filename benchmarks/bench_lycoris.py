"""LoHa and LoKr merge / unmerge: peftmath (NumPy) side by side with PEFT (torch CPU) in one run.

Linear(4096, 4096) float32, r = 16, alpha = 32, init_weights=False (a non-trivial delta). PEFT times its
own ``layer.merge()`` / ``layer.unmerge()``; peftmath times ``Module.merge/unmerge`` on the same
weight and tensors (converted to NumPy once), in place (``copy=False``) and with ``copy=True``.
Peak extra allocation is measured with tracemalloc (NumPy reports its buffers to it) during one
in-place merge. Writes the "loha_lokr" section of benchmarks/RESULTS.md.

NumPy's BLAS runs single-threaded (``OPENBLAS_NUM_THREADS=1`` unless set), PEFT's torch on 2 threads:
peftmath never uses more CPU than PEFT here. (On the 2-core test machine, two BLAS thread pools — torch's
and OpenBLAS's — competing for the cores made the timings of the multi-threaded case vary tenfold.)

Run: ``python benchmarks/bench_lycoris.py [--repeat N]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import machine_line, peak_alloc, write_section  # noqa: E402

from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import loha, lokr  # noqa: E402

N, R, ALPHA = 4096, 16, 32


def _peft_layer(method: str):
    import copy

    import torch
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(N, N, bias=False)

    cfg_cls = LoHaConfig if method == "loha" else LoKrConfig
    torch.manual_seed(0)
    model = get_peft_model(Net(), cfg_cls(r=R, alpha=ALPHA, target_modules=["proj"], init_weights=False))
    layer = model.base_model.model.proj
    params = {k: getattr(layer, k)["default"].detach().numpy().copy()
              for k in layer.adapter_layer_names if "default" in getattr(layer, k)}
    return layer, params, copy.deepcopy


def run(repeat: int) -> str:
    import torch

    torch.set_num_threads(2)
    rows = []
    mem_rows = []
    w_mib = N * N * 4 / 2**20
    for method, mod_cls, cfg_cls in (("loha", loha.LoHaModule, loha.LoHaConfig),
                                     ("lokr", lokr.LoKrModule, lokr.LoKrConfig)):
        layer, params, _ = _peft_layer(method)
        W = layer.base_layer.weight.detach().numpy()  # shares memory with PEFT's weight
        W0 = W.copy()
        mod = mod_cls("proj", cfg_cls(r=R, alpha=ALPHA, init_weights=False), params, Layer.of(W.shape))

        # PEFT and peftmath alternate within each repetition so that both see the same machine load;
        # the best of the repetitions is reported (load only ever adds time)
        Wp = W0.copy()
        times = {k: [] for k in ("peft_merge", "peft_unmerge", "pm_merge", "pm_unmerge", "pm_copy")}
        with torch.no_grad():
            for rep in range(repeat + 1):
                t0 = time.perf_counter()
                layer.merge()
                t1 = time.perf_counter()
                layer.unmerge()
                t2 = time.perf_counter()
                time.sleep(0.05)  # let torch's worker threads go idle before NumPy's BLAS starts
                t2b = time.perf_counter()
                mod.merge(Wp, copy=False)
                t3 = time.perf_counter()
                mod.unmerge(Wp, copy=False)
                t4 = time.perf_counter()
                mod.merge(W0, copy=True)
                t5 = time.perf_counter()
                time.sleep(0.05)
                if rep:  # the first repetition is a warm-up
                    for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2b, t4 - t3, t5 - t4)):
                        times[key].append(dt * 1e3)
        W[...] = W0
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        t_peft_merge, t_peft_unmerge = best["peft_merge"], best["peft_unmerge"]
        t_pm_merge, t_pm_unmerge, t_pm_copy = best["pm_merge"], best["pm_unmerge"], best["pm_copy"]

        # agreement with PEFT's merged weight
        with torch.no_grad():
            layer.merge()
            peft_merged = layer.base_layer.weight.detach().numpy().copy()
            layer.unmerge()
        ours = mod.merge(W0, copy=True).weight
        err = float(np.max(np.abs(ours - peft_merged)))

        peak_inplace = peak_alloc(lambda: mod.merge(Wp, copy=False)) / 2**20
        mod.unmerge(Wp, copy=False)
        peak_copy = peak_alloc(lambda: mod.merge(W0, copy=True)) / 2**20
        peak_full = peak_alloc(lambda: mod.delta_weight()) / 2**20

        name = "LoHa" if method == "loha" else "LoKr"
        rows.append(f"| {name} | merge | {t_peft_merge:.1f} | {t_pm_merge:.1f} | {t_peft_merge / t_pm_merge:.1f}x |"
                    f" {med['peft_merge'] / med['pm_merge']:.1f}x | {t_pm_copy:.1f} |")
        rows.append(f"| {name} | unmerge | {t_peft_unmerge:.1f} | {t_pm_unmerge:.1f} |"
                    f" {t_peft_unmerge / t_pm_unmerge:.1f}x | {med['peft_unmerge'] / med['pm_unmerge']:.1f}x | |")
        mem_rows.append(f"| {name} | {peak_inplace:.2f} | {peak_copy:.1f} | {peak_full:.1f} | {err:.1e} |")
        print(rows[-2], rows[-1], mem_rows[-1], sep="\n", file=sys.stderr)

    body = [
        "## LoHa and LoKr merge / unmerge (`benchmarks/bench_lycoris.py`, section loha_lokr)",
        "",
        f"Linear({N}, {N}) float32, r={R}, alpha={ALPHA}, init_weights=False; torch.set_num_threads(2); "
        f"best of {repeat} alternating runs after a warm-up (median ratio alongside). PEFT: `layer.merge()` / `layer.unmerge()` "
        f"(`W.data += get_delta_weight()`). peftmath: `Module.merge/unmerge(W, copy=False)` on NumPy "
        f"(ΔW built in row blocks of ~{loha.BLOCK_ELEMENTS} elements and added in place), NumPy's BLAS on "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} thread(s).",
        "",
        "| method | op | PEFT ms | peftmath ms (in place) | speed-up (best) | speed-up (median) |"
        " peftmath ms (copy=True) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Peak extra allocation (tracemalloc, MiB; W itself is {w_mib:.0f} MiB):",
        "",
        "| method | merge copy=False | merge copy=True | full ΔW (`delta_weight()`, as PEFT builds it) |"
        " max abs diff vs PEFT merge |",
        "|---|---|---|---|---|",
        *mem_rows,
        "",
        "copy=False allocates no temporary of W's size for either method (only one row block of ΔW at a "
        "time); copy=True allocates the result only. PEFT allocates the full ΔW (and LoKr's `kron` "
        "product plus its scaled copy) for every merge and unmerge.",
        "",
        f"Machine: {machine_line()}",
    ]
    return "\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()
    text = run(args.repeat)
    print(text)
    if not args.no_write:
        write_section("loha_lokr", text)


if __name__ == "__main__":
    main()
