#!/usr/bin/env python
"""LoHa and LoKr merge / unmerge: peftmath vs the floor vs PEFT (torch CPU), side by side in one run.

Linear(4096, 4096) float32, r = 16, alpha = 32, init_weights=False (a non-trivial delta), 2 threads
(``_results.limit_threads``)::

    python benchmarks/bench_lycoris.py            # full run (~1 min)
    python benchmarks/bench_lycoris.py --quick    # smoke run (~20 s): 3 rounds

Contestants, round-robin (one call of each per round, the order rotating, after a warm-up round; ms = median
per contestant, ratio = median over rounds of the per-round ratio):

* LoHa's floor, two rank-r gemms plus one elementwise pass: ``np.matmul(s·w1_a, w1_b, out=P1)``,
  ``np.matmul(w2_a, w2_b, out=P2)``, ``np.multiply(P1, P2, out=P1)`` into preallocated buffers;
* one copy of W: ``np.copyto(dst, W)`` into a preallocated ``dst``;
* ``Module.merge/unmerge(W, copy=False)`` (W reset untimed before each call) and ``copy=True`` (the default),
  a bfloat16 W merged in place (reported);
* PEFT's ``layer.merge()`` / ``layer.unmerge()`` (``W.data += get_delta_weight()``).

Targets (issue 20): LoHa in place <= 1.5x its floor; copy=True <= 1.3x (copy + in-place floor) — for LoKr,
whose floor is not written out here, (copy + peftmath's in-place LoKr merge). Peak extra allocation
(``tracemalloc``) of each call. Writes the "loha_lokr" section of RESULTS.md (``--no-write`` prints it only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

# --threads N (default 2, the project's convention) is read before NumPy loads its BLAS
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv[:-1] else 2
THREAD_NOTE = _results.limit_threads(THREADS)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from _results import machine_line, peak_alloc, race, write_section  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import loha, lokr  # noqa: E402

N, R, ALPHA = 4096, 16, 32


def _peft_layer(method: str):
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
    return layer, params


def run(args) -> str:
    import torch

    torch.set_num_threads(THREADS)
    rows, mem_rows = [], []
    w_bytes = N * N * 4
    for method, mod_cls, cfg_cls in (("loha", loha.LoHaModule, loha.LoHaConfig),
                                     ("lokr", lokr.LoKrModule, lokr.LoKrConfig)):
        print(f"[bench_lycoris] {method} ...", file=sys.stderr, flush=True)
        layer, params = _peft_layer(method)
        W0 = layer.base_layer.weight.detach().numpy().copy()
        W = W0.copy()
        dst = np.empty_like(W0)
        Wb0 = W0.astype(ml_dtypes.bfloat16)
        Wb = Wb0.copy()
        mod = mod_cls("proj", cfg_cls(r=R, alpha=ALPHA, init_weights=False), params, Layer.of(W0.shape))

        def reset():
            np.copyto(W, W0)

        c = {
            "copy": (lambda: np.copyto(dst, W0), None),
            "merge": (lambda: mod.merge(W, copy=False), reset),
            "unmerge": (lambda: mod.unmerge(W, copy=False), reset),
            "merge_copy": (lambda: mod.merge(W0), None),
            "unmerge_copy": (lambda: mod.unmerge(W0), None),
            "bf16_merge": (lambda: mod.merge(Wb, copy=False), lambda: np.copyto(Wb, Wb0)),
            "peft_merge": (layer.merge, lambda: layer.merged and layer.unmerge()),
            "peft_unmerge": (layer.unmerge, lambda: (not layer.merged) and layer.merge()),
        }
        if method == "loha":
            s = ALPHA / R
            a1s = (params["hada_w1_a"] * s).astype(np.float32)
            b1, a2, b2 = params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"]
            P1, P2 = np.empty_like(W0), np.empty_like(W0)

            def floor():
                np.matmul(a1s, b1, out=P1)
                np.matmul(a2, b2, out=P2)
                np.multiply(P1, P2, out=P1)

            c["floor"] = (floor, None)
        with torch.no_grad():
            med, rounds = race(c, repeats=args.repeats)
            if layer.merged:
                layer.unmerge()
            layer.merge()
            peft_merged = layer.base_layer.weight.detach().numpy().copy()
            layer.unmerge()
        err = float(np.max(np.abs(mod.merge(W0).weight - peft_merged)))

        def ratio(num, *den):
            return statistics.median(rd[num] / sum(rd[d] for d in den) for rd in rounds)

        name = "LoHa" if method == "loha" else "LoKr"

        def add(what, num, ref_label, den, target):
            value = ratio(num, *den)
            ok = "reported" if target is None else ("met" if value <= target else "**missed**")
            rows.append(f"| {name} | {what} | {med[num]:.1f} | {ref_label} | {sum(med[d] for d in den):.1f} | "
                        f"{value:.2f}x | {'-' if target is None else f'<= {target}x'} | {ok} |")

        if method == "loha":
            add("merge, in place", "merge", "floor", ("floor",), 1.5)
            add("unmerge, in place", "unmerge", "floor", ("floor",), 1.5)
            add("merge, copy=True", "merge_copy", "copy + floor", ("copy", "floor"), 1.3)
            add("unmerge, copy=True", "unmerge_copy", "copy + floor", ("copy", "floor"), 1.3)
            add("merge, bfloat16 W, in place", "bf16_merge", "float32 floor", ("floor",), None)
        else:
            add("merge, copy=True", "merge_copy", "copy + in-place merge", ("copy", "merge"), 1.3)
            add("unmerge, copy=True", "unmerge_copy", "copy + in-place unmerge", ("copy", "unmerge"), 1.3)
            add("merge, bfloat16 W, in place", "bf16_merge", "float32 in-place merge", ("merge",), None)
        add("merge, in place", "merge", "PEFT merge", ("peft_merge",), None)
        add("unmerge, in place", "unmerge", "PEFT unmerge", ("peft_unmerge",), None)
        add("merge, copy=True", "merge_copy", "PEFT merge", ("peft_merge",), None)

        mib = lambda b: f"{b / 2**20:.2f} ({100 * b / w_bytes:.1f}%)"  # noqa: E731
        p_in = peak_alloc(lambda: mod.merge(W, copy=False), setup=reset)
        p_un = peak_alloc(lambda: mod.unmerge(W, copy=False), setup=reset)
        p_cp = peak_alloc(lambda: mod.merge(W0))
        p_bf = peak_alloc(lambda: mod.merge(Wb, copy=False), setup=lambda: np.copyto(Wb, Wb0))
        mem_rows.append(f"| {name} | {mib(p_in)} | {mib(p_un)} | {mib(p_cp)} | {mib(p_bf)} | {err:.1e} |")
        del layer

    body = [
        "## LoHa and LoKr merge / unmerge (`benchmarks/bench_lycoris.py`, section loha_lokr)",
        "",
        f"Linear({N}, {N}) float32, r={R}, alpha={ALPHA}, init_weights=False. Round-robin, {args.repeats} rounds after "
        f"a warm-up round; ms = median per contestant, ratio = median over rounds of the per-round ratio"
        + (" — **--quick run**" if args.quick else "") + ". LoHa's floor: `np.matmul(s·w1_a, w1_b, out=P1)`, "
        "`np.matmul(w2_a, w2_b, out=P2)`, `np.multiply(P1, P2, out=P1)` into preallocated buffers (two rank-r "
        "gemms and one elementwise pass); copy: `np.copyto(dst, W)` into a preallocated dst. PEFT: "
        "`layer.merge()` / `layer.unmerge()` (`W.data += get_delta_weight()`).",
        "",
        f"Machine: {machine_line()}.  ",
        f"Threads: {THREAD_NOTE}. Load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.",
        "",
        "| method | operation | peftmath ms | reference | reference ms | ratio | target | result |",
        "|---|---|---:|---|---:|---:|---|---|",
        *rows,
        "",
        f"Peak extra allocation (tracemalloc, MiB and % of W; W is {w_bytes / 2**20:.0f} MiB float32):",
        "",
        "| method | merge copy=False | unmerge copy=False | merge copy=True | merge copy=False, bfloat16 W |"
        " max abs diff vs PEFT merge |",
        "|---|---|---|---|---|---|",
        *mem_rows,
        "",
        "How: the merges work on row tiles of W. LoHa on NumPy: per tile, `t1 = (s·w1_a)[rows] @ w1_b` and "
        "`t2 = w2_a[rows] @ w2_b` into two buffers reused across tiles, `t1 *= t2`, then "
        "`W[rows] ± t1` in one pass (bfloat16: widened into `t2`, rounded once); tiles of 2^18 / (n·r) rows "
        "(products BLAS runs on the calling thread) spread over the BLAS thread count. LoKr builds each row block of the Kronecker product. copy=True fills the new result from W "
        "block by block (W read once, the result written once; no copy of W first). PEFT allocates the full ΔW "
        "for every merge and unmerge.",
    ]
    return "\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 9, --quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="BLAS / torch threads for every contestant (default 2)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    text = run(args)
    print(text)
    if not args.no_write:
        write_section("loha_lokr", text)


if __name__ == "__main__":
    main()
