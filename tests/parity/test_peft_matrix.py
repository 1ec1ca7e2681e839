"""PEFT's own test matrix, swept through real PEFT 0.21.2 and peftmath: PEFT's numbers or a clear refusal.

The rows are PEFT 0.21.2's ``tests/test_custom_models.py`` ``TEST_CASES`` (331 rows over small custom
models), kept as our own data in :mod:`tests.parity.peft_matrix` with the models re-implemented for this
test. For each row:

1. the model is built from a NumPy seed and its state dict kept (NumPy, and written as
   ``base.safetensors`` with the ``safetensors`` library); ``peft.get_peft_model(model, Config(**kw))``
   (torch seeded), then every trainable parameter gets ``N(0, 0.1²)`` added (:func:`perturb`), so no
   adapter is a no-op (LoRA's ``B``, AdaLoRA's ``E``, VeRA's ``λ_b`` start at zero) and every
   ``modules_to_save`` copy differs from the base; ``save_pretrained`` writes the adapter folder;
2. ``peftmath.load_adapter`` reads the folder. Then, for a loaded adapter:

   * the adapted modules are PEFT's (the ``BaseTunerLayer`` modules of the PEFT model);
   * per module, ``Adapter.forward`` equals the PEFT layer's (unmerged, eval) output on a random input;
   * ``Adapter.merge(base)`` equals PEFT's ``merge_and_unload().state_dict()``: the same keys (none added,
     none missing), shapes, dtypes and values. Where PEFT cannot merge (it raises), a peftmath merge is
     checked by running each merged base layer (a copy of the torch layer holding the merged weight)
     on the same input as PEFT's unmerged forward;
   * the base arrays are unchanged afterwards;

3. ``peftmath merge base.safetensors ADAPTER -o merged.safetensors`` (``peftmath.cli.main``) gives the
   same tensors as ``Adapter.merge``, or refuses (exit 1) where the API refuses.

Each row ends in one outcome, the worst of its checks: ``pass`` (PEFT's numbers everywhere),
``refused`` (a :class:`peftmath.errors.PeftMathError` or exit 1, message kept), ``FAIL-silent`` (a number,
key or module set differs and nothing was raised) or ``FAIL-crash`` (another exception). ``skipped``
marks a row PEFT itself cannot build here (AdaMSS needs scikit-learn). The test passes a row when its
outcome is in :func:`tests.parity.peft_matrix.expected`: ``pass`` for a claimed method, ``pass`` or
``refused`` for a variant peftmath may refuse or a method it does not claim.

Tolerances (float32, from the usual error bound ``|fl(Σ) - Σ| <= n·u·Σ|terms|`` with ``u = 6e-8`` and at
most ~150 terms of size <= the operands here): merged tensors within ``1e-5·(max(1, max|want|) + |want|)``,
forwards within ``1e-4`` on the same scale. A wrong answer here is of the size of the adapter's change,
~1e-2 to 1e-1. Measured over the 150 rows of claimed methods: merged tensors at most 1.9e-6 off (largest
|value| 9.8), forwards 1.9e-5 (largest |value| 57). The whole matrix takes ~30 s on two cores.

``python -m tests.parity.test_peft_matrix`` runs the whole matrix and prints the counts per config class
and per outcome, then every row that is not ``pass`` with its reason.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.parity.conftest import (
    base_state,
    layer_kwargs,
    make_input,
    max_abs,
    n2t,
    peft_attention_out_projection,
    peft_forward,
    peft_layer,
    require_peft,
    t2n,
)
from tests.parity.peft_matrix import MAY_REFUSE, ROWS, build, expected, make_config

torch, peft = require_peft()

import peftmath as pmath  # noqa: E402
from peftmath import cli  # noqa: E402
from peftmath._mha import out_proj_owner  # noqa: E402
from peftmath.errors import PeftMathError  # noqa: E402

pytestmark = [pytest.mark.parity]

OUTCOMES = ("pass", "refused", "FAIL-silent", "FAIL-crash")
RTOL_MERGE = 1e-5
RTOL_FORWARD = 1e-4
PERTURB_STD = 0.1
EPS32 = float(np.finfo(np.float32).eps)


@dataclass
class Result:
    """The outcome of one row (the worst of its checks) and what each non-passing check said."""

    row: str
    config: str
    outcome: str = "pass"
    notes: list[str] = field(default_factory=list)
    #: True when PEFT's merged model equals the base (the row would test nothing)
    vacuous: bool = False

    def add(self, outcome: str, note: str) -> None:
        self.notes.append(f"[{outcome}] {' '.join(note.split())}")
        if self.outcome == "skipped" or OUTCOMES.index(outcome) > OUTCOMES.index(self.outcome):
            self.outcome = outcome


# --------------------------------------------------------------------------------------------------
# PEFT's side
# --------------------------------------------------------------------------------------------------
def perturb(peft_model, *, seed: int, std: float = PERTURB_STD) -> None:
    """Add ``N(0, std²)`` (NumPy seed, in parameter order) to every trainable parameter of ``peft_model``."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, std, tuple(p.shape)).astype(np.float32)).to(p.dtype))


