"""Fuzzers for peftmath's readers: mutation-based and generated inputs, shared by the quick test run
(tests/fuzz/test_fuzz.py, a few hundred cases) and the long run:

    python -m tests.fuzz.fuzzers --cases 10000          # per reader; prints a table for RESULTS.md

A reader passes a case when it returns normally or raises an exception of peftmath's hierarchy
(``PeftMathError``), within the time limit, without writing anything.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from peftmath.errors import PeftMathError
from peftmath.io import load_adapter, read_config, save_adapter
from peftmath.io.safetensors import SafeTensorsFile, save_file


def _seed_safetensors(folder: Path) -> bytes:
    import ml_dtypes

    p = folder / "seed.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=ml_dtypes.bfloat16),
               "c": np.array([1, 2, 3], dtype=np.int64)}, p, metadata={"format": "pt"})
    return p.read_bytes()


def _seed_adapter(folder: Path) -> Path:
    import peftmath as pm
    from peftmath.adapter import Adapter

    rng = np.random.default_rng(0)
    cfg = pm.LoraConfig(r=2, lora_alpha=4, target_modules=["q"])
    ad = Adapter(cfg, {"q": {"lora_A.weight": rng.standard_normal((2, 5)).astype(np.float32),
                             "lora_B.weight": rng.standard_normal((3, 2)).astype(np.float32)}})
    return save_adapter(ad, folder / "seed_adapter")


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One random mutation: truncation, bit flips, byte runs, header-length edits, or splices."""
    b = bytearray(data)
    op = rnd.randrange(7)
    if op == 0 and b:
        return bytes(b[: rnd.randrange(len(b))])
    if op == 1 and b:
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if op == 2 and b:
        i = rnd.randrange(len(b))
        b[i:i + rnd.randint(1, 16)] = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 16)))
        return bytes(b)
    if op == 3 and len(b) >= 8:
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        n = rnd.choice([0, 1, n - 1, n + 1, n * 2, 2**63, 2**64 - 1, len(b), rnd.randrange(2**32)])
        b[:8] = struct.pack("<Q", n % 2**64)
        return bytes(b)
    if op == 4:
        return bytes(b) + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 64)))
    if op == 5 and len(b) > 8:
        i, j = sorted(rnd.randrange(len(b)) for _ in range(2))
        return bytes(b[:i] + b[j:])
    return _mutate_header(bytes(b), rnd)


