"""Issues 6 and 20 benchmark: `peftmath merge` of a sharded model, side by side with `cp` (+ fsync) and PEFT.

Two models, each in shards with its index, and a LoRA r=16 adapter (alpha 32, random non-zero B) on every
linear layer (PEFT's "all-linear": q/k/v/o, gate/up/down):

- bfloat16: a random LlamaForCausalLM (hidden 1024, intermediate 2816, 22 layers, vocab 16384; about 316M
  parameters, 603 MiB) saved by transformers in 200 MB shards;
- float32: the same shapes with 12 layers (about 190M parameters, 730 MiB), 200 MB shards.

Each contender runs in its own child process (2 threads: OMP/OpenBLAS/MKL and torch.set_num_threads),
timed from start to exit, peak resident memory from the child's own VmHWM:

- peftmath: ``python -m peftmath.cli merge BASE ADAPTER -o OUT`` (streamed, pipelined);
- peftmath (baseline): the same command run from another checkout (``--baseline DIR``, e.g. a ``git
  worktree`` of the commit before a change; its output must be byte-identical);
- PEFT (bfloat16 model only): ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained`` (torch CPU), the usual recipe;
- copy: ``shutil.copytree(BASE, OUT)``; copy+fsync ("the durable copy"): the same, then ``fsync`` of each
  file, the floor for a tool whose output must be on disk when it exits (peftmath fsyncs every shard);
- peftmath's fixed cost: ``merge --dry-run`` of the same model (start-up, imports, reading the headers and
  the adapter, the plan; no tensor data), so that the rest of the merge's time is its data path.

The section opens with the issue 20 targets, one row per model: merge / durable copy <= 1.5x and peak RSS
<= 25% of the model, met or missed.

peftmath's modules run from cached bytecode, as an installed package's do (``--no-bytecode-cache``: compiled in
every run, as under PYTHONDONTWRITEBYTECODE=1), after one untimed run of each checkout.

Rounds are interleaved (every contender once per round); each ratio is the median over rounds of the
per-round ratio to the durable copy of the same round (that survives a loaded machine better than bare
times). Then the merged tensors of peftmath and PEFT are compared (max difference in bf16 ulps,
bit-identical count; also with --peft-compat).

    python benchmarks/bench_cli.py            # ~3 minutes, at most 3.2 GB of disk under benchmarks/_out/cli
    python benchmarks/bench_cli.py --baseline /tmp/base   # also the checkout at /tmp/base, side by side
    python benchmarks/bench_cli.py --quick    # 2 rounds, no PEFT, RESULTS.md untouched (~1 minute)
    python benchmarks/bench_cli.py --small    # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
#: compiled bytecode of the checkouts measured, as an installed package has it (pip compiles at install): kept
#: here, outside the source tree; a sandbox's PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every peftmath
#: module in every run (about 0.1 s of each command's start-up). --no-bytecode-cache measures that instead.
PYCACHE = HERE / "_out" / "pycache"


def use_bytecode_cache(on: bool) -> None:
    if on:
        ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        ENV["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    else:
        ENV["PYTHONDONTWRITEBYTECODE"] = "1"
        ENV.pop("PYTHONPYCACHEPREFIX", None)

PEFT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
from transformers import AutoModelForCausalLM
from peft import PeftModel
t1 = time.perf_counter()
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
t2 = time.perf_counter()
model = model.merge_and_unload()
t3 = time.perf_counter()
model.save_pretrained(out, max_shard_size="200MB", safe_serialization=True)
t4 = time.perf_counter()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "merge": t3 - t2, "save": t4 - t3, "hwm_kb": int(hwm)}))
"""

COPY_CHILD = r"""
import json, shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"hwm_kb": int(hwm)}))
"""

COPY_SYNC_CHILD = r"""
import json, os, shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
for name in os.listdir(sys.argv[2]):
    fd = os.open(os.path.join(sys.argv[2], name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"hwm_kb": int(hwm)}))
"""

PEFTMATH_CHILD = r"""
import json, sys
from peftmath.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"hwm_kb": int(hwm)}))
sys.exit(rc)
"""


def generate(work: Path, small: bool, dtype: str = "bfloat16") -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "lora-r16"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    layers = {"bfloat16": 22, "float32": 12}[dtype]
    if small:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                          num_key_value_heads=16, vocab_size=16384, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(base, max_shard_size="200MB" if not small else "5MB", safe_serialization=True)
    lcfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lcfg)
    peft_model.save_pretrained(adapter, safe_serialization=True)
    return base, adapter