def tuner_modules(peft_model) -> list[str]:
    """Names (relative to the base model) of the modules PEFT wrapped with an adapter layer (LoRA's trainable
    tokens: the wrapped table ``m``, whose tuner layer PEFT keeps at ``m.token_adapter``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n.removesuffix(".token_adapter") for n, m in peft_model.base_model.model.named_modules()
                  if isinstance(m, BaseTunerLayer))


def _forwardable(layer) -> bool:
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    return isinstance(base, (torch.nn.Linear, torch.nn.Embedding, Conv1D, torch.nn.modules.conv._ConvNd))


def peft_merged(peft_model):
    """``(state dict of merge_and_unload() as NumPy, None)`` or ``(None, PEFT's error)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - PEFT refuses with ValueError, NotImplementedError, ...
        return None, f"{type(exc).__name__}: {exc}"
    # PEFT 0.21.2's LN tuning unload leaves modules_to_save wrappers in the merged model (it unwraps only
    # modules with a base_layer): their active copy is the merged tensor, the original_module is gone
    out = {}
    for k, v in merged.state_dict().items():
        if ".original_module." in k:
            continue
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)] = t2n(v)
    return out, None


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------
def _off(got, want, rtol: float) -> str | None:
    """None when ``got`` equals ``want`` within ``rtol·(max(1, max|want|) + |want|)``, else what differs."""
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape:
        return f"shape {g.shape} != {w.shape}"
    if g.dtype != w.dtype:
        return f"dtype {g.dtype} != {w.dtype}"
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(w64)))) if w64.size else 1.0
    bad = ~(np.abs(g64 - w64) <= rtol * (scale + np.abs(w64)))  # NaN counts as bad
    if bad.any():
        return f"{int(bad.sum())}/{bad.size} elements off, max abs err {max_abs(g64, w64):.3g} (max |want| {scale:.3g})"
    return None


def compare_states(got: dict, want: dict, what: str) -> list[str]:
    """Differences between two state dicts (keys, then each tensor), one line each."""
    problems = []
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra:
        problems.append(f"{what}: keys not in the reference: {extra}")
    if missing:
        problems.append(f"{what}: keys missing: {missing}")
    for key in sorted(set(got) & set(want)):
        off = _off(got[key], want[key], RTOL_MERGE)
        if off:
            problems.append(f"{what}: {key}: {off}")
    return problems