def _mutate_header(data: bytes, rnd: random.Random) -> bytes:
    """Rewrite the JSON header with a structurally mutated entry (valid length field)."""
    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        body = data[8 + n:]
    except Exception:
        return data
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return data
    k = rnd.choice(keys)
    entry = header[k]
    if not isinstance(entry, dict):  # an earlier mutation already broke this entry
        return data
    choice = rnd.randrange(8)
    if choice == 0:
        entry["dtype"] = rnd.choice(["F32", "BF16", "F8_E4M3", "X9", "", None, 3])
    elif choice == 1:
        entry["shape"] = rnd.choice([[], [-1], [2**62, 2**62], ["a"], None, [True], [0], [3, 2]])
    elif choice == 2:
        entry["data_offsets"] = rnd.choice([[0, 0], [5, 1], [-8, 8], [0, 2**70], None, [0], ["0", "8"], [1.5, 8]])
    elif choice == 3:
        header["__metadata__"] = rnd.choice([{"a": 1}, [], "x", {"k": "v"}, None])
    elif choice == 4:
        header[k + "\x1b[31m"] = dict(entry)
    elif choice == 5:
        header[k] = rnd.choice([[], "x", 1, None])
    elif choice == 6:
        raw = json.dumps(header)
        raw = raw.replace(json.dumps(k), json.dumps(keys[0]), 1) if len(keys) > 1 else raw
        hb = raw.encode()
        return struct.pack("<Q", len(hb)) + hb + body
    else:
        del header[k]
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def random_json(rnd: random.Random, depth: int = 0):
    kind = rnd.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rnd.choice([None, True, False])
    if kind == 1:
        return rnd.choice([0, -1, 1, 8, 2**40, 1.5, float("1e308")])
    if kind == 2:
        return rnd.choice(["", "LORA", "LOHA", "none", "all", "gaussian", "pissa_niter_x", "\u0000", "q_proj"])
    if kind == 3:
        return rnd.choice([[], ["q"], [1, 2]])
    if kind == 4:
        return {}
    if kind == 5:
        return [random_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return {rnd.choice(["r", "lora_alpha", "peft_type", "target_modules", "rank_pattern", "x", "init_lora_weights",
                        "use_dora", "lora_bias", "bias", "lora_dropout", "alpha_pattern"]): random_json(rnd, depth + 1)
            for _ in range(rnd.randint(0, 6))}


def config_case(seed_config: dict, rnd: random.Random) -> bytes:
    """A mutated adapter_config.json: field values replaced, fields removed, raw bytes damaged."""
    cfg = dict(seed_config)
    op = rnd.randrange(4)
    if op == 0:
        for _ in range(rnd.randint(1, 3)):
            cfg[rnd.choice(list(cfg))] = random_json(rnd)
        return json.dumps(cfg).encode()
    if op == 1:
        cfg.pop(rnd.choice(list(cfg)), None)
        return json.dumps(cfg).encode()
    if op == 2:
        return json.dumps(random_json(rnd)).encode()
    return mutate(json.dumps(cfg).encode(), rnd)


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*") if p.is_file()}


class Outcome:
    def __init__(self) -> None:
        self.cases = 0
        self.accepted = 0
        self.refused = 0
        self.failures: list[str] = []
        self.slowest = 0.0


def _run(fn: Callable[[], object], outcome: Outcome, label: str, limit: float, *, watch: Path | None = None,
         wrote: str = "") -> None:
    """Run one case: count it as accepted or refused (a PeftMathError); any other exception, a run longer
    than ``limit`` seconds, or (with ``watch``) a change to the files below that folder is a failure,
    the last one reported as ``f"{label}: {wrote}"``."""
    before = None if watch is None else _snapshot(watch)
    outcome.cases += 1
    start = time.perf_counter()
    try:
        fn()
        outcome.accepted += 1
    except PeftMathError:
        outcome.refused += 1
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        outcome.failures.append(f"{label}: {type(exc).__name__}: {exc}"[:300])
    elapsed = time.perf_counter() - start
    outcome.slowest = max(outcome.slowest, elapsed)
    if elapsed > limit:
        outcome.failures.append(f"{label}: took {elapsed:.2f} s")
    if watch is not None and _snapshot(watch) != before:
        outcome.failures.append(f"{label}: {wrote}")


def fuzz_safetensors(cases: int, seed: int = 0, limit: float = 2.0) -> Outcome:
    rnd = random.Random(seed)
    out = Outcome()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        seed_bytes = _seed_safetensors(folder)
        target = folder / "case.safetensors"
        for i in range(cases):
            data = seed_bytes
            for _ in range(rnd.randint(1, 3)):
                data = mutate(data, rnd)
            target.write_bytes(data)

            def read() -> None:
                f = SafeTensorsFile(target)
                for k in f:
                    np.asarray(f[k]).sum()
                f.close()

            _run(read, out, f"safetensors case {i}", limit, watch=folder, wrote="the reader wrote to its folder")
    return out


def fuzz_config(cases: int, seed: int = 0, limit: float = 2.0) -> Outcome:
    rnd = random.Random(seed)
    out = Outcome()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        adapter = _seed_adapter(folder)
        seed_config = json.loads((adapter / "adapter_config.json").read_text())
        target = folder / "adapter_config.json"
        for i in range(cases):
            target.write_bytes(config_case(seed_config, rnd))
            _run(lambda: read_config(target), out, f"config case {i}", limit)
    return out


def fuzz_adapter(cases: int, seed: int = 0, limit: float = 2.0) -> Outcome:
    """Whole adapter folders: a mutated config or weights file, then load and merge into a base."""
    rnd = random.Random(seed)
    out = Outcome()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        adapter = _seed_adapter(folder)
        cfg_bytes = (adapter / "adapter_config.json").read_bytes()
        w_bytes = (adapter / "adapter_model.safetensors").read_bytes()
        seed_config = json.loads(cfg_bytes)
        state = {"q.weight": np.zeros((3, 5), np.float32), "q.bias": np.zeros(3, np.float32)}
        for i in range(cases):
            case = folder / f"case{i % 4}"
            case.mkdir(exist_ok=True)
            which = rnd.randrange(3)
            (case / "adapter_config.json").write_bytes(config_case(seed_config, rnd) if which != 1 else cfg_bytes)
            (case / "adapter_model.safetensors").write_bytes(mutate(w_bytes, rnd) if which != 0 else w_bytes)

            def load_and_merge() -> None:
                ad = load_adapter(case)
                ad.merge(state)

            _run(load_and_merge, out, f"adapter case {i}", limit, watch=case,
                 wrote="loading wrote to the adapter folder")
    return out


def _index_case(seed_index: dict, rnd: random.Random) -> bytes:
    """A mutated model.safetensors.index.json: hostile shard names, wrong maps, random JSON, damaged bytes."""
    idx = json.loads(json.dumps(seed_index))
    wm = idx["weight_map"]
    op = rnd.randrange(6)
    if op == 0 and wm:
        k = rnd.choice(list(wm))
        wm[k] = rnd.choice(["/etc/passwd", "../outside.safetensors", "..", "", ".", "sub/dir.safetensors",
                            "a\\b.safetensors", "missing.safetensors", "shard-2.safetensors", 7, None])
    elif op == 1 and wm:
        wm.pop(rnd.choice(list(wm)))
    elif op == 2:
        wm[rnd.choice(["x", "a", "\x1b[2J"])] = rnd.choice(["shard-1.safetensors", "shard-2.safetensors"])
    elif op == 3:
        idx["weight_map"] = random_json(rnd)
    elif op == 4:
        return json.dumps(random_json(rnd)).encode()
    else:
        return mutate(json.dumps(idx).encode(), rnd)
    return json.dumps(idx).encode()


def fuzz_index(cases: int, seed: int = 0, limit: float = 2.0) -> Outcome:
    """Sharded model folders with a mutated index, opened and read tensor by tensor."""
    from peftmath.io.stream import open_model

    rnd = random.Random(seed)
    out = Outcome()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        folder.mkdir()
        save_file({"a": np.ones((2, 3), np.float32)}, folder / "shard-1.safetensors")
        save_file({"b": np.zeros(4, np.float32), "c": np.arange(3.0)}, folder / "shard-2.safetensors")
        seed_index = {"metadata": {"total_size": 52},
                      "weight_map": {"a": "shard-1.safetensors", "b": "shard-2.safetensors", "c": "shard-2.safetensors"}}
        index = folder / "model.safetensors.index.json"
        for i in range(cases):
            index.write_bytes(_index_case(seed_index, rnd))

            def read() -> None:
                m = open_model(folder)
                for k in m.keys():
                    np.asarray(m.read(k)).sum()

            _run(read, out, f"index case {i}", limit, watch=Path(d), wrote="opening the model wrote to its folder")
    return out


READERS = {"safetensors": fuzz_safetensors, "adapter_config.json": fuzz_config, "adapter folder + merge": fuzz_adapter,
           "shard index": fuzz_index}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per reader (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    failed = False
    for name, fn in READERS.items():
        start = time.perf_counter()
        o = fn(args.cases, seed=args.seed)
        rows.append(f"| {name} | {o.cases} | {o.accepted} | {o.refused} | {len(o.failures)} | {o.slowest * 1e3:.1f} | "
                     f"{time.perf_counter() - start:.1f} |")
        for f in o.failures[:10]:
            print(f)
        failed |= bool(o.failures)
    table = "\n".join(["| reader | cases | accepted | refused (PeftMathError) | other exceptions, hangs or writes | "
                       "slowest case ms | total s |", "|---|---|---|---|---|---|---|", *rows])
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
