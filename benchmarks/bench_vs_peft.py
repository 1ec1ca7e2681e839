#!/usr/bin/env python
"""Every method's merge and unmerge against PEFT's own, on one ``Linear(4096, 4096)`` float32 layer.

Issues 18 and 19: each method's merge at least 2x faster than PEFT's (``peft_time / peftmath_time >= 2``)
where PEFT merges at all. The methods are not listed here: the script walks the registry
(:func:`peftmath.methods.implemented_methods`) and takes each method's first ``METHOD.examples`` config,
with the sizes below (:data:`SIZES`) raised to what a user merges (r = 16, OFT blocks of 32, ...), so a
method added later is measured without an edit (its example config as is, marked "example size")::

    python benchmarks/bench_vs_peft.py               # every method (a few minutes on 2 cores)
    python benchmarks/bench_vs_peft.py --only LORA,OFT
    python benchmarks/bench_vs_peft.py --quick       # 2 rounds: a smoke run
    python benchmarks/bench_vs_peft.py --no-write    # print the section, leave RESULTS.md alone

Per method, PEFT's model is ``get_peft_model`` of a one-layer torch model (``_results.one_linear``) with
every trainable tensor perturbed by ``N(0, 0.02²)`` (no adapter is a no-op), saved with
``save_pretrained`` and read back by ``peftmath.load_adapter``. The contestants run round-robin in one
process (``_results.race``), each call on a weight reset beforehand (untimed):

* ``peft merge``: the PEFT layer's ``merge()`` (its base weight reset to W, nothing merged);
* ``peft unmerge``: its ``unmerge()`` (the base weight reset to PEFT's merged weight, marked merged);
* ``pm merge`` / ``pm unmerge``: peftmath's in-place ``ModuleAdapter.merge(W, copy=False)`` /
  ``unmerge`` on a NumPy weight;
* ``pm merge copy``: the default ``merge(W)`` (``copy=True``; a new array);
* for the methods of :data:`DECOMPOSE_AT_LOAD` (PEFT decomposes W when it loads the adapter, peftmath when it
  merges): ``peft load+merge`` (``PeftModel.from_pretrained`` on a fresh layer holding W, then ``merge()``)
  against ``pm load+merge`` (``load_adapter`` then the in-place merge); that ratio decides their target.

The ratios are medians over rounds of PEFT's time over peftmath's (above 1: peftmath is faster). Before
timing, peftmath's merged weight is compared with PEFT's (the largest difference relative to max|W| is
printed; a row whose numbers differ by more than 1e-4 is marked, its timing is still given). Where PEFT
has no merge (it raises), the row says so and only peftmath's times are given. The section "vs_peft" of
``benchmarks/RESULTS.md`` receives the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

THREADS = 2
THREAD_NOTE = _results.limit_threads(THREADS)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402

from _results import race  # noqa: E402

N = 4096
TARGET = 2.0
PERTURB = 0.02
#: idle seconds before each timed call (_results.race: OpenBLAS's and torch's workers spin after a threaded call)
SETTLE = 0.15

#: the benchmark's sizes, over each method's first example config (the examples are tiny, for tests)
SIZES: dict[str, dict] = {
    "LORA": {"r": 16, "lora_alpha": 32},
    "ADALORA": {"init_r": 16, "target_r": 16, "lora_alpha": 32},
    "IA3": {"feedforward_modules": []},
    "LOHA": {"r": 16, "alpha": 32},
    "LOKR": {"r": 16, "alpha": 32},
    "OFT": {"oft_block_size": 32},
    "BOFT": {"boft_block_size": 32},
    "VERA": {"r": 256},
    "HRA": {"r": 8},
    "ROAD": {"group_size": 64},
    "FOURIERFT": {"n_frequency": 1000},
    "HIRA": {"r": 16},
    "MISS": {"r": 64},
    "DELORA": {"r": 16},
    "VBLORA": {"r": 16, "num_vectors": 256, "vector_length": 256},
    "RANDLORA": {"r": 32},
    "C3A": {"block_size": 256},
    "SHIRA": {"r": 32},
    "WAVEFT": {"n_frequency": 1000},
    "OSF": {"effective_rank": 16},
    "DEFT": {"r": 16},
    "SUPERTUNING": {"sparsity": 0.99},  # PEFT's default
    "GRALORA": {"r": 32},
    "PVERA": {"r": 256},
    "PEANUT": {"r": 32},
}


#: methods whose PEFT layer decomposes the base weight when the adapter is loaded (``update_layer``), so that
#: PEFT's ``merge()`` is only the products while peftmath's merge computes the decomposition: for these the
#: like-for-like comparison is "load the adapter onto W, then merge" on both sides (extra columns)
DECOMPOSE_AT_LOAD = ("OSF", "PSOFT", "FROD", "ADAMSS")


def _peft_layer(peft_type: str, config: dict, seed: int):
    """PEFT's adapted one-layer model and its adapter layer, trainable tensors perturbed."""
    import torch
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_model

    torch.manual_seed(seed)
    model = _results.one_linear(N, N, bias=True)  # a bias: BEFT merges into it, the others leave it
    cfg = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](target_modules=["lin"], **config)
    pm = get_peft_model(model, cfg)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, PERTURB, tuple(p.shape)).astype(np.float32)).to(p.dtype))
    return pm, pm.base_model.model.lin


