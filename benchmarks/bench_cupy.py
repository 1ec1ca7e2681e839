"""GPU benchmark of the CuPy backend (issue 7): in-place merges against the device's memory bandwidth,
measured in the same run as a plain device-to-device copy, and the mixed-batch forward.

    python benchmarks/bench_cupy.py             # needs CuPy and a CUDA GPU; writes RESULTS.md (section cupy)
    python benchmarks/bench_cupy.py --dry-run   # NumPy, small sizes, nothing written: checks the script runs

Merging ``W += s·B@A`` (r = 16) reads and writes W once, like a copy of W onto itself, so the copy's
bandwidth is the floor's speed; throughput = 2 * W.nbytes / time. Target: >= 70% of the copy.
DoRA's fused merge reads W twice and writes it once (floor: 1.5 copies); IA3 reads and writes it once.

Rows: ``kernel`` is the backend's update alone (``CupyBackend.addmm_``); ``merge, one call`` is the public
``lora.merge(copy=False)`` synchronised after each call, so its host-side work (checks, launch) is in the
time; ``merge, 8 layers queued`` merges 8 different weights back to back and synchronises once, as a
whole-model merge does, so the host work overlaps the GPU's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends" / "cupy"))
from benchmarks._results import machine_line, write_section  # noqa: E402


class Device:
    """Arrays and timing: CuPy with CUDA events, or NumPy with the wall clock (--dry-run)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        if dry_run:
            self.xp = np
            return
        import cupy

        from peftmath import backends
        from peftmath.errors import BackendError

        try:
            backends.get_backend("cupy")
        except BackendError:
            from peftmath_cupy import CupyBackend

            backends.register_backend(CupyBackend())
        self.xp = cupy

    def asarray(self, a: np.ndarray):
        return self.xp.asarray(a)

    def sync(self) -> None:
        if not self.dry_run:
            self.xp.cuda.Device().synchronize()

    def time(self, fn, repeats: int = 20) -> float:
        """Median seconds of ``fn()``: CUDA events around each call, synchronised after each."""
        for _ in range(3):
            fn()
        self.sync()
        times = []
        for _ in range(repeats if not self.dry_run else 2):
            if self.dry_run:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                continue
            start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(self.xp.cuda.get_elapsed_time(start, stop) / 1e3)
        return float(np.median(times))

    def name(self) -> str:
        if self.dry_run:
            return "none (dry run on NumPy)"
        return self.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()


