#!/usr/bin/env python
"""Mixed-batch multi-adapter forward: peftmath's segmented mixed batch vs PEFT's ``adapter_names`` path.

One ``Linear(4096, 4096)`` float32 with 16 LoRA adapters (r = 16); a batch of 64 rows, each naming one
adapter (uniformly at random, a few ``"__base__"``), measured side by side in one process, 2 threads::

    python benchmarks/bench_multi.py [--quick]

Timed, round-robin with a warm-up: PEFT's forward with ``adapter_names`` on a one-Linear model;
peftmath's mixed batch through an ``AdapterSet`` (as a server holds its adapters: each adapter's module
bound and its factors prepared once, on the first call); a plain loop over the adapters in the batch
(NumPy, rows grouped per adapter, as PEFT does); and the base layer alone (``x W^T + b``; on NumPy over
the flattened ``(64·L, 4096)`` tokens, one gemm, as peftmath computes it: NumPy's matmul on the
``(64, L, 4096)`` stack runs one product per row, each reading all of ``W``), so that the adapter terms'
own cost (total minus base) can be compared too. Section "multi" of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._results import machine_line, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch
    import peft

    import peftmath as pm
    from peftmath.adapter import Adapter
    from peftmath.multi import AdapterSet

    torch.set_num_threads(2)
    n, rank, n_adapters, rows = 4096, 16, 16, 64
    rounds = 3 if args.quick else 10
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((n, n)) / 64).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    names = [f"a{i}" for i in range(n_adapters)]
    factors = {nm: ((rng.standard_normal((rank, n)) / 64).astype(np.float32),
                    (rng.standard_normal((n, rank)) / 64).astype(np.float32)) for nm in names}
    ours = {nm: Adapter(pm.LoraConfig(r=rank, lora_alpha=32, target_modules=["lin"]),
                        {"lin": {"lora_A.weight": A, "lora_B.weight": B}}) for nm, (A, B) in factors.items()}
    state = {"lin.weight": W, "lin.bias": b}
    # the same adapters on torch tensors: peftmath's array-API code running on PEFT's own library
    ours_t = {nm: Adapter(a.config, {"lin": {k: torch.from_numpy(v) for k, v in a.params["lin"].items()}})
              for nm, a in ours.items()}
    state_t = {k: torch.from_numpy(v) for k, v in state.items()}
    batch_names = list(rng.choice(names + ["__base__"], rows))
    served, served_t = AdapterSet(ours), AdapterSet(ours_t)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.from_numpy(W))
        net.lin.bias.copy_(torch.from_numpy(b))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(net, peft.LoraConfig(r=rank, lora_alpha=32, target_modules=["lin"]),
                                     adapter_name=names[0])
        for nm in names[1:]:
            pmodel.add_adapter(nm, peft.LoraConfig(r=rank, lora_alpha=32, target_modules=["lin"]))
        for nm in names:
            layer = pmodel.base_model.model.lin
            with torch.no_grad():
                layer.lora_A[nm].weight.copy_(torch.from_numpy(factors[nm][0]))
                layer.lora_B[nm].weight.copy_(torch.from_numpy(factors[nm][1]))
    pmodel.eval()

    lines = ["## Mixed-batch forward: 64 rows over 16 LoRA adapters (r = 16), Linear(4096, 4096) float32", "",
             f"Script: `benchmarks/bench_multi.py`. Machine: {machine_line()}; torch.set_num_threads(2), "
             "OPENBLAS_NUM_THREADS=2. peftmath through an `AdapterSet` (modules and factors prepared on the first "
             "call); the NumPy base layer over the flattened tokens (one gemm).", "",
             "| tokens per row | PEFT `adapter_names` (torch) ms | peftmath (segmented) on torch ms | base layer alone "
             "(torch) ms | PEFT / peftmath (total) | PEFT / peftmath (adapter terms: total − base) | peftmath on NumPy ms "
             "| loop over adapters (NumPy) ms | base layer alone (NumPy) ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seq in (1, 16):
        x = rng.standard_normal((rows, seq, n)).astype(np.float32)
        xt = torch.from_numpy(x)

        def run_peft():
            with torch.no_grad():
                return pmodel(xt, adapter_names=batch_names)

        def run_ours():
            return served.mixed_batch_forward("lin", x, state, batch_names)

        def run_ours_torch():
            with torch.no_grad():
                return served_t.mixed_batch_forward("lin", xt, state_t, batch_names)

        def run_base_torch():
            with torch.no_grad():
                return torch.nn.functional.linear(xt, state_t["lin.weight"], state_t["lin.bias"])

        def run_loop():
            y = run_base()
            for nm in set(batch_names) - {"__base__"}:
                idx = [i for i, v in enumerate(batch_names) if v == nm]
                A, B = factors[nm]
                y[idx] += (x[idx] @ A.T) @ B.T * 2.0
            return y

        def run_base():
            return (x.reshape(-1, n) @ W.T + b).reshape(x.shape)

        np.testing.assert_allclose(np.asarray(run_ours()), run_peft().numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(run_ours_torch().numpy(), run_peft().numpy(), rtol=1e-3, atol=1e-3)
        names = ("peft", "ours_t", "base_t", "ours", "loop", "base")
        times: dict[str, list[float]] = {k: [] for k in names}
        fns = {"peft": run_peft, "ours_t": run_ours_torch, "base_t": run_base_torch, "ours": run_ours,
               "loop": run_loop, "base": run_base}
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio_total = med["peft"] / med["ours_t"]
        terms_peft, terms_ours = med["peft"] - med["base_t"], med["ours_t"] - med["base_t"]
        ratio_terms = f"{terms_peft / terms_ours:.2f}x" if terms_ours > 0.05 * med["base_t"] else "n/a (within noise)"
        lines.append(f"| {seq} | {med['peft']:.2f} | {med['ours_t']:.2f} | {med['base_t']:.2f} | {ratio_total:.2f}x | "
                     f"{ratio_terms} | {med['ours']:.2f} | {med['loop']:.2f} | {med['base']:.2f} |")
    lines += ["", "Target: at least 2x faster than PEFT's `adapter_names` path. The whole layer includes the base "
              "matmul (64·L × 4096 × 4096), the same for both, which bounds the total ratio near 1; the adapter terms' "
              "own cost (total − base) is the part a mixed-batch method can change."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("multi", text)


if __name__ == "__main__":
    main()