def compare_deltas(got: dict, want: dict, base: dict, what: str) -> list[str]:
    """Differences between the changes ``got - base`` and ``want - base`` of the tensors both change, within
    ``1e-3·max|Δwant| + 4·eps32·max|want|`` (the float32 rounding of the two merged tensors, and a relative
    budget for Δ): this sees a wrong change too small for :func:`compare_states` (OFT with ``coft`` and
    PEFT's default ``eps = 6e-5`` rotates by ~1e-5)."""
    problems = []
    for key in sorted(set(got) & set(want) & set(base)):
        g, w, b = (np.asarray(a, np.float64) for a in (got[key], want[key], base[key]))
        if g.shape != w.shape or w.shape != b.shape:
            continue  # compare_states names the shape
        dg, dw = g - b, w - b
        tol = 1e-3 * float(np.max(np.abs(dw), initial=0.0)) + 4 * EPS32 * float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(dg - dw), initial=0.0))
        if not err <= tol:
            problems.append(f"{what}: {key}: the change from the base differs by {err:.3g} (tolerance {tol:.3g}, "
                            f"max |change| {float(np.max(np.abs(dw), initial=0.0)):.3g})")
    return problems


def _merged_layer_output(peft_model, name: str, merged: dict, x: np.ndarray) -> np.ndarray:
    """A copy of the base layer of ``name`` holding the merged weight (and bias), applied to ``x``."""
    layer = copy.deepcopy(peft_layer(peft_model, name).get_base_layer())
    with torch.no_grad():
        layer.weight.copy_(n2t(np.asarray(merged[f"{name}.weight"])))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(n2t(np.asarray(merged[f"{name}.bias"])))
        return t2n(layer(n2t(x)))


def _run(res: Result, what: str, fn, *, refusal_ok: bool = False):
    """``fn()``; a PeftMathError is a refusal and any other exception a crash (both noted, None returned).
    With ``refusal_ok`` (PEFT refuses the same operation) a PeftMathError is only noted."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    except PeftMathError as exc:
        if refusal_ok:
            res.notes.append(f"[note] {what} refuses, as PEFT does: {type(exc).__name__}: {exc}")
        else:
            res.add("refused", f"{what}: {type(exc).__name__}: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - exactly what the sweep classifies
        res.add("FAIL-crash", f"{what}: {type(exc).__name__}: {exc}")
        return None
    for w in caught:  # peftmath's own warnings, noted (each should be a PeftMathWarning)
        if issubclass(w.category, pmath.errors.PeftMathWarning) or "/peftmath/" in str(w.filename):
            res.notes.append(f"[warning] {what}: {w.category.__name__}: {w.message}")
    return out


def _compat_forward_matches(ad, mod: str, x, state: dict, kw: dict, want) -> bool:
    """Whether ``Adapter.forward(..., peft_compat=True)`` (where the method has it) gives ``want``: where
    PEFT's unmerged forward is inconsistent with its own merge (OFT on Conv2d, specs/oft.md), peftmath's
    default is the consistent forward and ``peft_compat=True`` PEFT's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ad.forward(mod, x, state, peft_compat=True, **kw)
    except Exception:  # noqa: BLE001 - no peft_compat forward for this method: the default stands
        return False
    return _off(np.asarray(got), want, RTOL_FORWARD) is None


def _cli_merge(base_file: Path, adapter_dir: Path, out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["merge", str(base_file), str(adapter_dir), "-o", str(out)])
    return rc, " ".join(err.getvalue().split())