def merge_rows(dev: Device, n: int, r: int, layers: int) -> tuple[list[str], list[str]]:
    import array_api_compat
    import ml_dtypes

    from peftmath import backends
    from peftmath.methods import dora, ia3, lora

    xp, s = dev.xp, 0.5
    rng = np.random.default_rng(0)
    A = dev.asarray(rng.standard_normal((r, n)).astype(np.float32) / 50)
    B = dev.asarray(rng.standard_normal((n, r)).astype(np.float32) / 50)
    mag = dev.asarray((rng.random(n) + 0.5).astype(np.float32))
    l_ff = dev.asarray((rng.random((1, n)) + 0.5).astype(np.float32))
    backend = backends.backend_for(array_api_compat.array_namespace(A))
    rows, notes = [], []
    for label, dtype in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
        host = rng.standard_normal((n, n)).astype(np.float32).astype(dtype)
        W = dev.asarray(host)
        Ws = [dev.asarray(host) for _ in range(layers)]
        dst = xp.empty_like(W)
        t_copy = dev.time(lambda: xp.copyto(dst, W))
        t_kernel = dev.time(lambda: backend.addmm_(W, B, A, s))
        t_merge = dev.time(lambda: lora.merge(W, A, B, scaling=s, copy=False))
        t_unmerge = dev.time(lambda: lora.unmerge(W, A, B, scaling=s, copy=False))
        t_queued = dev.time(lambda: [lora.merge(w, A, B, scaling=s, copy=False) for w in Ws]) / layers
        t_dora = dev.time(lambda: dora.merge(W, A, B, mag, scaling=s, copy=False))
        t_ia3 = dev.time(lambda: ia3.merge(W, l_ff, copy=False))
        rows.append((label, t_copy, t_kernel, t_merge, t_unmerge, t_queued, t_dora, t_ia3, 2 * W.nbytes))
        Ws.clear()  # free the layers before the next dtype allocates its own
    if not dev.dry_run:
        from cupy import cublas

        W = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
        t = dev.time(lambda: cublas.gemm("N", "N", B, A, out=W, alpha=s, beta=1.0))
        notes.append(f"cuBLAS gemm(beta=1) alone on a float32 W: {t * 1e3:.3f} ms ({2 * W.nbytes / t / 1e9:.0f} GB/s).")
    out = [
        "| dtype | copy ms (GB/s) | kernel / copy | merge, one call / copy | unmerge, one call / copy | "
        "merge, 8 layers queued / copy | DoRA merge / (1.5 × copy) | IA3 merge / copy | target >= 70% (kernel, queued) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, tc, tk, tm, tu, tq, td, ti, nbytes in rows:
        pct = lambda t, floor=1.0: f"{floor * tc / t:.0%}"  # noqa: E731
        verdict = ", ".join("met" if tc / t >= 0.7 else "missed" for t in (tk, tq))
        out.append(f"| {label} | {tc * 1e3:.3f} ({nbytes / tc / 1e9:.0f}) | {pct(tk)} | {pct(tm)} | {pct(tu)} | "
                   f"{pct(tq)} | {pct(td, 1.5)} | {pct(ti)} | {verdict} |")
    return out, notes


def mixed_batch_rows(dev: Device, n: int) -> list[str]:
    """64 rows over 16 LoRA adapters (r = 16): ``mixed_batch_forward`` (on CuPy: the shrink/expand
    kernels) against the generic gather-matmul and a loop over the adapters."""
    import peftmath as pm
    from peftmath.adapter import Adapter
    from peftmath.multi import mixed_batch_forward

    xp = dev.xp
    rng = np.random.default_rng(1)
    rank, count, rows = 16, 16, 64
    W = dev.asarray(rng.standard_normal((n, n)).astype(np.float32) / 64)
    names = [f"a{i}" for i in range(count)]
    factors = {m: (dev.asarray(rng.standard_normal((rank, n)).astype(np.float32) / 64),
                   dev.asarray(rng.standard_normal((n, rank)).astype(np.float32) / 64)) for m in names}
    ads = {m: Adapter(pm.LoraConfig(r=rank, lora_alpha=32, target_modules=["lin"]),
                      {"lin": {"lora_A.weight": A, "lora_B.weight": B}}) for m, (A, B) in factors.items()}
    state = {"lin.weight": W}
    batch = list(rng.choice(names + ["__base__"], rows))
    groups = {m: dev.asarray(np.array([i for i, v in enumerate(batch) if v == m])) for m in set(batch) - {"__base__"}}
    import array_api_compat

    from peftmath import backends

    backend = backends.backend_for(array_api_compat.array_namespace(W))

    def generic():  # the array-API gather-matmul, with the backend's kernel declined
        backend.lora_gather_ = lambda *args: False
        try:
            return mixed_batch_forward("lin", x, state, ads, batch)
        finally:
            del backend.lora_gather_

    out = ["| tokens per row | `mixed_batch_forward` ms | generic gather-matmul ms | loop over adapters ms | "
           "base layer alone ms | loop / mixed_batch_forward |",
           "|---|---|---|---|---|---|"]
    for seq in (1, 16):
        x = dev.asarray(rng.standard_normal((rows, seq, n)).astype(np.float32))

        def loop():
            y = x @ W.T
            for m, idx in groups.items():
                A, B = factors[m]
                y[idx] += (x[idx] @ A.T) @ B.T * 2.0
            return y

        gather = lambda: mixed_batch_forward("lin", x, state, ads, batch)  # noqa: E731
        assert float(xp.max(xp.abs(gather() - loop()))) < 1e-3
        assert float(xp.max(xp.abs(generic() - loop()))) < 1e-3
        t_g, t_n, t_l, t_b = dev.time(gather), dev.time(generic), dev.time(loop), dev.time(lambda: x @ W.T)
        out.append(f"| {seq} | {t_g * 1e3:.3f} | {t_n * 1e3:.3f} | {t_l * 1e3:.3f} | {t_b * 1e3:.3f} | {t_l / t_g:.2f}x |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="NumPy, small sizes, nothing written")
    args = parser.parse_args(argv)
    dev = Device(args.dry_run)
    n = 256 if args.dry_run else 8192
    merges, notes = merge_rows(dev, n, 16, 8)
    mixed = mixed_batch_rows(dev, 128 if args.dry_run else 4096)
    version = "" if args.dry_run else f", CuPy {dev.xp.__version__}"
    lines = [
        f"## CuPy backend (GPU): in-place merges, Linear({n}, {n}), r = 16",
        "",
        f"Script: `benchmarks/bench_cupy.py`. GPU: {dev.name()}. Host: {machine_line()}{version}.",
        "Throughput counts W read + written once (2 × W bytes); the copy is `cupy.copyto` of W, same run. "
        "Ratios are the copy's time over the row's (100% = at the copy's bandwidth); DoRA's floor is 1.5 copies.",
        "",
        *merges,
        "",
        *notes,
        "",
        f"### Mixed-batch forward on the GPU: 64 rows over 16 LoRA adapters (r = 16), Linear({4096 if not args.dry_run else 128}) float32",
        "",
        *mixed,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.dry_run:
        write_section("cupy", text)


if __name__ == "__main__":
    main()