def measure(peft_type: str, repeats: int, seed: int = 0) -> dict:
    """One method's row: times, ratios and the agreement with PEFT."""
    import torch

    import peftmath as pm_lib
    from peftmath.methods import describe_method

    method = describe_method(peft_type)
    if not method.examples:  # forward-only (Lily): the mixture depends on the input, nothing to merge
        return {"method": peft_type, "sized": False, "config": {}, "error": "forward only: merges refused, as PEFT"}
    label, example = next(iter(method.examples.items()))
    config = dict(example) | SIZES.get(peft_type, {})
    row = {"method": label, "sized": peft_type in SIZES, "config": config}
    peft_model, layer = _peft_layer(peft_type, config, seed)
    W0t = layer.base_layer.weight.detach().clone()
    b0t = layer.base_layer.bias.detach().clone()
    W0, b0 = W0t.numpy().copy(), b0t.numpy().copy()
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    peft_model.save_pretrained(tmp)
    adapter = pm_lib.load_adapter(tmp)
    mod = adapter.module("lin", weight_shape=W0.shape, kind="Linear")

    def peft_reset():
        layer.base_layer.weight.data.copy_(W0t)
        layer.base_layer.bias.data.copy_(b0t)
        layer.merged_adapters.clear()

    try:
        with torch.no_grad():
            peft_reset()
            layer.merge()
        Wm_t = layer.base_layer.weight.detach().clone()
        peft_merges = True
    except Exception as exc:  # PEFT cannot merge this method: only peftmath's times
        row["peft_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        peft_merges = False

    W, b = np.empty_like(W0), np.empty_like(b0)
    try:
        ours = mod.merge(W0.copy(), b0.copy())
    except pm_lib.errors.PeftMathError as exc:  # refused, not guessed (AdaMSS: a k-means near tie on 4096 rows)
        row["error"] = f"peftmath refuses: {type(exc).__name__}: {str(exc)[:160]}"
        return row
    merged, merged_b, record = np.asarray(ours.weight), np.asarray(ours.bias), ours.record
    scale = float(np.max(np.abs(W0)))
    row["change"] = max(float(np.max(np.abs(merged - W0))), float(np.max(np.abs(merged_b - b0)))) / scale
    if peft_merges:  # relative to the merged weight's scale (an adapter may change W by far more than W's size)
        big = max(scale, float(np.max(np.abs(merged))))
        row["diff"] = max(float(np.max(np.abs(merged - Wm_t.numpy()))),
                          float(np.max(np.abs(merged_b - layer.base_layer.bias.detach().numpy())))) / big

    def reset(w, bias):
        np.copyto(W, w)
        np.copyto(b, bias)

    contestants = {
        "pm merge": (lambda: mod.merge(W, b, copy=False), lambda: reset(W0, b0)),
        "pm merge copy": (lambda: mod.merge(W0, b0), None),
        "pm unmerge": (lambda: mod.unmerge(W, b, record=record, copy=False), lambda: reset(merged, merged_b)),
    }
    if peft_merges:
        def peft_merge():
            with torch.no_grad():
                layer.merge()

        bm_t = layer.base_layer.bias.detach().clone()

        def peft_unmerge_reset():
            layer.base_layer.weight.data.copy_(Wm_t)
            layer.base_layer.bias.data.copy_(bm_t)
            layer.merged_adapters[:] = ["default"]

        def peft_unmerge():
            with torch.no_grad():
                layer.unmerge()

        contestants["peft merge"] = (peft_merge, peft_reset)
        try:
            peft_unmerge_reset()
            peft_unmerge()
            contestants["peft unmerge"] = (peft_unmerge, peft_unmerge_reset)
        except Exception as exc:
            row["peft_unmerge_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    if peft_merges and peft_type in DECOMPOSE_AT_LOAD:
        from peft import PeftModel

        def peft_load_merge():  # a fresh base layer holding W, the adapter loaded onto it, merged
            with torch.no_grad():
                base = _results.one_linear(N, N, bias=True)
                base.lin.weight.copy_(W0t)
                base.lin.bias.copy_(b0t)
                PeftModel.from_pretrained(base, tmp).base_model.model.lin.merge()

        def pm_load_merge():
            pm_lib.load_adapter(tmp).module("lin", weight_shape=W0.shape, kind="Linear").merge(W, b, copy=False)

        contestants["peft load+merge"] = (peft_load_merge, None)
        contestants["pm load+merge"] = (pm_load_merge, lambda: reset(W0, b0))
    try:  # peftmath's in-place unmerge may refuse a drawn adapter (HiRA: an entry of 1 + B·A exactly 0)
        reset(merged, merged_b)
        mod.unmerge(W, b, record=record, copy=False)
    except pm_lib.errors.PeftMathError as exc:
        row["pm_unmerge_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        del contestants["pm unmerge"]
        contestants.pop("peft unmerge", None)
    try:
        times, rounds = race(contestants, repeats=repeats, settle=SETTLE)
    except Exception as exc:  # e.g. a refused in-place unmerge
        if "peft unmerge" not in contestants:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:100]}"
            return row
        # PEFT's unmerge of a method that caches at merge time (PEANuT, FRoD) fails on a weight reset to the
        # merged one without its merge having run: time the merges only
        row["peft_unmerge_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        del contestants["peft unmerge"]
        try:
            times, rounds = race(contestants, repeats=repeats, settle=SETTLE)
        except Exception as exc2:
            row["error"] = f"{type(exc2).__name__}: {str(exc2)[:100]}"
            return row
    row["ms"] = times
    if "peft merge" in times:
        row["merge_speedup"] = statistics.median(r["peft merge"] / r["pm merge"] for r in rounds)
        row["merge_copy_speedup"] = statistics.median(r["peft merge"] / r["pm merge copy"] for r in rounds)
    if "peft load+merge" in times:
        row["load_merge_speedup"] = statistics.median(r["peft load+merge"] / r["pm load+merge"] for r in rounds)
    if "peft unmerge" in times:
        row["unmerge_speedup"] = statistics.median(r["peft unmerge"] / r["pm unmerge"] for r in rounds)
    return row


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def section(rows: list[dict], repeats: int) -> str:
    lines = [
        f"Linear({N}, {N}) float32, one layer; peftmath in place (`copy=False`) and default (`copy=True`) vs "
        f"PEFT 0.21.2's layer `merge()` / `unmerge()` (torch CPU); {THREAD_NOTE}; median of per-round ratios "
        f"over {repeats} round-robin rounds, each call after {SETTLE:g} s idle; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the end. "
        f"Speed-up = PEFT's time / peftmath's (target ≥ {TARGET:g} for the merge, issues 18/19).",
        "",
        "| method | config | PEFT merge ms | pm merge ms | speed-up | copy=True speed-up | PEFT unmerge ms "
        "| pm unmerge ms | speed-up | max diff / max abs W' (max change / max abs W) | merge target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r.get("ms", {})
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("init_weights", "init_lora_weights"))
        if not r["sized"]:
            cfg += " (example size)"
        if "error" in r:
            lines.append(f"| {r['method']} | {cfg} | error: {r['error']} |||||||||")
            continue
        if "peft_error" in r:
            verdict = f"PEFT cannot merge ({r['peft_error']})"
        else:
            s = r["merge_speedup"]
            verdict = "met" if s >= TARGET else "**missed**"
            if "load_merge_speedup" in r:  # PEFT decomposes W at load: load + merge on both sides decides
                ls = r["load_merge_speedup"]
                verdict = (f"load + merge: PEFT {ms['peft load+merge']:.0f} ms, peftmath {ms['pm load+merge']:.0f} "
                           f"ms, {ls:.2f}x: {'met' if ls >= TARGET else '**missed**'}")
        unmerge_note = r.get("peft_unmerge_error")
        if r.get("pm_unmerge_error"):
            verdict += f" (unmerge not timed: peftmath refuses this draw, {r['pm_unmerge_error']})"
        lines.append(
            f"| {r['method']} | {cfg} | {_fmt(ms.get('peft merge'), '.1f')} | {_fmt(ms.get('pm merge'), '.1f')} "
            f"| {_fmt(r.get('merge_speedup'))} | {_fmt(r.get('merge_copy_speedup'))} "
            f"| {_fmt(ms.get('peft unmerge'), '.1f') if not unmerge_note else 'PEFT raises'} "
            f"| {_fmt(ms.get('pm unmerge'), '.1f')} | {_fmt(r.get('unmerge_speedup'))} "
            f"| {_fmt(r.get('diff'), '.1e')}{' **differs**' if (r.get('diff') or 0) > 1e-4 else ''} "
            f"({_fmt(r.get('change'), '.1e')}) | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated PEFT types (e.g. LORA,OFT)")
    ap.add_argument("--quick", action="store_true", help="2 rounds per method")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", help="write an --only run to this RESULTS.md section (e.g. vs_peft_load for "
                                      "--only OSF,PSOFT,FROD,ADAMSS, whose load + merge rounds take minutes)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    from peftmath.methods import describe_method, implemented_methods

    types = [t for t in implemented_methods() if not describe_method(t).prompt_learning]
    if args.only:
        wanted = {t.strip().upper() for t in args.only.split(",")}
        types = [t for t in types if t in wanted]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for t in types:
        try:
            row = measure(t, repeats)
        except Exception as exc:  # one method's failure must not hide the others' numbers
            row = {"method": t, "sized": t in SIZES, "config": SIZES.get(t, {}),
                   "error": f"{type(exc).__name__}: {str(exc)[:100]}"}
        rows.append(row)
        print(t, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "config"},
              flush=True)
    text = section(rows, repeats)
    print(text)
    if not args.no_write and not args.only and not args.quick:
        _results.write_section("vs_peft", "## Every method vs PEFT: merge / unmerge (`benchmarks/bench_vs_peft.py`)\n\n"
                               + text)
    elif not args.no_write and args.section:
        _results.write_section(args.section, f"## vs PEFT, {args.only} (`benchmarks/bench_vs_peft.py --only "
                                             f"{args.only} --section {args.section}`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