# --------------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------------
def run_row(row, folder: Path) -> Result:
    """Run ``row`` (PEFT, then peftmath's API and command) in the empty folder ``folder``."""
    from safetensors.numpy import load_file, save_file

    name, model_id, cls_name, kwargs = row
    res = Result(name, cls_name)
    model = build(model_id, seed=0)
    state = base_state(model)
    pristine = {k: v.copy() for k, v in state.items()}
    try:
        config = make_config(cls_name, kwargs)
    except ImportError as exc:  # an optional dependency of that PEFT method is not installed
        res.outcome = "skipped"
        res.notes.append(f"[skipped] PEFT cannot build the row here: {exc}")
        return res
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config)
    perturb(pm, seed=1)
    pm.eval()
    adapter_dir, base_file = folder / "adapter", folder / "base.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(adapter_dir)
    save_file(state, str(base_file))

    # peftmath's API: load, modules, forward, merge
    ad = _run(res, "load_adapter", lambda: pmath.load_adapter(adapter_dir))
    api_merged = None
    if ad is not None:
        theirs = tuner_modules(pm)
        ours = ad.modules
        if ours != theirs:
            res.add("FAIL-silent", f"adapted modules: peftmath {ours}, PEFT {theirs}")
        inputs, outputs = {}, {}
        for mod in ours:
            if mod not in theirs or not _forwardable(peft_layer(pm, mod)):
                continue
            x = make_input(pm, mod)
            # an nn.MultiheadAttention's out-projection (X.base_layer.out_proj): PEFT's attention runs it merged,
            # with its change added twice; the inner lora.Linear's own forward (the change once) is never run
            owner = out_proj_owner(mod)
            inputs[mod] = x
            outputs[mod] = peft_forward(pm, mod, x) if owner is None else peft_attention_out_projection(pm, owner, x)
            kw = layer_kwargs(pm, mod)
            got = _run(res, f"forward {mod}", lambda: ad.forward(mod, x, state, **kw))
            off = None if got is None else _off(np.asarray(got), outputs[mod], RTOL_FORWARD)
            if off and _compat_forward_matches(ad, mod, x, state, kw, outputs[mod]):
                res.notes.append(f"[note] forward {mod}: the default differs from PEFT's unmerged forward ({off}); "
                                 f"peft_compat=True reproduces it (a documented PEFT inconsistency)")
            elif off:
                res.add("FAIL-silent", f"forward {mod}: {off}")
        reference, peft_error = peft_merged(pm)  # after the forwards: it merges PEFT's model in place
        if reference is None:
            res.notes.append(f"[note] PEFT cannot merge: {peft_error}")
        api_merged = _run(res, "Adapter.merge", lambda: ad.merge(state), refusal_ok=reference is None)
        if api_merged is not None:
            api_merged = {k: np.asarray(v) for k, v in api_merged.items()}
            if reference is not None:
                res.vacuous = all(np.array_equal(reference[k], pristine[k]) for k in pristine if k in reference)
                what = "Adapter.merge vs merge_and_unload"
                for problem in compare_states(api_merged, reference, what) + \
                        compare_deltas(api_merged, reference, pristine, what):
                    res.add("FAIL-silent", problem)
            else:  # PEFT cannot merge: the merged layers must still compute PEFT's adapted forward
                if set(api_merged) != set(pristine):
                    res.add("FAIL-silent", f"Adapter.merge keys: added {sorted(set(api_merged) - set(pristine))}, "
                                           f"missing {sorted(set(pristine) - set(api_merged))}")
                for mod, x in inputs.items():
                    off = _off(_merged_layer_output(pm, mod, api_merged, x), outputs[mod], RTOL_FORWARD)
                    if off:
                        res.add("FAIL-silent", f"merged {mod} (PEFT cannot merge) vs PEFT forward: {off}")
                if not inputs:
                    res.add("FAIL-silent", "merged where PEFT cannot, with no layer the sweep can check")
        for key, value in pristine.items():
            if not np.array_equal(state[key], value):
                res.add("FAIL-silent", f"the base tensor {key} was modified")

    # the command on the same files
    out = folder / "merged.safetensors"
    ran = _run(res, "peftmath merge", lambda: _cli_merge(base_file, adapter_dir, out))
    if ran is None:
        return res
    rc, message = ran
    if rc == 0:
        cli_merged = load_file(str(out))
        if api_merged is not None:
            what = "peftmath merge vs Adapter.merge"
            for problem in compare_states(cli_merged, api_merged, what) + \
                    compare_deltas(cli_merged, api_merged, pristine, what):
                res.add("FAIL-silent", problem)
        else:
            res.add("FAIL-silent", "peftmath merge exits 0 where the API refuses or fails")
    elif rc == 1:
        if api_merged is not None:
            res.add("refused", f"peftmath merge (the API merged): {message}")
        elif not any("peftmath merge" in n for n in res.notes):
            res.notes.append(f"[refused] peftmath merge: {message}")
    else:
        res.add("FAIL-crash", f"peftmath merge: exit {rc}: {message}")
    return res


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_matrix_is_peft_0_21_2():
    """The table is PEFT 0.21.2's: 331 rows, unique ids, every model and MAY_REFUSE row known."""
    assert len(ROWS) == 331
    assert len({r[0] for r in ROWS}) == len(ROWS)
    assert set(MAY_REFUSE) <= {r[0] for r in ROWS}
    assert peft.__version__ == "0.21.2"


