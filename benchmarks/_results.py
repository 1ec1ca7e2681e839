"""Write one benchmark's section of benchmarks/RESULTS.md (between its own markers), keeping the others."""

from __future__ import annotations

import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script named in it; ratios are measured side by side in one run.\n"


def machine_line() -> str:
    import numpy
    import os

    parts = [f"{platform.machine()}", f"{os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"NumPy {numpy.__version__}"]
    try:
        import scipy

        parts.append(f"SciPy {scipy.__version__}")
    except ImportError:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body`` (Markdown)."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


# --- shared by the benchmark scripts ---------------------------------------------------------------
def limit_threads(threads: int) -> str:
    """Limit NumPy/SciPy's BLAS to ``threads``; returns the sentence RESULTS.md records.

    Call it before NumPy is imported: OpenBLAS reads ``OPENBLAS_NUM_THREADS`` (etc.) when it loads, and
    threadpoolctl's ``threadpool_limits`` (applied too when installed) only reaches the BLAS libraries
    already loaded, so the environment variables are set in either case.
    """
    import importlib.util
    import os

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    note = (f"torch.set_num_threads({threads}); NumPy/SciPy BLAS limited through "
            f"OPENBLAS_NUM_THREADS=OMP_NUM_THREADS={threads} set before importing numpy")
    if importlib.util.find_spec("threadpoolctl") is None:
        return note + " (threadpoolctl not installed)"
    from threadpoolctl import threadpool_limits

    _LIMITERS.append(threadpool_limits(threads))
    return note + f" and threadpoolctl.threadpool_limits({threads})"


_LIMITERS: list = []


def race(contestants: dict, *, repeats: int, warmup: int = 1, settle: float = 0.0) -> tuple[dict, list]:
    """Run the contestants round-robin and return (median ms per name, the per-round times).

    ``contestants`` maps a name to ``(fn, setup)``; ``setup`` (or None) runs untimed before each call.
    ``settle``: seconds of idle time before each timed call (after its setup). OpenBLAS's worker threads spin
    for about 0.1 s after a multithreaded call before they sleep; on a 2-core machine the spinning worker takes a
    core from whatever runs next (measured by the OFT benchmark: a row-tile merge right after a threaded gemm
    used 7 ms more CPU than after a pause), which charges one contestant for another's BLAS call.
    Interleaving the calls (and rotating who goes first) exposes every contestant to the same machine
    load, so the ratios stay meaningful on a busy machine; ratios are medians of per-round ratios.
    """
    import statistics
    import time

    names = list(contestants)
    rounds: list[dict[str, float]] = []
    for i in range(warmup + repeats):
        k = i % len(names)
        times = {}
        for name in names[k:] + names[:k]:
            fn, setup = contestants[name]
            if setup is not None:
                setup()
            if settle > 0:
                time.sleep(settle)
            t0 = time.perf_counter()
            fn()
            times[name] = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            rounds.append(times)
    return {n: statistics.median(r[n] for r in rounds) for n in names}, rounds


def one_linear(in_features: int, out_features: int, *, bias: bool):
    """A torch model whose only layer is ``nn.Linear(in_features, out_features, bias=bias)`` as ``.lin``
    (PEFT's ``target_modules=["lin"]``); its forward is that layer."""
    import torch

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(in_features, out_features, bias=bias)

        def forward(self, x):
            return self.lin(x)

    return One()


def paired_ratio(rounds: list, num: str, den: str) -> float:
    """Median over rounds of ``t[num] / t[den]``."""
    import statistics

    return statistics.median(r[num] / r[den] for r in rounds)


def peak_alloc(fn, setup=None) -> int:
    """Peak bytes allocated (and traced) while ``fn()`` runs, beyond what was allocated before."""
    import tracemalloc

    if setup is not None:
        setup()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base
