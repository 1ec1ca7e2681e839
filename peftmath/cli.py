"""The ``peftmath`` command: demo, inspect, merge, unmerge and extract PEFT adapters without PyTorch.

Data goes to stdout, logs and progress to stderr. Exit status: 0 success, 1 error (one line naming
the file, tensor or field and what to do; ``-v`` adds the traceback), 2 usage error (an unknown
option, a missing argument, or a value malformed or out of range on its own: argparse reports it).
Warnings, the library's included, are one line each (``peftmath: warning: ...``); ``--strict`` makes
every :class:`~peftmath.errors.PeftMathWarning` an error (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckpointError, ConfigError, PeftMathError, PeftMathWarning, ShapeError

# Start-up: building the parser (``peftmath --help``) imports nothing beyond the standard library and
# peftmath.errors; NumPy, the readers, ml_dtypes, SciPy and the formats are imported by the command
# that needs them (inside its function). tests/test_startup.py checks it.

#: the commands' library names that stay importable from here, as before (``from peftmath.cli import
#: inspect_adapter``): name -> (module, attribute), imported on first use
_LIBRARY_NAMES = {
    "extract_lora": ("extract", "extract_lora"), "write_adapter": ("extract", "write_adapter"),
    "inspect_adapter": ("inspect", "inspect_adapter"), "render_inspect": ("inspect", "render_inspect"),
    "top_singular_values": ("inspect", "top_singular_values"), "_fmt_bytes": ("inspect", "format_bytes"),
    "_plan_table": ("inspect", "plan_table"),
}


def __getattr__(name: str) -> Any:
    if name in _LIBRARY_NAMES:
        import importlib

        module, attr = _LIBRARY_NAMES[name]
        return getattr(importlib.import_module(f"peftmath.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _table(rows: list[list[str]], header: list[str]) -> str:
    """:func:`peftmath.inspect.text_table` (imported when a command prints a table)."""
    from .inspect import text_table

    return text_table(rows, header)

EPILOG_MODELS = """\
Models (BASE, TUNED, MERGED, OUT) are a .safetensors file or a folder of shards with
model.safetensors.index.json (a folder holding one model.safetensors works too). An adapter is a
PEFT adapter folder: adapter_config.json + adapter_model.safetensors (adapter_model.bin pickles are
refused, never loaded).
"""

MERGE_EPILOG = EPILOG_MODELS + """
The merge streams one tensor at a time: tensors the adapters do not touch are copied byte for byte,
adapted weights are merged (in float32 for half-precision weights, rounded once) and written to OUT
with the same shards, index and metadata; the other small files of a model folder (config.json,
tokenizer files) are copied, other weight files (*.bin, *.safetensors not in the index) are not.
OUT is written to a temporary sibling and renamed when complete; an existing OUT is refused unless
--force. Inputs are never modified. Progress goes to stderr when it is a terminal.

DoRA: unmerging needs the weight norms of merge time. They are written beside the result, never
inside it: OUT.merge-records.safetensors (for a file and a folder alike), or --records FILE.
`peftmath unmerge` reads them from there (or --records FILE).

Provenance: every output shard's safetensors metadata lists, under "peftmath.merged", the adapters
merged into the model (oldest first: folder name, peft_type, sha256 of adapter_config.json and of
adapter_model.safetensors, the options, the peftmath version); `peftmath unmerge` checks it.
Hugging Face hub cache snapshots (folders of symlinks into blobs/) are read through the links; the
summary names the side files copied.

examples:
  peftmath merge llama/ my-lora/ -o llama-merged/
  peftmath merge model.safetensors a/ b/ -o merged.safetensors --dtype bfloat16 --safe
  peftmath merge llama/ my-lora/ -o out/ --dry-run
"""


# --- helpers ----------------------------------------------------------------------------------
class _Log:
    def __init__(self, verbosity: int) -> None:
        self.verbosity = verbosity

    def info(self, msg: str) -> None:
        if self.verbosity >= 1:
            print(msg, file=sys.stderr)

    def debug(self, msg: str) -> None:
        if self.verbosity >= 2:
            print(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        """A warning of the command: a :class:`PeftMathWarning`, like the library's (shown by :meth:`show`,
        an error with --strict)."""
        warnings.warn(msg, PeftMathWarning, stacklevel=2)

    def show(self, message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        """``warnings.showwarning`` while a command runs: one plain line, no source path (none with -q)."""
        if self.verbosity < 0:
            return
        text = " ".join(str(message).split())
        if not issubclass(category, _strict_categories()):  # another library's: say which kind
            text = f"{category.__name__}: {text}"
        print(f"peftmath: warning: {text}", file=sys.stderr)


# --- option values: checked by argparse (a usage error, exit 2, names the option) ----------------
def _value_type(name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable:
    """An argparse ``type=``: ``convert`` the text, then require ``ok`` (``what`` says what is expected)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