@pytest.mark.parametrize(("row_id", "factor"), [("Vanilla MLP 4 LoRA", 0.99), ("Conv2d 3 OFT", 0.0),
                                                 ("Vanilla MLP 5 IA3", 1.01)])
def test_sweep_sees_a_wrong_merge(row_id, factor, tmp_path, monkeypatch):
    """The sweep is not vacuous: an ``Adapter.merge`` whose change from the base is scaled by ``factor``
    (1% off, or no change at all for OFT's ~1e-5 rotation) is a silent failure."""
    merge = pmath.Adapter.merge

    def skewed(self, state, **kw):
        out = merge(self, state, **kw)
        return {k: (state[k] + factor * (np.asarray(v) - state[k])).astype(v.dtype) if k in state else v
                for k, v in out.items()}

    monkeypatch.setattr(pmath.Adapter, "merge", skewed)
    res = run_row(next(r for r in ROWS if r[0] == row_id), tmp_path)
    assert res.outcome == "FAIL-silent", res.notes
    assert any("Adapter.merge vs merge_and_unload" in n for n in res.notes), res.notes


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_row(row, tmp_path):
    res = run_row(row, tmp_path)
    if res.outcome == "skipped":
        pytest.skip(res.notes[-1])
    assert not res.vacuous, f"{row[0]}: PEFT's merged model equals the base; the adapter is a no-op"
    allowed = expected(row)
    assert res.outcome in allowed, f"{row[0]} ({row[2]}): {res.outcome}, expected {sorted(allowed)}:\n" + \
        "\n".join(res.notes)


# --------------------------------------------------------------------------------------------------
# summary: python -m tests.parity.test_peft_matrix [substring ...]
# --------------------------------------------------------------------------------------------------
def sweep(rows=ROWS) -> list[Result]:
    """Run ``rows`` (each in its own temporary folder) and return their results."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            results.append(run_row(row, folder))
    return results


def summary(results: list[Result]) -> str:
    """Counts per config class and outcome, the totals, and every row that is not ``pass``."""
    cols = (*OUTCOMES, "skipped")
    counts = collections.defaultdict(collections.Counter)
    for r in results:
        counts[r.config][r.outcome] += 1
    width = max(len(c) for c in counts) + 2
    lines = ["config class".ljust(width) + "".join(c.rjust(13) for c in cols) + "total".rjust(8)]
    for cls in sorted(counts):
        c = counts[cls]
        lines.append(cls.ljust(width) + "".join(str(c[o]).rjust(13) for o in cols) + str(sum(c.values())).rjust(8))
    total = collections.Counter(r.outcome for r in results)
    lines.append("all".ljust(width) + "".join(str(total[o]).rjust(13) for o in cols) + str(len(results)).rjust(8))
    lines.append("")
    for r in results:
        if r.outcome != "pass":
            lines.append(f"{r.outcome}: {r.row} ({r.config})")
            lines.extend(f"    {n}" for n in r.notes)
    return "\n".join(lines)


if __name__ == "__main__":
    picked = [r for r in ROWS if not sys.argv[1:] or any(s in r[0] for s in sys.argv[1:])]
    start = time.perf_counter()
    res = sweep(picked)
    print(summary(res))
    print(f"\n{len(res)} rows in {time.perf_counter() - start:.1f} s")
