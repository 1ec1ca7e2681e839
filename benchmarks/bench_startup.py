"""Start-up of the ``peftmath`` command (issue #20, item 4): ``peftmath --help`` and ``peftmath inspect`` of a
small adapter against a bare ``python -c "import numpy"``, each a fresh interpreter, run round-robin.

Targets: ``peftmath --help`` <= 0.15 s and ``peftmath inspect`` of a small adapter <= 0.4 s end to end.
Each command runs as the console script does (``from peftmath.cli import main; sys.exit(main())``) with
this checkout first on ``PYTHONPATH`` (so an editable install elsewhere does not decide what is
measured), in the interpreter running this script (not a pyenv shim, whose own start-up would dominate).
``--compare DIR`` times another checkout of peftmath (e.g. ``git worktree add /tmp/base HEAD~3``) in the
same rounds, so before/after ratios come from one run. The section ends with the largest imports of
``python -X importtime`` for each command.

    python benchmarks/bench_startup.py [--quick] [--rounds N] [--compare DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _results import limit_threads, machine_line, write_section  # noqa: E402

THREADS = limit_threads(2)
OUT = HERE / "_out" / "startup"
RUN_CLI = "import sys; from peftmath.cli import main; sys.exit(main())"
TARGETS = {"peftmath --help": 0.15, "peftmath inspect": 0.40}


def make_adapter(folder: Path) -> Path:
    """A small LoRA adapter (r=8 on q/v of a 4-layer, 256-wide model, float32) written with peftmath."""
    import numpy as np

    from peftmath import create_adapter, save_adapter
    from peftmath.methods.lora import LoraConfig

    rng = np.random.default_rng(0)
    state = {f"model.layers.{i}.self_attn.{p}.weight": rng.standard_normal((256, 256)).astype(np.float32)
             for i in range(4) for p in ("q_proj", "v_proj")}
    ad = create_adapter(state, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights="gaussian"), seed=0)
    # a trained adapter has non-zero B: give it one so inspect has singular values to compute
    for m, p in ad.params.items():
        p["lora_B.weight"] = rng.standard_normal(p["lora_B.weight"].shape).astype(np.float32) / 10
    out = folder / "adapter"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    save_adapter(ad, out)
    return out


def base_env() -> dict[str, str]:
    """The environment of every timed run: bytecode cached (in ``benchmarks/_out/startup/pycache``, through
    ``PYTHONPYCACHEPREFIX``), as an installed package has its ``.pyc`` files, even where the machine sets
    ``PYTHONDONTWRITEBYTECODE=1`` (then every import would compile its source, each run)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    return env


def commands(root: Path, adapter: Path) -> dict[str, tuple[list[str], dict]]:
    env = {**base_env(), "PYTHONPATH": str(root)}
    py = sys.executable
    return {"peftmath --help": ([py, "-c", RUN_CLI, "--help"], env),
            "peftmath inspect": ([py, "-c", RUN_CLI, "inspect", str(adapter)], env)}


def run_once(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=OUT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[-2:])} failed:\n{p.stderr.decode()[-2000:]}")
    return dt


def importtime(cmd: list[str], env: dict, top: int) -> list[tuple[str, float, float]]:
    """The ``top`` imports of ``cmd`` with the largest own time under ``-X importtime`` (any depth; a
    compiled extension such as ``ml_dtypes._ml_dtypes_ext`` shows up by name): (module, self ms,
    cumulative ms)."""
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, cwd=OUT)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum, name = line[12:].split("|")
        rows.append((name.strip(), int(self_us) / 1e3, int(cum) / 1e3))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 21)")
    ap.add_argument("--compare", metavar="DIR", help="another checkout of peftmath timed in the same rounds")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    OUT.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(OUT)
    py = sys.executable
    contestants = {"python -c pass": ([py, "-c", "pass"], base_env()),
                   "python -c 'import numpy'": ([py, "-c", "import numpy"], base_env()),
                   **commands(ROOT, adapter)}
    if args.compare:
        contestants.update({f"{k} [{args.compare}]": v for k, v in commands(Path(args.compare), adapter).items()})
    names = list(contestants)
    for cmd, env in contestants.values():  # warm the file cache and the .pyc files
        run_once(cmd, env)
    load0 = os.getloadavg()
    per_round: list[dict[str, float]] = []
    for i in range(rounds):
        k = i % len(names)
        per_round.append({n: run_once(*contestants[n]) for n in names[k:] + names[:k]})
    load1 = os.getloadavg()
    med = {n: statistics.median(r[n] for r in per_round) for n in names}
    numpy_name = "python -c 'import numpy'"

    lines = ["## Start-up (`benchmarks/bench_startup.py`)", "",
             f"{machine_line()}; {THREADS}. {rounds} rounds, each command a fresh interpreter "
             f"(`{Path(py).name} -c ...` as the console script runs, this checkout on PYTHONPATH, bytecode cached "
             f"through PYTHONPYCACHEPREFIX), round-robin; "
             f"load average {load0[0]:.2f} before, {load1[0]:.2f} after. The adapter: LoRA r=8 on 8 modules "
             f"256x256, float32.", "",
             "| command | median s | / import numpy (median of per-round ratios) | target | met |",
             "|---|---|---|---|---|"]
    for n in names:
        ratio = statistics.median(r[n] / r[numpy_name] for r in per_round)
        target = next((t for k, t in TARGETS.items() if n.startswith(k)), None)
        lines.append(f"| `{n}` | {med[n]:.3f} | {ratio:.2f} | {'-' if target is None else f'<= {target} s'} | "
                     f"{'-' if target is None else ('yes' if med[n] <= target else 'no')} |")
    if args.compare:
        lines += ["", "Before/after (median of per-round ratios, this checkout over "
                  f"`{args.compare}`):", ""]
        for k in commands(ROOT, adapter):
            ratio = statistics.median(r[k] / r[f"{k} [{args.compare}]"] for r in per_round)
            lines.append(f"- `{k}`: {ratio:.2f}")
    for name, (cmd, env) in commands(ROOT, adapter).items():
        lines += ["", f"Imports of `{name}` with the largest own time (`-X importtime`, one run):", "",
                  "| module | self ms | cumulative ms |", "|---|---|---|"]
        lines += [f"| `{m}` | {s:.1f} | {c:.1f} |" for m, s, c in importtime(cmd, env, 10)]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("startup", body)


if __name__ == "__main__":
    main()