def run_child(argv: list[str], pythonpath: str | None = None) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS in MiB, stdout, CPU seconds) of a child process, with ``pythonpath`` first on its
    path (run from that folder, so that its ``peftmath`` is the one imported). CPU seconds: user + system time
    of the child and its threads (its rusage).

    The peak is the child's own VmHWM, printed by it at exit as JSON on its last stdout line (the
    rusage of a forked child would include the parent's memory at fork time).
    """
    env = {**ENV, "PYTHONPATH": pythonpath or str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=pythonpath or str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    hwm = json.loads(out.strip().splitlines()[-1])["hwm_kb"] if out.strip() else usage.ru_maxrss
    return wall, hwm / 1024.0, out, usage.ru_utime + usage.ru_stime


def compare(a: Path, b: Path) -> tuple[int, int, int, int, float]:
    """(bit-identical tensors, tensors, differing elements, elements, max |a - b| / max |b| per tensor)."""
    from peftmath.io.stream import open_model

    ma, mb = open_model(a), open_model(b)
    same = diff_el = n_el = 0
    worst = 0.0
    keys = ma.keys()
    for k in keys:
        x, y = ma.read(k), mb.read(k)
        n_el += x.size
        if x.tobytes() == y.tobytes():
            same += 1
            continue
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        diff_el += int(np.sum(xf != yf))
        worst = max(worst, float(np.max(np.abs(xf - yf)) / max(np.max(np.abs(yf)), 1e-30)))
    return same, len(keys), diff_el, n_el, worst


def dir_bytes(p: Path) -> int:
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


def tree_sha(p: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for q in sorted(p.iterdir()):
        h = hashlib.sha256()
        with open(q, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[q.name] = h.hexdigest()
    return out


def rounds(cmds: dict, outs: dict, repeats: int, label: str, keep: set[str], baseline: str | None,
           after_run=None) -> dict[str, dict]:
    """Run every contender once per round, interleaved; per contender: wall times, peak RSS (MiB) and the
    per-round ratio to the durable copy ("copy+fsync"). ``after_run(name, round)`` runs after each run,
    while its output exists; outputs not in ``keep`` are removed right after it (disk)."""
    res = {k: {"wall": [], "rss": [], "ratio": [], "cpu": []} for k in cmds}
    for rep in range(repeats):
        walls = {}
        for name, cmd in cmds.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            wall, rss, out, cpu = run_child(cmd(outs[name]), baseline if name == "baseline" else None)
            walls[name] = wall
            res[name]["cpu"].append(cpu)
            res[name]["wall"].append(wall)
            res[name]["rss"].append(rss)
            res[name].setdefault("stdout", []).append(out)
            print(f"  {label} run {rep + 1} {name:10s} {wall:7.2f} s  peak RSS {rss:8.0f} MiB", file=sys.stderr)
            if after_run is not None:
                after_run(name, rep)
            if name not in keep:
                shutil.rmtree(outs[name], ignore_errors=True)
        for name in cmds:
            res[name]["ratio"].append(walls[name] / walls["copy+fsync"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models, to check the script")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "_out" / "cli")
    ap.add_argument("--baseline", help="a checkout of peftmath (e.g. `git worktree add /tmp/base HEAD`) to time "
                                       "side by side; its output must be byte-identical")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's merge (the slowest contender)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="2 rounds, no PEFT, no --dry-run row; implies --no-write")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="compile peftmath's modules in every run (PYTHONDONTWRITEBYTECODE=1) instead of caching "
                         "their bytecode under benchmarks/_out/pycache as an installed package has it")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.no_peft, args.no_write = min(args.repeats, 2), True, True
    suffix = "small" if args.small else ""
    works = {"bfloat16": args.work / (f"llama300m{suffix and '-small'}"),
             "float32": args.work / (f"llama-f32{suffix and '-small'}")}
    t0 = time.perf_counter()
    if args.generate_only:
        generate(works[args.dtype], args.small, args.dtype)
        return
    for dt, work in works.items():
        if (work / "base" / "model.safetensors.index.json").exists() and (work / "lora-r16" / "adapter_model.safetensors").exists():
            continue  # generated by an earlier run (torch and transformers take ~15 s to import)
        subprocess.run([sys.executable, __file__, "--generate-only", "--work", str(args.work), "--dtype", dt]
                       + (["--small"] if args.small else []), check=True, env=ENV)
    baseline = str(Path(args.baseline).resolve()) if args.baseline else None
    py = sys.executable
    use_bytecode_cache(not args.no_bytecode_cache)
    from peftmath.io.stream import open_model

    sections = []
    summary = {}
    target_rows = []
    for dt, work in works.items():
        base, adapter = work / "base", work / "lora-r16"
        print(f"{dt} model ready ({time.perf_counter() - t0:.1f} s): {base} ({dir_bytes(base) / 2**20:.0f} MiB)",
              file=sys.stderr)
        m = open_model(base)
        n_params = sum(int(np.prod(m.shape(k))) for k in m.keys())
        n_shards = len(m.files)
        size_mib = dir_bytes(base) / 2**20
        outs = {name: work / f"out-{name}" for name in ("peftmath", "baseline", "peft", "copy", "copy+fsync",
                                                        "compat", "dry-run")}
        merge = lambda o: [py, "-c", PEFTMATH_CHILD, "merge", str(base), str(adapter), "-o", str(o), "-q"]
        cmds = {"peftmath": merge}
        if baseline:
            cmds["baseline"] = merge
        if not args.quick:
            cmds["dry-run"] = lambda o: merge(o) + ["--dry-run"]
        with_peft = dt == "bfloat16" and not args.no_peft
        if with_peft:
            cmds["peft"] = lambda o: [py, "-c", PEFT_CHILD, str(base), str(adapter), str(o)]
        cmds["copy"] = lambda o: [py, "-c", COPY_CHILD, str(base), str(o)]
        cmds["copy+fsync"] = lambda o: [py, "-c", COPY_SYNC_CHILD, str(base), str(o)]
        checks = {}

        def after_run(name, rep, checks=checks, base=base, outs=outs):
            if rep == 0 and name == "copy":
                checks["untouched"] = compare(outs["copy"], base)[:2]
            if rep == 0 and name == "baseline":  # (peftmath ran just before)
                checks["identical"] = tree_sha(outs["peftmath"]) == tree_sha(outs["baseline"])

        for name in ("peftmath", "baseline"):  # a first run of each checkout (writes its bytecode cache)
            if name in cmds:
                shutil.rmtree(outs["dry-run"], ignore_errors=True)
                run_child(merge(outs["dry-run"]) + ["--dry-run"], baseline if name == "baseline" else None)
        res = rounds(cmds, outs, args.repeats, dt, {"peftmath", "peft"}, baseline, after_run)
        med = {k: {f: statistics.median(v[f]) for f in ("wall", "rss", "ratio", "cpu")} for k, v in res.items()}
        model_mib = size_mib
        lines = [f"### {dt}: {n_params / 1e6:.0f}M parameters, {n_shards} shards ({size_mib:.0f} MiB)", "",
                 "| contender | wall time | CPU time (user + system) | peak RSS | RSS / model "
                 "| vs copy+fsync (median of per-round ratios) |",
                 "|---|---|---|---|---|---|"]
        names = {"peftmath": "peftmath merge (streamed, pipelined)",
                 "baseline": f"peftmath merge, baseline checkout (`{Path(baseline).name if baseline else ''}`)",
                 "peft": "PEFT merge_and_unload + save_pretrained", "copy": "plain copy (shutil.copytree)",
                 "copy+fsync": "durable copy: copy + fsync of each file",
                 "dry-run": "peftmath merge --dry-run (fixed cost: start-up, headers, adapter, plan)"}
        for k, v in med.items():
            lines.append(f"| {names[k]} | {v['wall']:.2f} s | {v['cpu']:.2f} s | {v['rss']:.0f} MiB "
                         f"| {v['rss'] / model_mib:.1%} "
                         f"| {v['ratio']:.2f}x |")
        pr = med["peftmath"]
        target = (f"Targets (issue 20): <= 1.5x the durable copy: {'met' if pr['ratio'] <= 1.5 else 'MISSED'} "
                  f"({pr['ratio']:.2f}x); peak RSS <= 25% of the model: "
                  f"{'met' if pr['rss'] <= 0.25 * model_mib else 'MISSED'} ({pr['rss'] / model_mib:.1%}).")
        if baseline:
            target += (f" Baseline: {med['baseline']['ratio']:.2f}x; output byte-identical to the baseline's: "
                       f"{'yes' if checks['identical'] else 'NO'}.")
        lines += ["", target]
        summary[dt] = (pr["ratio"], pr["rss"] / model_mib, med.get("baseline", {}).get("ratio"))
        target_rows.append(
            f"| {dt} | {n_params / 1e6:.0f}M, {size_mib:.0f} MiB | {pr['ratio']:.2f}x "
            f"({'met' if pr['ratio'] <= 1.5 else 'MISSED'}) | {pr['rss'] / model_mib:.1%} "
            f"({'met' if pr['rss'] <= 0.25 * model_mib else 'MISSED'}) | "
            + (f"{med['dry-run']['ratio']:.2f}x" if "dry-run" in med else "-")
            + (f" | {med['baseline']['ratio']:.2f}x" if baseline else "") + " |")
        cores = len(os.sched_getaffinity(0))
        lines += ["", f"CPU time: the merge uses {pr['cpu']:.2f} s of CPU (the durable copy "
                      f"{med['copy+fsync']['cpu']:.2f} s). Spread perfectly over this machine's {cores} cores it could "
                      f"not take less than {pr['cpu'] / cores:.2f} s, {pr['cpu'] / cores / med['copy+fsync']['wall']:.2f}x "
                      f"the durable copy's wall time: the lower bound of the ratio for this amount of work."]
        if "dry-run" in med:
            lines += ["", f"Of the merge's {pr['wall']:.2f} s, {med['dry-run']['wall']:.2f} s "
                          f"({med['dry-run']['wall'] / pr['wall']:.0%}) is the fixed cost of the `--dry-run` row "
                          f"(start-up and imports, headers, adapter, plan; no ml_dtypes: a bfloat16 weight stays uint16 bits); the rest "
                          f"is reading, merging, rounding and writing the tensors."]
        if with_peft:
            ph = {k: statistics.median(json.loads(o.strip().splitlines()[-1])[k] for o in res["peft"]["stdout"])
                  for k in ("import", "load", "merge", "save")}
            shutil.rmtree(outs["compat"], ignore_errors=True)
            run_child([py, "-m", "peftmath.cli", "merge", str(base), str(adapter), "-o", str(outs["compat"]), "-q",
                       "--peft-compat"])
            same, total, nd, nel, worst = compare(outs["peftmath"], outs["peft"])
            same_c, _, nd_c, _, worst_c = compare(outs["compat"], outs["peft"])
            tw, tr = med["peft"]["wall"], med["peft"]["rss"]
            lines += [
                "",
                f"PEFT: {tw:.2f} s, {tr:.0f} MiB; peftmath takes {pr['wall'] / tw:.2f}x its time and "
                f"{pr['rss'] / tr:.1%} of its memory (issue 6 targets: <= 1x, <= 25%). PEFT's phases (median): "
                f"import {ph['import']:.1f} s, load {ph['load']:.1f} s, merge {ph['merge']:.1f} s, "
                f"save {ph['save']:.1f} s.",
                "",
                f"Agreement with PEFT's merged model: default (float32 compute, one rounding): {same}/{total} tensors "
                f"bit-identical, {nd} of {nel:,} elements differ, max |difference| / max |W| = {worst:.1e}; "
                f"`--peft-compat` (PEFT's order: delta rounded to bf16, then added): {same_c}/{total} bit-identical, "
                f"{nd_c} elements differ (max {worst_c:.1e})"
                + ("; the differences come from the float32 summation order of B@A (BLAS) flipping a rounding. "
                   if nd or nd_c else ". ")
                + f"(The copy is bit-identical to the base: {checks['untouched'][0]}/{checks['untouched'][1]}.)",
            ]
        else:
            lines += ["", f"(The copy is bit-identical to the base: {checks['untouched'][0]}/{checks['untouched'][1]}.)"]
        sections.append("\n".join(lines))
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)

    from _results import machine_line, write_section

    head = [
        "## cli: `peftmath merge` of a sharded model (issues 6 and 20)",
        "",
        f"Script: `benchmarks/bench_cli.py`{' --small' if args.small else ''} (`--repeats {args.repeats}`"
        f"{', --baseline' if baseline else ''}{', --no-bytecode-cache' if args.no_bytecode_cache else ''}). "
        f"Machine: {machine_line()}; load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        "Adapter: LoRA r=16, alpha 32, random B, on every linear layer (PEFT `all-linear`), models written by "
        "transformers' save_pretrained in 200 MB shards. Each contender runs in its own process with 2 threads; "
        f"{args.repeats} interleaved rounds; wall time from process start to exit (imports included); peak RSS = "
        "the child's VmHWM at exit; ratios = median over rounds of (contender / durable copy of the same round). "
        "peftmath fsyncs each shard before the atomic rename, as the durable copy does. "
        + ("peftmath's modules are compiled in every run (--no-bytecode-cache)." if args.no_bytecode_cache else
           "peftmath's bytecode is cached (as an installed package's is), after one untimed run of each checkout."),
        "",
    ]
    head += ["Issue 20 item 3 targets (merge / durable copy <= 1.5x, peak RSS <= 25% of the model):", "",
             "| model | size | merge / durable copy | peak RSS / model | --dry-run / durable copy |"
             + (" baseline / durable copy |" if baseline else ""),
             "|---|---|---|---|---|" + ("---|" if baseline else ""), *target_rows, ""]
    body = "\n".join(head) + "\n" + "\n\n".join(sections)
    print(body)
    for dt, (ratio, rss, base_ratio) in summary.items():
        print(f"{dt}: {ratio:.2f}x durable copy, peak RSS {rss:.1%} of the model"
              + (f", baseline {base_ratio:.2f}x" if base_ratio is not None else ""), file=sys.stderr)
    if not args.no_write and not args.small:
        write_section("cli", body)


if __name__ == "__main__":
    main()