_POSITIVE_INT = _value_type("positive_int", int, lambda v: v > 0, "a positive integer")
_COUNT = _value_type("count", int, lambda v: v >= 0, "an integer >= 0")
_FINITE = _value_type("finite_float", float, math.isfinite, "a finite number")
_POSITIVE = _value_type("positive_float", float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_FRACTION = _value_type("fraction", float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_QUANTILE = _value_type("quantile", float, lambda v: 0 <= v <= 1, "a quantile in [0, 1]")
_LAYERS = _value_type("num_layers", int, lambda v: v == -1 or v > 0, "a positive integer, or -1 for all")


#: dtype spellings accepted wherever a dtype is taken (canonical name -> accepted names)
DTYPE_ALIASES = {"float32": ("float32", "fp32", "f32"), "float16": ("float16", "fp16", "f16", "half"),
                 "bfloat16": ("bfloat16", "bf16"), "keep": ("keep",)}


def _dtype_choice(text: str) -> str:
    """An argparse ``type=`` for a dtype: the canonical name of ``text`` (``bf16`` -> ``bfloat16``, ...)."""
    low = text.strip().lower()
    for name, spellings in DTYPE_ALIASES.items():
        if low in spellings:
            return name
    accepted = ", ".join(s for names in DTYPE_ALIASES.values() for s in names)
    raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of {accepted}")


def _regex(text: str) -> str:
    """An argparse ``type=`` for a regular expression (re.search / re.fullmatch later)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({exc})") from None
    return text


def _parameter_names(text: str) -> list[str]:
    """An argparse ``type=`` for ``--parameter-order NAME[,NAME...]``: parameter names (the last part of a
    parameter's name, e.g. ``gate_up_proj``), comma-separated."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_]\w*", n)]
    if bad:
        raise argparse.ArgumentTypeError(f"expected parameter names separated by commas (the last part of a "
                                         f"parameter's name, e.g. gate_up_proj,down_proj), got {text!r}")
    return names


def _layer_kind_item(text: str) -> tuple[str, str]:
    """An argparse ``type=`` for ``--layer-kind MODULE=KIND``."""
    from .layers import LayerKind

    module, sep, kind = text.partition("=")
    if not sep or not module.strip():
        raise argparse.ArgumentTypeError(f"expected MODULE=KIND, e.g. transformer.h.0.attn.c_attn=Conv1D, got {text!r}")
    try:
        LayerKind.parse(kind)
    except PeftMathError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return module.strip(), kind


def _layer_kinds(items: Sequence[tuple[str, str]] | None) -> dict[str, str]:
    """``{module: kind}`` from the ``--layer-kind`` values (parsed by :func:`_layer_kind_item`)."""
    return dict(items or ())


def _backend_namespace(name: str | None):
    """(xp, to_xp, to_host) for backend ``name`` (None: NumPy, no conversion)."""
    if name is None or name == "numpy":
        return None, None, None
    import numpy as np

    from .backends import get_backend

    b = get_backend(name)
    xp = b.namespace()
    return xp, (lambda a: b.from_host(np.ascontiguousarray(a), xp)), b.to_host


def _progress(total: int | None, quiet: bool, desc: str, unit: str = "B"):
    """A tqdm progress bar on stderr: ``(update, close)``; ``update`` is None (and ``close`` does nothing)
    with ``-q`` or when stderr is not a terminal. ``unit="B"`` counts bytes (scaled: KB, MB, ...), any other
    unit whole items (modules, tensors, steps); ``total=None``: a counter without a bar."""
    if quiet or not sys.stderr.isatty():
        return None, (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None, (lambda: None)
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False, **scaled)
    return bar.update, bar.close


def _print_json(data: Any) -> None:
    """``--json``: ``data`` on stdout, strict JSON (no NaN / Infinity)."""
    print(json.dumps(data, indent=2, allow_nan=False))


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _size_arg(text: str) -> int:
    """A byte count: ``5GB`` (10^9, as transformers' ``max_shard_size``), ``500MiB`` (2^20), ``1000``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]) if m else 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected a positive size such as 5GB, 500MB, "
                                         f"2GiB or a number of bytes")
    return n


def _adapter_arg(text: str) -> tuple[str, float]:
    """``ADAPTER`` or ``ADAPTER:SCALE`` (llama.cpp's ``--lora-scaled``): ``(path, scale)``. The suffix after
    the last ``:`` is a scale only when it is a finite float and ``text`` is not an existing path."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or os.path.exists(text):
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text}: the scale after ':' must be a finite number, got {tail!r}")
    return head, scale


def _format_of(path: str) -> str | None:
    """The adapter format at ``path`` (:func:`peftmath.formats.detect_format`), None when unrecognisable.

    A PEFT folder (``adapter_model.safetensors`` and an ``adapter_config.json`` object with ``peft_type``: the
    first rule of the detection) is recognised here, without importing the format readers."""
    folder = Path(path)
    if (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file():
        try:
            data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and "peft_type" in data:
            return "peft"
    from .formats import detect_format

    try:
        return detect_format(path)
    except PeftMathError:
        return None


def _read_adapter(path: str, *, strict: bool = False, model: Any = None) -> Any:
    """The adapter at ``path``: a PEFT folder, or a kohya / LyCORIS file or an MLX folder converted in memory
    (detected as ``peftmath convert`` detects them; kohya's module names are matched against ``model``'s,
    an opened :class:`~peftmath.io.stream.Model`, when given). A candle-lora file does not hold its alpha:
    the error gives the ``peftmath convert`` command to run."""
    from .io import load_adapter

    fmt = _format_of(path)
    if fmt in (None, "peft"):  # None: not recognisable; load_adapter says why in PEFT's terms
        return load_adapter(path, strict=strict)
    from .formats import read_any

    if fmt == "candle-lora":
        base = f" --modules-from {model.path}" if model is not None else " --modules-from BASE"
        raise ConfigError(f"{path}: a candle-lora adapter does not record its alpha, so it cannot be read as is; "
                          f"convert it once: peftmath convert {path} --to peft --alpha ALPHA{base} -o "
                          f"{Path(path).with_suffix('')}-peft")
    options: dict[str, Any] = {}
    if fmt == "kohya" and model is not None:
        options["modules"] = sorted({k.rsplit(".", 1)[0] for k in model.keys() if k.endswith(".weight")})
    return read_any(path, from_=fmt, **options)


def _load_adapters(paths: Sequence[str], to_xp: Any = None, *, strict: bool = False, model: Any = None):
    """The adapters at ``paths`` (``strict``: an unknown config field is an error), on the backend of ``to_xp``;
    kohya / LyCORIS and MLX adapters are converted in memory (:func:`_read_adapter`)."""
    adapters = [_read_adapter(p, strict=strict, model=model) for p in paths]
    if to_xp is not None:
        import numpy as np
  # private writeable copies on the backend (the files stay memory-mapped read-only)
        for ad in adapters:
            ad.params = {m: {s: to_xp(np.array(a)) for s, a in p.items()} for m, p in ad.params.items()}
            ad.shared = {k: to_xp(np.array(v)) for k, v in ad.shared.items()}
            ad.other = {k: to_xp(np.array(v)) for k, v in ad.other.items()}
    return adapters


# --- inspect ----------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace, log: _Log) -> int:
    from .inspect import inspect_adapter, render_inspect
    from .io.stream import open_model

    base = open_model(args.base) if args.base else None
    update, close = _progress(None, args.quiet, "inspect", unit="module")  # count unknown before loading
    kw = dict(base=base, layer_kinds=_layer_kinds(args.layer_kind), top=args.top, strict=args.strict,
              progress=update)
    fmt = _format_of(args.adapter)
    try:
        if fmt in (None, "peft"):
            info = inspect_adapter(args.adapter, **kw)
        else:  # kohya / LyCORIS, MLX: converted in memory, inspected as the PEFT adapter it is
            import tempfile

            from .io import save_adapter

            ad = _read_adapter(args.adapter, strict=args.strict, model=base)
            with tempfile.TemporaryDirectory() as td:
                save_adapter(ad, Path(td) / "adapter")
                info = inspect_adapter(Path(td) / "adapter", **kw)
            info = {"path": str(args.adapter), "format": fmt, **{k: v for k, v in info.items() if k != "path"}}
    finally:
        close()
    print(json.dumps(info, indent=2) if args.json else render_inspect(info, with_base=base is not None))
    if args.plot and not info["problems"]:
        _plot_inspect(args, base)
    if info["problems"]:
        n = len(info["problems"])
        raise ShapeError(f"{args.adapter}: {n} adapted module(s) do not fit {args.base}: {info['problems'][0]}")
    return 0


def _plot_inspect(args: argparse.Namespace, base: Any) -> None:
    """``inspect --plot FILE``: singular-value spectra and ‖ΔW‖ per module (peftmath.plot); with --base, ΔW is
    merge(W) − W for every method (only the adapted modules' tensors are read)."""
    from .plot import plot_spectra

    ad = _read_adapter(args.adapter, strict=args.strict, model=base)
    state = None
    if base is not None:
        state = {}
        for m in ad.modules:
            for key in ad.weight_keys(m, base):  # <m>.weight / .bias, a raw parameter, an attention's in_proj
                if key in base:
                    state[key] = base.read(key)
    plot_spectra(ad, args.plot, base=state)
    if not args.quiet:
        print(f"wrote {args.plot}", file=sys.stderr)


# --- merge / unmerge --------------------------------------------------------------------------
def _run_transform(args: argparse.Namespace, log: _Log, direction: str) -> int:
    from .io import stream

    src_path = args.base if direction == "merge" else args.merged
    base = stream.open_model(src_path)
    xp, to_xp, to_host = _backend_namespace(getattr(args, "backend", None))
    paths = [p for p, _ in args.adapters]
    adapters = [ad if c == 1.0 else ad.scaled(c)  # ADAPTER:SCALE
                for ad, (_, c) in zip(_load_adapters(paths, to_xp, strict=args.strict, model=base), args.adapters)]
    kinds = _layer_kinds(args.layer_kind)
    dtype = None
    if getattr(args, "dtype", "keep") not in (None, "keep"):
        dtype = stream.OUTPUT_DTYPES[args.dtype]
    pl = stream.plan(base, adapters, direction=direction, dtype=dtype, layer_kinds=kinds, names=paths)
    # provenance: which adapters the output holds (checked before anything is written, dry run included)
    recorded = stream.read_provenance(base)
    notes: list[str] = []  # warnings, given once every check has passed (an error stays one line)
    if direction == "merge":
        options = {"dtype": args.dtype, "safe": bool(args.safe), "peft_compat": bool(args.peft_compat),
                   "layer_kinds": kinds, "backend": args.backend or "numpy"}
        provenance = (recorded or []) + [stream.adapter_provenance(a, ad, options)
                                         for a, ad in zip(paths, adapters)]
    else:
        given = [stream.adapter_provenance(a, ad) for a, ad in zip(paths, adapters)]
        provenance, notes = stream.unmerge_provenance(base, recorded, given, ignore=args.ignore_provenance)
    if args.dry_run:
        if args.json:
            _print_json(_plan_json(pl, direction, args.output))
        else:
            from .inspect import plan_table

            print(plan_table(pl))
        for note in notes:
            log.warn(note)
        out = Path(args.output)
        if out.exists() and not args.force:
            log.warn(f"{out} exists: the real run needs --force")
        return 0
    records_out = None
    if direction == "unmerge" and args.records:
        rpath: Path | None = Path(args.records)
        if not rpath.is_file():
            raise CheckpointError(f"{rpath}: no such records file")
    else:
        rpath = stream.find_records(src_path)  # an earlier merge's records travel with the model
        records_out = args.records if direction == "merge" else None
    records = stream.read_records(rpath)
    inputs = [Path(a) for a in paths] + ([rpath] if rpath is not None else [])
    if direction == "merge" and rpath is None and any(e.get("use_dora") for e in recorded or []):
        notes.append(f"{src_path} holds DoRA merges but no merge records were found beside it "
                     f"({stream.records_path(src_path)}); unmerging those will need --records FILE")
    # the checks transform makes first, made here so that a warning never precedes an error (and a
    # warning that --strict turns into an error comes before anything is written)
    stream._check_output(Path(args.output), [base.path, *inputs], args.force)
    card = None
    if getattr(args, "model_card", False):
        card = stream.check_model_card(args.output, args.force, base.is_folder or args.max_shard_size is not None)
    if direction == "unmerge":
        stream.check_records(pl, records, base.path)
    for note in notes:
        log.warn(note)
    update, close = _progress(pl.bytes_out(), args.quiet, direction)
    t0 = time.perf_counter()
    options = dict(direction=direction, dtype=dtype, safe=getattr(args, "safe", False), peft_compat=args.peft_compat,
                   layer_kinds=kinds, records=records, records_out=records_out, provenance=provenance,
                   force=args.force, names=paths, inputs=inputs, to_xp=to_xp, to_host=to_host, progress=update,
                   precomputed_plan=pl, max_shard_size=args.max_shard_size)
    try:
        if _engine_wanted(args):  # the same tasks on dask.distributed: the same bytes
            from .engines import dask as engine

            with engine.client(args.workers, args.scheduler) as c:
                rep = engine.transform(base, adapters, args.output, client=c, **options)
        else:
            rep = stream.transform(base, adapters, args.output, **options)
    finally:
        close()
    dt = time.perf_counter() - t0
    if card is not None:
        stream.write_model_card(card, stream.merge_model_card(src_path, args.output, provenance, len(adapters),
                                                              _merge_commands(args)))
    if args.json:
        _print_json({"command": direction, "output": str(rep.out), "adapters": paths, "tensors": rep.tensors,
                     "adapted": rep.adapted, "copied": rep.tensors - rep.adapted, "bytes_written": rep.bytes_written,
                     "seconds": round(dt, 3), "records_file": str(rep.records_file) if rep.records_file else None,
                     "records": rep.records if rep.records_file else 0,
                     "side_files": list(rep.side_files) if base.is_folder else [],
                     "left_out": list(rep.left_out) if base.is_folder else [],
                     "model_card": str(card) if card is not None else None})
    if not args.quiet:
        from .inspect import format_bytes

        msg = (f"{direction}d {rep.adapted} tensors, copied {rep.tensors - rep.adapted}; wrote {rep.out} "
               f"({format_bytes(rep.bytes_written)}) in {dt:.2f} s")
        if rep.records_file:
            msg += f"; merge records ({rep.records}) in {rep.records_file}"
        elif records_out is not None:
            msg += f"; no merge records needed, {records_out} not written"
        if base.is_folder:
            msg += f"; side files copied: {', '.join(rep.side_files) or 'none'}"
            if rep.left_out:
                msg += f"; not copied: {', '.join(rep.left_out)}"
        print(msg, file=sys.stderr)
    return 0


def _engine_wanted(args: argparse.Namespace) -> bool:
    """``--workers`` / ``--scheduler`` given: run on dask.distributed (:mod:`peftmath.engines.dask`)."""
    return getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None


def _add_engine(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workers N`` / ``--scheduler ADDRESS``: the command's tasks on dask.distributed (``peftmath[dask]``)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_POSITIVE_INT, metavar="N",
                   help=f"run the {what} as dask.distributed tasks on a local cluster of N worker threads (pip "
                        f"install 'peftmath[dask]'); the output is byte-identical to the serial command's")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help=f"run the {what} on a running Dask cluster (e.g. tcp://10.0.0.5:8786); every worker must "
                        f"see the inputs and the output's folder at the same paths (a shared file system)")


def _plan_json(pl: Any, direction: str, output: str) -> dict[str, Any]:
    """``merge --dry-run --json``: the plan, one entry per tensor."""
    return {"command": direction, "dry_run": True, "output": str(output), "bytes_out": pl.bytes_out(),
            "tensors": [{"key": op.key, "operation": op.operation, "shape": list(op.shape), "src_dtype": op.src_dtype,
                         "work_dtype": op.work_dtype, "dst_dtype": op.dst_dtype, "bytes": op.nbytes,
                         "adapters": list(op.modules)} for op in pl.ops.values()]}


def _merge_commands(args: argparse.Namespace) -> list[str]:
    """The ``peftmath merge`` command line of ``args`` and the ``peftmath verify`` that checks its output
    (for the model card)."""
    import shlex

    adapters = [p if c == 1.0 else f"{p}:{c!r}" for p, c in args.adapters]
    kinds = [x for k in (args.layer_kind or []) for x in ("--layer-kind", k)]
    compat = ["--peft-compat"] if args.peft_compat else []
    merge = ["peftmath", "merge", args.base, *adapters, "-o", args.output, *kinds, *compat]
    dtype = ["--dtype", args.dtype] if args.dtype not in (None, "keep") else []
    merge += dtype + (["--safe"] if args.safe else []) + (["--backend", args.backend] if args.backend else [])
    merge += ["--max-shard-size", str(args.max_shard_size)] if args.max_shard_size is not None else []
    verify = ["peftmath", "verify", args.base, *adapters, args.output, *kinds, *compat, *dtype]
    return [shlex.join(str(x) for x in merge) + " --model-card", shlex.join(str(x) for x in verify)]


def _cmd_merge(args, log):
    return _run_transform(args, log, "merge")


def _cmd_unmerge(args, log):
    return _run_transform(args, log, "unmerge")


# --- verify / diff -----------------------------------------------------------------------------
def _fmt_num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _check_rows(checks: Sequence[Any], show_all: bool) -> tuple[list[list[str]], int]:
    """Table rows (every changed, adapted or failing tensor; every tensor with ``show_all``) and how many
    identical untouched tensors were left out."""
    rows, hidden = [], 0
    for c in checks:
        if not show_all and c.ok and c.kind in ("untouched", "-"):
            hidden += 1
            continue
        rows.append([c.key, c.kind, c.dtype, "x".join(map(str, c.shape)), _fmt_num(c.max_abs), _fmt_num(c.max_rel),
                     _fmt_num(c.bound), "-" if c.ratio is None else f"{c.ratio:.3g}", c.status
                     + (f": {c.detail}" if c.detail and not c.ok else "")])
    return rows, hidden


def _print_report(rep: Any, args: argparse.Namespace, what: str) -> None:
    if args.json:
        print(json.dumps(rep.to_json(), indent=2, allow_nan=False))
        return
    rows, hidden = _check_rows(rep.checks, args.all)
    print(_table(rows, ["tensor", "kind", "dtype", "shape", "max abs", "max rel", "bound", "err/bound", "status"]))
    if hidden:
        print(f"({hidden} {what} tensors not shown; --all lists them)")


def _cmd_verify(args: argparse.Namespace, log: _Log) -> int:
    from .io.stream import OUTPUT_DTYPES, open_model
    from .verify import verify

    if len(args.paths) < 3:
        print("peftmath verify: error: expected BASE ADAPTER [ADAPTER ...] MERGED (at least three paths)",
              file=sys.stderr)
        return 2
    base_path, adapter_args, merged_path = args.paths[0], args.paths[1:-1], args.paths[-1]
    base, merged = open_model(base_path), open_model(merged_path)
    try:
        parsed = [_adapter_arg(a) for a in adapter_args]  # ADAPTER:SCALE, as merge takes it
    except argparse.ArgumentTypeError as exc:
        print(f"peftmath verify: error: {exc}", file=sys.stderr)
        return 2
    adapter_paths = [p for p, _ in parsed]
    adapters = [ad if c == 1.0 else ad.scaled(c)
                for ad, (_, c) in zip(_load_adapters(adapter_paths, strict=args.strict, model=base), parsed)]
    dtype = None if args.dtype in (None, "keep") else OUTPUT_DTYPES[args.dtype]
    rep = verify(base, adapters, merged, peft_compat=args.peft_compat, layer_kinds=_layer_kinds(args.layer_kind),
                 dtype=dtype, names=adapter_paths)
    _print_report(rep, args, "untouched bit-identical")
    merged_checks = [c for c in rep.checks if c.kind in ("merged", "replaced") and c.ratio is not None]
    worst = max(merged_checks, key=lambda c: c.ratio, default=None)
    if rep.ok:
        if not args.quiet:
            tail = f" (worst {worst.ratio:.3g} of its bound: {worst.key})" if worst is not None else ""
            print(f"peftmath: verify: ok: {len(merged_checks)} adapted tensors within bound{tail}, "
                  f"{sum(c.kind == 'untouched' for c in rep.checks)} untouched tensors bit-identical", file=sys.stderr)
        return 0
    bad = rep.failures()
    first = bad[0]
    print(f"peftmath: verify: {len(bad)} of {len(rep.checks)} tensors fail: {first.key}: {first.status}"
          + (f" ({first.detail})" if first.detail else "")
          + (f"; also {', '.join(c.key for c in bad[1:4])}" + (" ..." if len(bad) > 4 else "") if len(bad) > 1 else ""),
          file=sys.stderr)
    return 1


def _cmd_diff(args: argparse.Namespace, log: _Log) -> int:
    from .io.stream import open_model
    from .verify import diff

    rep = diff(open_model(args.model_a), open_model(args.model_b))
    _print_report(rep, args, "identical")
    bad = rep.failures()
    if not bad:
        if not args.quiet:
            print(f"peftmath: diff: identical ({len(rep.checks)} tensors, same names, dtypes, shapes and bytes)",
                  file=sys.stderr)
        return 0
    worst = max((c for c in bad if c.max_abs is not None), key=lambda c: c.max_abs, default=None)
    counts: dict[str, int] = {}
    for c in bad:
        counts[c.status] = counts.get(c.status, 0) + 1
    print(f"peftmath: diff: {len(bad)} of {len(rep.checks)} tensors differ ("
          + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")"
          + (f"; largest: {worst.key} max abs {worst.max_abs:.3g}" if worst is not None else ""), file=sys.stderr)
    return 1


# --- combine ------------------------------------------------------------------------------------
def _cmd_combine(args: argparse.Namespace, log: _Log) -> int:
    from .combine import combine
    from .extract import write_adapter
    from .io.stream import _check_output

    out = Path(args.output)
    _check_output(out, [Path(a) for a in args.adapters], args.force)
    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    adapters = _load_adapters(args.adapters, strict=args.strict)
    update, close = _progress(len({m for a in adapters for m in a.params}), args.quiet, "combine", unit="module")
    try:
        ad = combine(adapters, weights, combination_type=args.method, svd_rank=args.svd_rank,
                     svd_clamp=args.svd_clamp, density=args.density, majority_sign_method=args.majority_sign,
                     seed=args.seed, peft_compat=args.peft_compat, progress=update)
    finally:
        close()
    meta = {"peftmath.combine": json.dumps({"method": args.method, "weights": weights,
                                            "truncation_error": ad.truncation_error}, sort_keys=True)}
    write_adapter(ad, out, force=args.force, metadata=meta)
    if args.json:
        _print_json({"command": "combine", "output": str(out), "method": args.method, "weights": weights,
                     "adapters": list(args.adapters), "r": ad.config.r, "modules": sorted(ad.modules),
                     "truncation_error": dict(sorted(ad.truncation_error.items()))})
    elif ad.truncation_error:
        rows = [[m, f"{e:.3e}"] for m, e in sorted(ad.truncation_error.items())]
        print(_table(rows, ["module", "relative truncation error"]))
    if not args.quiet:
        print(f"wrote the {args.method} combination of {len(adapters)} adapters (r={ad.config.r}, "
              f"{len(ad.modules)} modules) to {out}", file=sys.stderr)
    return 0


# --- convert --------------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace, log: _Log) -> int:
    from .formats import convert_path

    read: dict[str, Any] = {}
    if args.modules_from:
        from .io.stream import open_model

        model = open_model(args.modules_from)
        read["modules"] = sorted({k.rsplit(".", 1)[0] for k in model.keys() if k.endswith(".weight")})
    if args.lora_alpha is not None:
        read["lora_alpha"] = args.lora_alpha
    if args.missing_alpha is not None:
        read["missing_alpha"] = args.missing_alpha
    write: dict[str, Any] = {}
    if args.prefix is not None:
        write["prefix"] = args.prefix
    if args.typed:
        write["typed"] = True
    if args.dummy_embeddings:
        write["add_dummy_embeddings"] = True
    if args.lossy:
        write["lossy"] = True
    if args.num_layers is not None:
        write["num_layers"] = args.num_layers
    if args.model_config is not None:
        if args.to != "gguf":
            raise ConfigError(f"--model-config is for --to gguf (the base model's architecture), not {args.to}")
        write["model_config"] = args.model_config
    elif args.to == "gguf":
        raise ConfigError("--to gguf needs --model-config BASE (the base model's config.json, or its folder): the "
                          "tensor names and q/k row order depend on the architecture")
    update, close = _progress(3, args.quiet, "convert", unit="step")  # read, convert, write
    try:
        out = convert_path(args.adapter, args.output, args.to, from_=args.from_format, force=args.force,
                           read_options=read, progress=update, **write)
    finally:
        close()
    if args.json:
        _print_json({"command": "convert", "adapter": str(args.adapter), "from": args.from_format or _format_of(args.adapter),
                     "to": args.to, "output": str(out)})
    if not args.quiet:
        print(f"wrote the {args.to} adapter to {out}", file=sys.stderr)
    return 0


# --- init -----------------------------------------------------------------------------------------
def _cmd_init(args: argparse.Namespace, log: _Log) -> int:
    from .create import create_adapter, open_state
    from .extract import write_adapter
    from .io import read_config
    from .io.stream import _check_output, open_model
    from .methods import describe_method

    out = Path(args.output)
    _check_output(out, [Path(args.base)], args.force)
    base_out = Path(args.base_out) if args.base_out else None
    if base_out is not None:
        if base_out.absolute() == out.absolute():
            raise ConfigError(f"--base-out {base_out} and -o {out} are the same path; the new base model and the "
                              f"adapter need one each")
        _check_output(base_out, [Path(args.base)], args.force)
    config = read_config(args.config, strict=args.strict) if args.config else _config_from_flags(args)
    order, transposed = _parameter_flags(args, config)
    state, model_type = open_state(args.base)
    _hint_fast_init(config, state, log)
    if transposed is not None:
        _warn_unused_transposed(config, state, log)
    update, close = _progress(None, args.quiet, "init", unit="module")  # targets chosen inside
    try:
        ad, new_base = create_adapter(state, config, seed=args.seed, layer_kinds=_layer_kinds(args.layer_kind),
                                      model_type=args.model_type or model_type, return_base=True, progress=update,
                                      parameter_order=order, is_transposed=transposed)
    except ConfigError as exc:
        if "parameter_order" not in str(exc):
            raise
        raise ConfigError(f"{exc}. On the command line: --parameter-order NAME,NAME,... (the module's targeted "
                          f"parameters, the first registered first)") from exc
    finally:
        close()
    if new_base and base_out is None:
        init_field = describe_method(config.peft_type).init_field
        raise ConfigError(f"{init_field}={getattr(config, init_field or '', None)!r} changes "
                          f"{len(new_base)} base weights; pass --base-out NEW_BASE to write the new base model")
    if base_out is not None and not new_base:
        log.warn(f"--base-out {base_out}: this initialisation leaves the base model unchanged; not written")
    fresh_base = base_out is not None and new_base and not base_out.exists()
    if new_base:
        from .io.stream import write_with_replacements

        write_with_replacements(open_model(args.base), new_base, base_out, force=args.force)
    try:
        write_adapter(ad, out, force=args.force)
    except BaseException:
        if fresh_base and base_out.is_dir():  # no new base without its adapter
            shutil.rmtree(base_out, ignore_errors=True)
        elif fresh_base:
            base_out.unlink(missing_ok=True)
        raise
    from .methods.lora_replication import distinct_arrays, replicated_view

    shown, model = replicated_view(ad, state)  # layer_replication: the deeper model's modules, shared weights once
    summary = shown.summary(model)["modules"]
    if args.json:
        _print_json({"command": "init", "output": str(out), "peft_type": ad.peft_type,
                     "base_out": str(base_out) if base_out is not None and new_base else None,
                     "trainable_parameters": ad.num_trainable_parameters(), "modules": summary})
    elif not args.quiet:
        print(_table([[r["module"], r["kind"], str(r.get("r", "")), str(r.get("alpha", "")),
                       f"{r['scaling']:.4g}" if "scaling" in r else "", str(r["parameters"])] for r in summary],
                     ["module", "kind", "r", "alpha", "scaling", "parameters"]))
    if not args.quiet:
        print(shown.trainable_parameters_line(distinct_arrays(model)), file=sys.stderr)
        print(f"wrote {ad.peft_type} adapter ({len(ad.modules)} modules) to {out}", file=sys.stderr)
    return 0


def _parameter_flags(args: argparse.Namespace, config: Any) -> tuple[list[str] | None, bool | None]:
    """``(parameter_order, is_transposed)`` for :func:`~peftmath.create.create_adapter` from ``init``'s
    ``--parameter-order`` and ``--is-transposed`` / ``--no-is-transposed``, checked against ``config``: both describe
    how LoRA's ``target_parameters`` wrap raw parameters, so a config without them is a :class:`ConfigError` naming
    the flag, as are a name given twice and a name that no ``target_parameters`` entry ends with."""
    order, transposed = args.parameter_order, args.is_transposed
    given = [flag for flag, value in (("--parameter-order", order),
                                      ("--is-transposed" if transposed else "--no-is-transposed", transposed))
             if value is not None]
    if not given:
        return None, None
    patterns = list(getattr(config, "target_parameters", None) or ())
    if not patterns:
        raise ConfigError(
            f"{' and '.join(given)}: these describe how LoRA's target_parameters (raw parameters, e.g. a mixture-of-"
            f"experts block's 3-D gate_up_proj / down_proj) are wrapped, and this {config.peft_type} config targets no "
            f"parameters; set target_parameters (--target-parameter NAME, or in the adapter_config.json given with "
            f"--config), or leave out {' and '.join(given)}")
    if order is not None:
        twice = sorted({n for n in order if order.count(n) > 1})
        if twice:
            raise ConfigError(f"--parameter-order names {', '.join(twice)} more than once; list each parameter once, "
                              f"the first registered first")
        leaves = sorted({t.rsplit(".", 1)[-1] for t in patterns})
        stray = [n for n in order if n not in leaves]
        if stray:
            raise ConfigError(f"--parameter-order names {', '.join(stray)}, which no target_parameters entry "
                              f"({', '.join(patterns)}) ends with; list the targeted parameters ({', '.join(leaves)}), "
                              f"the first registered in the module first")
    return order, transposed


def _warn_unused_transposed(config: Any, state: Any, log: _Log) -> None:
    """``--is-transposed`` / ``--no-is-transposed`` decide the layout of 3-D experts parameters only: say so when
    the targeted parameters of ``state`` have none."""
    patterns = list(getattr(config, "target_parameters", None) or ())
    if not any(len(getattr(v, "shape", ())) == 3 for k, v in state.items()
               if any(k == t or k.endswith("." + t) for t in patterns)):
        log.warn(f"--is-transposed / --no-is-transposed: no targeted parameter is 3-D (target_parameters "
                 f"{', '.join(patterns)}); the flag decides the (E, in, out) vs (E, out, in) layout of experts "
                 f"tensors only and changes nothing here")


#: ``init --init pissa`` on a base with more parameters in its targets than this gets the hint below
PISSA_HINT_PARAMETERS = 50_000_000


def _hint_fast_init(config: Any, state: dict[str, Any], log: _Log) -> None:
    """``--init pissa`` takes a full SVD of every target weight (minutes on a large model); PEFT's
    ``pissa_niter_K`` (a randomized SVD with K subspace iterations, e.g. ``pissa_niter_4``) takes seconds.
    Say so on stderr when the model is large (a hint, not a warning: --strict does not refuse it)."""
    from .methods import describe_method

    field = describe_method(config.peft_type).init_field
    if field is None or getattr(config, field, None) != "pissa" or log.verbosity < 0:
        return
    n = sum(math.prod(getattr(v, "shape", ())) for k, v in state.items() if k.endswith(".weight")
            and len(getattr(v, "shape", ())) >= 2)
    if n > PISSA_HINT_PARAMETERS:
        print(f"peftmath: init: pissa takes a full SVD of every target weight ({n / 1e6:.0f}M weight parameters in "
              f"the model: minutes); --init pissa_niter_4 (PEFT's fast PiSSA, a randomized SVD with 4 subspace "
              f"iterations) gives nearly the same factors in seconds", file=sys.stderr)


def _config_from_flags(args: argparse.Namespace) -> Any:
    """The config that ``init``'s flags describe: the method's defaults, then --rank, --alpha, --use-dora,
    --target, --target-parameter, --init.

    A flag the method has no field for is an error (IA3 has no rank, OFT no alpha, ...). ``--rank``
    zeroes the fields the method description lists in ``rank_excludes`` (OFT's ``oft_block_size``: PEFT
    wants exactly one of them).
    """
    import dataclasses

    from .io import config_from_dict
    from .methods import describe_method

    peft_type = args.method.upper()
    method = describe_method(peft_type)
    cls = method.config
    known = {f.name for f in dataclasses.fields(cls)}
    given: dict[str, tuple[str, Any]] = {}
    if args.target:
        given["target_modules"] = ("--target", args.target[0] if len(args.target) == 1 and (
            args.target[0].lower() == "all-linear" or not re.fullmatch(r"[\w.]+", args.target[0])) else args.target)
    if args.target_parameter:
        given["target_parameters"] = ("--target-parameter", args.target_parameter)
    if args.r is not None:
        given["r"] = ("--rank", args.r)
    if args.use_dora:
        given["use_dora"] = ("--use-dora", True)
    if args.alpha is not None:
        alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha
        given["lora_alpha" if "lora_alpha" in known else "alpha"] = ("--alpha", alpha)
    if args.init is not None:
        if method.init_field is None:
            raise ConfigError(f"--init: {peft_type} has no initialisation field; leave out --init")
        value: Any = {"true": True, "false": False}.get(args.init.lower(), args.init)
        given[method.init_field] = ("--init", value)
    for field, (option, _) in given.items():
        if field not in known:
            raise ConfigError(f"{option}: {peft_type} has no field {field!r}; give this method's fields in an "
                              f"adapter_config.json with --config")
    fields = {**cls().to_dict(), **{f: v for f, (_, v) in given.items()}, "peft_type": peft_type}
    if "r" in given:
        fields.update(method.fields_for_rank())  # OFT: r or oft_block_size, PEFT wants exactly one
    try:
        return config_from_dict(fields, source="command line", strict=args.strict)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the flags set r, alpha, use_dora, target_modules, target_parameters and the init "
                          f"field; give the other fields in an adapter_config.json with --config)") from exc


# --- extract ----------------------------------------------------------------------------------
def _cmd_extract(args: argparse.Namespace, log: _Log) -> int:
    from .extract import extract_lora

    t0 = time.perf_counter()
    if args.plot:
        from .plot import _pyplot

        _pyplot()  # refuse before the work when matplotlib is missing
    from .io.stream import open_model

    spectra: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    total = None
    if not args.quiet and sys.stderr.isatty():  # the bar's length; extract_lora reports a bad path itself
        try:
            total = len(open_model(args.tuned).keys())
        except (PeftMathError, OSError):
            pass
    update, close = _progress(total, args.quiet, "extract", unit="tensor")
    try:
        options = dict(rank=args.rank, energy=args.energy, include=args.include, exclude=args.exclude,
                       randomized=not args.exact, layer_kinds=_layer_kinds(args.layer_kind),
                       fan_in_fan_out=args.fan_in_fan_out, force=args.force, log=log, singular_values=spectra,
                       progress=update, totals=totals)
        if _engine_wanted(args):  # one task per tensor on dask.distributed: the same adapter
            from .engines import dask as engine

            with engine.client(args.workers, args.scheduler) as c:
                report = engine.extract(args.base, args.tuned, args.output, client=c, **options)
        else:
            report = extract_lora(args.base, args.tuned, args.output, **options)
    finally:
        close()
    if args.model_card:
        _extract_card(args, report)
    if args.plot:
        from .plot import plot_energy_curve

        plot_energy_curve(spectra, args.plot, rank=args.rank, energy=args.energy)
        if not args.quiet:
            print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows = [[m, v["layer"], "x".join(map(str, v["shape"])), str(v["rank"]), f"{v['relative_error']:.3e}",
                 v["svd"]] for m, v in report.items()]
        rows.append(["(all modules)", "", "", "", f"{totals['relative_error']:.3e}", ""])
        print(_table(rows, ["module", "layer", "weight", "rank", "relative error", "svd"]))
    if not args.quiet:
        print(f"wrote LoRA adapter ({len(report)} modules) to {args.output} in {time.perf_counter() - t0:.2f} s; "
              f"relative error over all modules {totals['relative_error']:.3e} "
              f"(sqrt(sum |D - BA|_F^2 / sum |D|_F^2), {'exact' if args.exact else 'randomized'} SVD)",
              file=sys.stderr)
    return 0


def _extract_card(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """``extract --model-card``: README.md in the written adapter folder."""
    import shlex

    from .io import stream

    pattern = lambda r: getattr(r, "pattern", r)  # noqa: E731
    options = {"rank": args.rank, "energy": args.energy, "include": pattern(args.include),
               "exclude": pattern(args.exclude), "svd": "exact" if args.exact else "randomized",
               "fan_in_fan_out": args.fan_in_fan_out, "layer_kinds": list(args.layer_kind or [])}
    options = {k: v for k, v in options.items() if v not in (None, False, [])}
    cmd = ["peftmath", "extract", args.base, args.tuned, "--rank", args.rank, "-o", args.output]
    for flag, v in (("--energy", args.energy), ("--include", pattern(args.include)),
                    ("--exclude", pattern(args.exclude))):
        cmd += [flag, v] if v is not None else []
    cmd += ["--exact"] if args.exact else []
    cmd += ["--fan-in-fan-out"] if args.fan_in_fan_out else []
    cmd += [x for k in (args.layer_kind or []) for x in ("--layer-kind", k)]
    text = stream.extract_model_card(args.base, args.tuned, args.output, options, report,
                                     shlex.join(str(x) for x in cmd) + " --model-card")
    stream.write_model_card(stream.model_card_path(args.output, True), text)


# --- demo -------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, log: _Log) -> int:
    from .demo import run_demo

    return run_demo(args.dir, force=args.force, quiet=args.quiet, log=log, json_output=args.json,
                    progress=lambda total: _progress(total, args.quiet, "demo", unit="example"))


# --- the parser -------------------------------------------------------------------------------
def _add_output(parser: argparse.ArgumentParser, metavar: str, help: str | None = None, *,
                force_help: str | None = None) -> None:
    """The ``-o/--output`` (required) and ``--force`` options every writing command takes."""
    parser.add_argument("-o", "--output", required=True, metavar=metavar, help=help)
    parser.add_argument("--force", action="store_true", help=force_help or f"replace {metavar} if it exists")


_LAYER_KIND_HELP = ("layer kind of a module whose kind the evidence leaves open (a square weight), e.g. "
                    "h.0.attn.c_attn=Conv1D: Linear, Conv1D, Embedding, Conv1d, Conv2d, Conv3d")


def _add_layer_kind(parser: argparse.ArgumentParser) -> None:
    """``--layer-kind MODULE=KIND`` (repeatable), parsed by :func:`_layer_kind_item`: a malformed value is a
    usage error."""
    parser.add_argument("--layer-kind", action="append", type=_layer_kind_item, metavar="MODULE=KIND",
                        help=_LAYER_KIND_HELP)


def build_parser() -> argparse.ArgumentParser:
    def verbosity_options(parser: argparse.ArgumentParser, default: Any) -> None:
        parser.add_argument("-q", "--quiet", action="store_true", default=default if default is not None else False,
                            help="print only data and errors")
        parser.add_argument("-v", "--verbose", action="count", default=default if default is not None else 0,
                            help="more logging; a traceback on errors")
        parser.add_argument("--strict", action="store_true", default=default if default is not None else False,
                            help="every warning is an error (exit 1, nothing written): unknown config fields, "
                                 "lossy conversions, skipped modules, ...")

    common = argparse.ArgumentParser(add_help=False)
    verbosity_options(common, argparse.SUPPRESS)  # given after the command, or before it

    p = argparse.ArgumentParser(
        prog="peftmath",
        description="Inspect, merge, unmerge and extract PEFT adapters on safetensors models, without PyTorch. "
                    "Start with `peftmath demo`.",
        epilog=EPILOG_MODELS + "\nRun `peftmath COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verbosity_options(p, None)
    p.add_argument("--version", action="version", version=f"peftmath {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser("demo", parents=[common], formatter_class=raw,
                       help="build a small model and one adapter per method; inspect, merge, unmerge, verify",
                       description="Build a small model (Linear with and without bias, Embedding, 3x3 and 1x1 "
                                   "Conv2d, transformers Conv1D, and for LoRA's target_parameters and attention "
                                   "rows a mixture-of-experts block and an nn.MultiheadAttention) and one "
                                   "PEFT-format adapter per example of every method peftmath implements; inspect, "
                                   "merge (the same streaming code as `peftmath merge`), unmerge, and verify against "
                                   "a float64 reference. Forward-only examples (aLoRA) check the forward and that "
                                   "merge is refused. Prints one row per example; exits 1 if an error exceeds its "
                                   "bound.")
    d.add_argument("dir", nargs="?", help="folder to write the model and adapters into (default: a temporary "
                                          "folder, removed at the end)")
    d.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    d.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the table: {examples: [{example, method, modules, "
                        "trainable_parameters, merge_error, round_trip_error, seconds, check}], forward_examples, "
                        "bound, failed, seconds}")
    d.set_defaults(func=_cmd_demo)

    vf = sub.add_parser("verify", parents=[common], formatter_class=raw,
                        help="is MERGED what BASE plus these adapters should be? (per tensor, against the error bound)",
                        description="Check a merged model against the exact merge of BASE with the adapters (in "
                                    "order), streamed one tensor at a time. Per adapted tensor: the max absolute and "
                                    "relative error of MERGED against the merge computed in float64, and the bound of "
                                    "peftmath's error analysis for MERGED's dtype (one rounding to the dtype plus the "
                                    "float32 compute error; --peft-compat adds PEFT's extra rounding of the delta; "
                                    "see peftmath/verify.py). Tensors no adapter touches must be bit-identical to "
                                    "BASE; missing tensors, extra tensors, dtype and shape changes are failures. "
                                    "The table goes to stdout (adapted and failing tensors; --all: every tensor), "
                                    "one summary line to stderr. Exit 0: everything within bound; 1: something "
                                    "is not (or an error); 2: usage.",
                        epilog=EPILOG_MODELS + "\nexamples:\n  peftmath verify llama/ my-lora/ llama-merged/\n"
                                               "  peftmath verify model.safetensors a/ b/ merged.safetensors --json\n")
    vf.add_argument("paths", nargs="+", metavar="PATH",
                    help="BASE ADAPTER[:SCALE] [ADAPTER[:SCALE] ...] MERGED (scales as given to merge)")
    vf.add_argument("--peft-compat", action="store_true",
                    help="judge against PEFT's rounding order (ΔW rounded to the half-precision dtype first)")
    vf.add_argument("--dtype", default="keep", type=_dtype_choice,
                    help="the dtype MERGED was written in (merge --dtype); default keep: BASE's")
    _add_layer_kind(vf)
    vf.set_defaults(func=_cmd_verify)

    df = sub.add_parser("diff", parents=[common], formatter_class=raw,
                        help="per-tensor differences between two models",
                        description="Compare two models tensor by tensor (streamed): the max absolute and relative "
                                    "difference (relative to MODEL_A), tensors only in one, dtype and shape changes. "
                                    "The table goes to stdout (differing tensors; --all: every tensor), one summary "
                                    "line to stderr. Exit 0: identical (same tensor names, dtypes, shapes and bytes; "
                                    "metadata and side files are not compared); 1: they differ (or an error); "
                                    "2: usage.",
                        epilog=EPILOG_MODELS + "\nexample:\n  peftmath diff merged-by-peft/ merged-by-peftmath/ --json\n")
    df.add_argument("model_a", metavar="MODEL_A")
    df.add_argument("model_b", metavar="MODEL_B")
    df.set_defaults(func=_cmd_diff)
    for parser, hidden in ((vf, "untouched"), (df, "identical")):
        parser.add_argument("--json", action="store_true", help="machine-readable output: every tensor's numbers")
        parser.add_argument("--all", action="store_true", help=f"list every tensor, {hidden} ones too")

    i = sub.add_parser("inspect", parents=[common], formatter_class=raw,
                       help="describe an adapter: method, targets, ranks, parameters, delta norms",
                       description="Describe a PEFT adapter folder: method, target modules, rank per module "
                                   "(rank_pattern resolved), trainable parameters, dtypes, and for additive methods "
                                   "the Frobenius norm and top singular values of each module's delta weight. "
                                   "With --base, check that every adapted module exists in BASE with a "
                                   "compatible shape (exit 1 if not).",
                       epilog=EPILOG_MODELS)
    i.add_argument("adapter", help="PEFT adapter folder")
    i.add_argument("--base", help="base model to check the adapter against (headers only are read)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--top", type=_COUNT, default=3, help="number of singular values to show (default 3)")
    i.add_argument("--plot", metavar="FILE.png", help="draw each module's singular-value spectrum and ||dW|| "
                   "(needs matplotlib: pip install 'peftmath[plot]'); with --base, dW = merge(W) - W")
    _add_layer_kind(i)
    i.set_defaults(func=_cmd_inspect)

    for name, helptext in (("merge", "merge adapters into a model (streamed, one tensor at a time)"),
                           ("unmerge", "remove merged adapters from a model (the inverse of merge)")):
        s = sub.add_parser(name, parents=[common], help=helptext, formatter_class=raw,
                           description=helptext[0].upper() + helptext[1:] + ".",
                           epilog=MERGE_EPILOG if name == "merge" else EPILOG_MODELS + (
                               "\nAdditive methods subtract their delta; IA3 divides; OFT/BOFT apply the inverse "
                               "rotation. DoRA needs the weight norms recorded by `peftmath merge` (read from "
                               "MERGED.merge-records.safetensors, or --records FILE). Several adapters are unmerged "
                               "in reverse order. The adapters given must be the last ones merged, as recorded in "
                               "MERGED's safetensors metadata (peftmath.merged); anything else is refused unless "
                               "--ignore-provenance. A model without that metadata (merged by another tool) is "
                               "unmerged with a warning.\n\n"
                               "example:\n  peftmath unmerge llama-merged/ my-lora/ -o llama-restored/\n"))
        s.add_argument("base" if name == "merge" else "merged", metavar="BASE" if name == "merge" else "MERGED",
                       help="model (.safetensors file or shard folder)")
        s.add_argument("adapters", nargs="+", metavar="ADAPTER[:SCALE]", type=_adapter_arg,
                       help="PEFT adapter folder(s), merged in order; ADAPTER:0.5 applies one with a scale "
                            "(additive methods: 0.5·ΔW, PEFT's scale_layer; IA3: l -> 1 + 0.5·(l - 1); refused for "
                            "OFT/BOFT). Unmerge takes the scale it was merged with; it is recorded in the metadata")
        _add_output(s, "OUT", "output model: a file if the input is a file, a folder if it is a folder")
        s.add_argument("--dry-run", action="store_true", help="print the plan (tensor, operation, shapes, dtype path, "
                                                              "bytes) and write nothing")
        s.add_argument("--json", action="store_true",
                       help="print a JSON report on stdout: {command, output, adapters, tensors, adapted, copied, "
                            "bytes_written, seconds, records_file, records, side_files, left_out, model_card}; "
                            "with --dry-run the plan: {command, dry_run, output, bytes_out, tensors: [{key, "
                            "operation, shape, src_dtype, work_dtype, dst_dtype, bytes, adapters}]}")
        s.add_argument("--peft-compat", action="store_true", help="reproduce PEFT's rounding order bit for bit")
        s.add_argument("--backend", help="compute backend (numpy by default; torch, cupy, ... when installed)")
        _add_engine(s, name)
        _add_layer_kind(s)
        s.add_argument("--max-shard-size", type=_size_arg, metavar="SIZE",
                       help="write OUT as a folder of shards of at most SIZE each (5GB, 500MB, 2GiB), named "
                            "model-00001-of-0000N.safetensors as transformers names them, with a new index")
        s.add_argument("--dtype", type=_dtype_choice, default="keep", metavar="{keep,float32,float16,bfloat16}",
                       help="dtype of the floating-point tensors written (default keep; also f32/fp32, f16/fp16, "
                            f"bf16); adapted tensors are {name}d in the wider of the two and rounded once")
        if name == "merge":
            s.add_argument("--safe", action="store_true", help="refuse (exit 1, nothing written) a result with NaN/inf")
            s.add_argument("--model-card", action="store_true",
                           help="also write a README.md model card with the provenance (adapters, sha256, scale, "
                                "options, peftmath version): OUT/README.md, or beside a single-file OUT")
            s.add_argument("--records", metavar="FILE", help="where to write the merge records (DoRA weight norms); "
                                                            "default OUT.merge-records.safetensors, beside OUT")
            s.set_defaults(func=_cmd_merge)
        else:
            s.add_argument("--records", metavar="FILE", help="merge records file (DoRA weight norms); default "
                                                            "MERGED.merge-records.safetensors")
            s.add_argument("--ignore-provenance", action="store_true",
                           help="unmerge even if MERGED's metadata says these adapters are not the last ones merged")
            s.set_defaults(func=_cmd_unmerge)

    e = sub.add_parser("extract", parents=[common], formatter_class=raw,
                       help="a LoRA adapter from a fine-tuned model (truncated SVD of TUNED - BASE)",
                       description="Write a PEFT LoRA adapter approximating TUNED - BASE: for every weight "
                                   "(2-D, or a conv) that differs, a truncated SVD of rank R (or less with "
                                   "--energy), randomized by default (--exact: the full SVD). The relative error "
                                   "|D - BA|_F / |D|_F achieved per module, and over all modules, is printed; the "
                                   "per-module one is stored in the adapter's safetensors metadata (key "
                                   "peftmath.extract). "
                                   "2-D weights named like embeddings (embed_tokens, wte, ...) are Embeddings; "
                                   "use --fan-in-fan-out for GPT-2 style Conv1D models.",
                       epilog=EPILOG_MODELS + "\nexample:\n  peftmath extract llama/ llama-ft/ --rank 16 "
                                              "--exclude 'lm_head|embed' -o extracted-lora/\n")
    e.add_argument("base", metavar="BASE")
    e.add_argument("tuned", metavar="TUNED")
    e.add_argument("--rank", "--r", type=_POSITIVE_INT, required=True, metavar="R",
                   help="LoRA rank (upper bound with --energy)")
    e.add_argument("--energy", type=_FRACTION, metavar="E",
                   help="per module, the smallest rank <= R keeping this fraction of sum(sigma^2), e.g. 0.99")
    e.add_argument("--include", type=_regex, metavar="REGEX", help="only modules whose name matches (re.search)")
    e.add_argument("--exclude", type=_regex, metavar="REGEX", help="skip modules whose name matches (re.search)")
    svd = e.add_mutually_exclusive_group()
    svd.add_argument("--exact", action="store_true",
                     help="full SVD of every delta: the optimal truncation, minutes on a large model (default: a "
                          "randomized SVD with 2R+10 vectors and 4 subspace iterations, seconds, whose error is "
                          "within about 1e-4 (relative) of the exact one; the error printed is the one achieved)")
    svd.add_argument("--randomized", action="store_true",
                     help="the default; accepted for older command lines and does nothing")
    e.add_argument("--fan-in-fan-out", action="store_true", help="2-D weights are stored (in, out) (GPT-2 Conv1D)")
    _add_engine(e, "extraction (one task per tensor)")
    _add_layer_kind(e)
    e.add_argument("--json", action="store_true",
                   help="print the report as JSON: {module: {rank, relative_error, delta_norm (|D|_F), svd "
                        "(randomized or exact), shape, layer}}; the error over all modules is "
                        "sqrt(sum (relative_error * delta_norm)^2 / sum delta_norm^2)")
    e.add_argument("--model-card", action="store_true",
                   help="also write ADAPTER_DIR/README.md: the models, options, sha256 of the adapter files, "
                        "per-module rank and error, peftmath version")
    e.add_argument("--plot", metavar="FILE.png", help="draw each module's energy curve (fraction of sum(sigma^2) "
                   "kept against the rank; needs matplotlib: pip install 'peftmath[plot]')")
    _add_output(e, "ADAPTER_DIR")
    e.set_defaults(func=_cmd_extract)

    c = sub.add_parser("combine", parents=[common], formatter_class=raw,
                       help="a weighted combination of adapters (PEFT's add_weighted_adapter)",
                       description="Combine LoRA (or IA3) adapters into one, as PEFT's add_weighted_adapter does: "
                                   "cat is exact; linear/ties/dare_*/magnitude_prune combine the factors; the *svd "
                                   "types combine the delta weights and truncate them to --svd-rank (their "
                                   "relative truncation error is printed and stored in the adapter's metadata). "
                                   "See specs/combine.md.",
                       epilog="example:\n  peftmath combine lora-a/ lora-b/ --weights 0.7 0.3 --method ties "
                              "--density 0.5 -o combined/\n")
    c.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folders")
    c.add_argument("--weights", type=_FINITE, nargs="+", metavar="W", help="one weight per adapter (default 1 each)")
    c.add_argument("--method", default="svd", help="cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, "
                                                    "dare_linear_svd, dare_ties_svd, magnitude_prune, "
                                                    "magnitude_prune_svd (default svd)")
    c.add_argument("--svd-rank", type=_POSITIVE_INT,
                   help="rank of the *svd types (default: the largest source rank)")
    c.add_argument("--svd-clamp", type=_QUANTILE,
                   help="clamp the SVD factors at this quantile of their entries, in [0, 1]")
    c.add_argument("--density", type=_FRACTION, help="fraction kept by the pruning types, in (0, 1]")
    c.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="ties sign election")
    c.add_argument("--seed", type=_COUNT, default=0, help="seed of the DARE masks (default 0)")
    c.add_argument("--peft-compat", action="store_true", help="reproduce PEFT 0.21.2's numbers where it departs "
                                                              "from the consistent math (inherited rsLoRA)")
    c.add_argument("--json", action="store_true",
                   help="print a JSON report instead of the table: {command, output, method, weights, adapters, r, "
                        "modules, truncation_error: {module: relative error of the *svd types}}")
    _add_output(c, "ADAPTER_DIR")
    c.set_defaults(func=_cmd_combine)

    v = sub.add_parser("convert", parents=[common], formatter_class=raw,
                       help="convert an adapter between PEFT, kohya/LyCORIS, MLX and candle-lora, or to GGUF",
                       description="Convert an adapter between formats (the source format is detected from its "
                                   "files unless --from is given). Delta weights are kept exactly (within one "
                                   "ulp where a scale is folded); what the target cannot express is refused with "
                                   "an error that says what would be lost, and nothing is written. See "
                                   "specs/formats.md for each format's key grammar and scaling.",
                       epilog="examples:\n  peftmath convert my-lora/ --to kohya -o my-lora.safetensors\n"
                              "  peftmath convert adapters/ --to peft -o my-lora/          (an mlx-lm adapter)\n"
                              "  peftmath convert my-lora/ --to gguf --model-config base/ -o my-lora.gguf  (llama.cpp)\n")
    v.add_argument("adapter", metavar="ADAPTER", help="adapter folder or .safetensors file")
    v.add_argument("--to", required=True, choices=["peft", "kohya", "mlx", "candle-lora", "gguf"],
                   help="target format (gguf: a llama.cpp LoRA adapter; needs pip install 'peftmath[gguf]')")
    v.add_argument("--from", dest="from_format", choices=["peft", "kohya", "mlx", "candle-lora"],
                   help="source format (default: detected)")
    _add_output(v, "OUT", "a folder for peft and mlx, a .safetensors file for kohya and candle-lora, a .gguf "
                          "file for gguf")
    v.add_argument("--model-config", metavar="BASE", help="gguf: the base model's config.json (or its folder): "
                                                            "architecture, layer and head counts")
    v.add_argument("--prefix", help="key prefix of the written kohya / candle-lora file")
    v.add_argument("--typed", action="store_true", help="candle-lora: the typed Llama layout")
    v.add_argument("--dummy-embeddings", action="store_true", help="candle-lora: add the dummy embedding pair")
    v.add_argument("--lossy", action="store_true", help="candle-lora: drop what it cannot hold, with a warning")
    v.add_argument("--num-layers", type=_LAYERS, help="mlx: num_layers of the written config (default -1: all)")
    v.add_argument("--modules-from", metavar="BASE", help="module names from a base model (kohya / candle-lora "
                                                           "files written by other tools)")
    v.add_argument("--alpha", dest="lora_alpha", type=_POSITIVE,
                   help="candle-lora source: its alpha (the files do not hold it)")
    v.add_argument("--lora-alpha", dest="lora_alpha", type=_POSITIVE, help=argparse.SUPPRESS)  # former spelling
    v.add_argument("--missing-alpha", choices=["error", "rank"], help="kohya source: a module without alpha")
    v.add_argument("--json", action="store_true",
                   help="print a JSON report on stdout: {command, adapter, from, to, output}")
    v.set_defaults(func=_cmd_convert)

    n = sub.add_parser("init", parents=[common], formatter_class=raw,
                       help="a new adapter for a model, selected and initialised as PEFT's get_peft_model would",
                       description="Create a PEFT-format adapter for BASE: modules selected with PEFT's "
                                   "target_modules rules (a list of names or suffixes, a regex, 'all-linear', or "
                                   "PEFT's default for the model_type of BASE's config.json), initialised with "
                                   "PEFT's placement of zeros from --seed. Give a full adapter_config.json with "
                                   "--config, or the common fields as flags. Initialisations that change the base "
                                   "(pissa, olora, loftq) need --base-out.",
                       epilog="examples:\n  peftmath init llama/ --method lora --rank 16 --alpha 32 --target all-linear "
                              "-o my-lora/\n  peftmath init llama/ --config adapter_config.json -o my-adapter/\n")
    n.add_argument("base", metavar="BASE", help="model (.safetensors file or folder)")
    n.add_argument("--config", metavar="CONFIG_JSON", help="an adapter_config.json (any method)")
    n.add_argument("--method", default="lora", help="peft_type when no --config is given (default lora)")
    n.add_argument("--rank", dest="r", type=_POSITIVE_INT, metavar="R", help="rank (the config's r)")
    n.add_argument("--r", dest="r", type=_POSITIVE_INT, help=argparse.SUPPRESS)  # former spelling
    n.add_argument("--alpha", type=_FINITE, help="alpha (lora_alpha for LoRA and AdaLoRA)")
    n.add_argument("--lora-alpha", dest="alpha", type=_FINITE, help=argparse.SUPPRESS)  # LoRA's field name
    n.add_argument("--use-dora", action="store_true", help="DoRA (LoRA's use_dora=true; a magnitude vector per module)")
    n.add_argument("--target", type=_regex, action="append", metavar="NAME",
                   help="a target module (repeat), a regex, or all-linear")
    n.add_argument("--target-parameter", action="append", metavar="NAME",
                   help="LoRA's target_parameters: a raw parameter to adapt (repeat), its full name or a suffix, e.g. "
                        "experts.gate_up_proj (3-D mixture-of-experts tensors, 2-D parameters)")
    n.add_argument("--parameter-order", type=_parameter_names, action="extend", metavar="NAME[,NAME...]",
                   help="target_parameters: the order in which a module registers its targeted parameters, the "
                        "first registered first (e.g. gate_up_proj,down_proj for transformers' experts). PEFT nests "
                        "the wrappers of several parameters of one module in that order, and a safetensors file "
                        "(sorted keys) does not keep it: needed when a module has more than one targeted parameter")
    n.add_argument("--is-transposed", action=argparse.BooleanOptionalAction, default=None,
                   help="target_parameters: the 3-D experts tensors are stored (E, in, out) (transformers' "
                        "is_transposed), or with --no-is-transposed (E, out, in); default: from the model_type "
                        "(True for the model types whose experts are stored so)")
    n.add_argument("--init", help="initialisation: true, false, gaussian, pissa, pissa_niter_K, olora, orthogonal, "
                                  "lycoris, ... (pissa takes a full SVD of every target weight, minutes on a large "
                                  "model; pissa_niter_4, PEFT's fast PiSSA, a randomized SVD, takes seconds)")
    n.add_argument("--seed", type=_COUNT, default=0, help="seed of the random initialisations (default 0)")
    n.add_argument("--model-type", help="transformers model_type (default: from BASE's config.json)")
    _add_layer_kind(n)
    n.add_argument("--base-out", metavar="NEW_BASE", help="where to write the changed base model (pissa, olora, loftq)")
    n.add_argument("--json", action="store_true",
                   help="print a JSON report instead of the table: {command, output, peft_type, base_out, "
                        "trainable_parameters, modules: [{module, kind, r, alpha, scaling, parameters, ...}]}")
    _add_output(n, "ADAPTER_DIR", force_help="replace existing outputs")
    n.set_defaults(func=_cmd_init)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    verbosity = -1 if args.quiet else 1 + args.verbose
    log = _Log(verbosity)
    with warnings.catch_warnings():  # restores the caller's filters and showwarning
        warnings.showwarning = log.show
        if args.strict:
            for category in _strict_categories():
                warnings.simplefilter("error", category)
        return _run(args, log)


def _strict_categories() -> tuple[type[Warning], ...]:
    """The warnings ``--strict`` turns into errors: peftmath's own (:class:`PeftMathWarning`, which
    ``formats.ConversionWarning``, a lossy or incomplete conversion, is one of)."""
    return (PeftMathWarning,)


def _run(args: argparse.Namespace, log: _Log) -> int:
    """Run the command; an error becomes one line on stderr and exit status 1."""
    try:
        return int(args.func(args, log) or 0)
    except BrokenPipeError:  # `peftmath inspect ... | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except (PeftMathError, Warning, OSError, re.error) as exc:
        if args.verbose:
            traceback.print_exc()
        if isinstance(exc, PeftMathError):
            msg = str(exc)
        elif isinstance(exc, Warning):  # raised as an error by --strict (or by python -W error)
            msg = (f"{exc} (a warning; --strict makes it an error)" if isinstance(exc, _strict_categories())
                   else f"{type(exc).__name__}: {exc} (a warning that the warnings filter raises as an error)")
        elif isinstance(exc, re.error):  # a regular expression of an adapter config (rank_pattern, target_modules)
            msg = f"invalid regular expression {exc.pattern!r}: {exc.msg}" + (
                f" at position {exc.pos}" if exc.pos is not None else "")
        else:
            msg = f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}"
        print(f"peftmath: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("peftmath: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
