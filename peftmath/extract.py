"""What ``peftmath extract`` computes, as library code: :func:`extract_lora` (a LoRA adapter from a
fine-tuned model by a truncated SVD of ``TUNED - BASE`` per module) and :func:`write_adapter` (an adapter
folder written atomically, which ``extract``, ``combine`` and ``init`` share).

Nothing here parses arguments or prints; :mod:`peftmath.cli` does both.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, PeftMathWarning

__all__ = ["extract_lora", "extract_tensor", "ExtractTask", "write_adapter"]

#: 2-D weights with these names are Embeddings (their delta is factored as PEFT's lora_embedding_A/B)
_EMBED_RE = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)$")


#: the randomized SVD of extract: ``q = 2·rank + RANDOMIZED_OVERSAMPLE`` vectors and this many subspace
#: iterations. On power-law spectra σᵢ ∝ i^-α (α = 0.3 .. 1, 768 x 3072, rank 4 .. 64) the achieved error
#: ‖D − BA‖_F / ‖D‖_F is within 2e-4 (relative) of the exact truncation's, 1e-5 or better for α >= 0.5.
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_NITER = 4


def extract_lora(base_path: str, tuned_path: str, out: str, *, rank: int, energy: float | None = None,
                 include: str | None = None, exclude: str | None = None, randomized: bool = True,
                 layer_kinds: dict | None = None, fan_in_fan_out: bool = False, force: bool = False,
                 log: Any = None, singular_values: dict[str, np.ndarray] | None = None,
                 progress: Any = None, totals: dict[str, Any] | None = None,
                 map_tasks: Callable[[Callable[[ExtractTask], dict], list[ExtractTask]], Iterable[dict]] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Write a PEFT LoRA adapter approximating ``TUNED - BASE`` by a truncated SVD per module.

    Per weight that differs, ``D = TUNED - BASE`` as a matrix (:meth:`~peftmath.layers.Layer.as_matrix`),
    ``D ≈ U_k S_k V_kᵀ`` with ``k = min(rank, the smallest rank keeping energy·Σσ²)``, and
    ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` (``lora_alpha = r``: scale 1).

    ``randomized`` (the default) uses :func:`~peftmath._linalg.randomized_svd` with ``q = 2·rank + 10``
    vectors and 4 subspace iterations (:data:`RANDOMIZED_OVERSAMPLE`, :data:`RANDOMIZED_NITER`) where
    ``q`` is below half of ``min(D.shape)``, the full SVD elsewhere; ``randomized=False`` always takes the
    full SVD (the optimal truncation; minutes on a large model). Either way the error reported is the one
    achieved, ``‖D − BA‖_F / ‖D‖_F`` computed in float64 from the written factors, so a randomized
    result never claims more accuracy than it has. Warnings (a tensor skipped, changes the adapter does
    not capture) go to ``log.warn`` when a log is given, else :func:`warnings.warn` as a
    :class:`~peftmath.errors.PeftMathWarning`.

    Returns ``{module: {"rank", "relative_error", "delta_norm", "svd", "shape", "layer"}}`` (``delta_norm``:
    ``‖D‖_F``; ``svd``: ``"randomized"`` or ``"exact"``); rank and error are stored in the adapter's
    safetensors metadata under ``peftmath.extract``. ``totals``, when a dict is given, receives
    ``relative_error`` over all modules, ``sqrt(Σ‖D − BA‖²_F / Σ‖D‖²_F)``, and ``modules``.
    ``singular_values``, when a dict is given, receives each module's computed singular values of ``D``
    (all of them with the full SVD; the leading ``q`` with the randomized one), e.g. for
    :func:`peftmath.plot.plot_energy_curve`. ``progress(n)``, when given, is called once per tensor of
    TUNED looked at (``n = 1``).

    The work is one picklable task per tensor of TUNED (:class:`ExtractTask`, :func:`extract_tensor`: the
    comparison of an untargeted tensor, or one module's SVD), run by ``map_tasks(extract_tensor, tasks)``
    (default the built-in ``map``, in this process; ``peftmath.engines.dask.extract`` runs them on a
    cluster), whose results must come back in the order of the tasks: the adapter written is the same.
    """
    from .adapter import Adapter
    from .io.stream import _check_output, open_model
    from .layers import LayerKind
    from .methods.lora import LoraConfig

    warn = log.warn if log is not None else _warn
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")
    inc, exc_re = (_compiled(f"--{name}", rx) for name, rx in (("include", include), ("exclude", exclude)))
    layer_kinds = layer_kinds or {}
    base = open_model(base_path)
    tuned = open_model(tuned_path)
    outp = Path(out)
    _check_output(outp, [Path(base_path), Path(tuned_path)], force)
    params: dict[str, dict[str, np.ndarray]] = {}
    report: dict[str, dict[str, Any]] = {}
    uncaptured: list[str] = []
    sum_resid = sum_total = 0.0
    tasks: list[ExtractTask] = []
    for key in tuned.keys():
        if key not in base:
            warn(f"{key}: in TUNED but not in BASE; skipped")
        elif tuned.shape(key) != base.shape(key):
            warn(f"{key}: shape {tuned.shape(key)} in TUNED but {base.shape(key)} in BASE; skipped")
        elif tuned.dtype(key).kind == "f" or str(tuned.dtype(key)).startswith(("bfloat", "float")):
            shape = tuned.shape(key)
            m = key[: -len(".weight")] if key.endswith(".weight") else None
            wanted = (m is not None and len(shape) in (2, 3, 4, 5)
                      and (inc is None or inc.search(m)) and not (exc_re is not None and exc_re.search(m)))
            kind = layer_kinds.get(m) if wanted else None
            if wanted and kind is None and len(shape) == 2:
                if _EMBED_RE.search(m):
                    kind = LayerKind.EMBEDDING
                elif fan_in_fan_out:
                    kind = LayerKind.CONV1D_TRANSPOSED
            tasks.append(ExtractTask(key, m, base.span_of(key), tuned.span_of(key), bool(wanted), kind, rank,
                                     energy, randomized))
            continue
        if progress is not None:
            progress(1)
    for task, res in zip(tasks, (map_tasks or map)(extract_tensor, tasks)):
        if progress is not None:
            progress(1)
        if "changed" in res:
            if res["changed"]:
                uncaptured.append(task.key)
            continue
        if "module" not in res:  # D == 0
            continue
        m = task.module
        if singular_values is not None:
            singular_values[m] = res["singular_values"]
        params[m] = res["params"]
        report[m] = res["report"]
        sum_resid += res["resid2"]
        sum_total += res["total"]
    if not params:
        raise CheckpointError(f"{tuned_path}: no adapted weight differs from {base_path} "
                              f"(after --include/--exclude); nothing to extract")
    if uncaptured:
        warn(f"{len(uncaptured)} changed tensors are not captured by the LoRA adapter "
                 f"(not 2-D..5-D weights, or filtered), e.g. {uncaptured[0]}")
    rank_pattern = {re.escape(m): v["rank"] for m, v in report.items() if v["rank"] != rank}
    kinds = {v["layer"] for v in report.values()}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(params), rank_pattern=rank_pattern,
                        alpha_pattern=dict(rank_pattern), init_lora_weights=True,
                        fan_in_fan_out=(LayerKind.CONV1D_TRANSPOSED.value in kinds))
    config.validate(source="extract")
    ad = Adapter(config, params, layer_kinds={m: v["layer"] for m, v in report.items()})
    meta = {"peftmath.extract": json.dumps({m: {"rank": v["rank"], "relative_error": v["relative_error"]}
                                            for m, v in report.items()}, sort_keys=True)}
    write_adapter(ad, outp, force=force, metadata=meta)
    if totals is not None:
        totals.update(relative_error=float(np.sqrt(sum_resid / sum_total)) if sum_total > 0 else 0.0,
                      modules=len(report))
    return report


@dataclass(frozen=True)
class ExtractTask:
    """One tensor of TUNED for :func:`extract_tensor` (picklable): its key and module, where its bytes are in
    BASE and TUNED (:class:`~peftmath.io.stream.Span`), whether the module is extracted (``wanted``; otherwise
    the task only says whether the tensor changed), its layer kind and the SVD options."""

    key: str
    module: str | None
    base: Any
    tuned: Any
    wanted: bool
    kind: Any
    rank: int
    energy: float | None
    randomized: bool


def extract_tensor(task: ExtractTask) -> dict[str, Any]:
    """The work of one tensor of :func:`extract_lora`: ``{"changed": bool}`` for a tensor not extracted;
    ``{}`` when ``D = TUNED - BASE`` is zero; else ``{"module", "params": {lora_A/B}, "report",
    "singular_values", "resid2": ‖D − BA‖²_F, "total": ‖D‖²_F}``. Deterministic (the randomized SVD draws
    from ``default_rng(0)`` for every tensor), so any engine gets the same numbers."""
    from ._linalg import randomized_svd
    from .io.stream import read_span
    from .layers import Layer
    from .methods.lora import parameter_shapes

    if not task.wanted:
        return {"changed": not np.array_equal(read_span(task.tuned, task.key), read_span(task.base, task.key))}
    t, b = read_span(task.tuned, task.key), read_span(task.base, task.key)
    wide = np.float64 if np.float64 in (t.dtype, b.dtype) else np.float32
    D = t.astype(wide) - b.astype(wide)
    del t, b
    if not np.any(D):
        return {}
    rank, shape = task.rank, tuple(D.shape)
    layer = Layer.of(shape, task.kind)
    M = layer.as_matrix(D, np)
    full = min(M.shape)
    q = 2 * rank + RANDOMIZED_OVERSAMPLE
    svd = "randomized" if task.randomized and 2 * q <= full else "exact"
    if svd == "randomized":
        U, S, Vh = (np.asarray(x) for x in randomized_svd(M, q, niter=RANDOMIZED_NITER, rng=np.random.default_rng(0)))
    else:
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
    k = min(rank, full, len(S))
    total = float(np.sum(M.astype(np.float64) ** 2))
    if task.energy is not None and total > 0:
        cum = np.cumsum(S.astype(np.float64) ** 2) / total
        k = min(k, int(np.searchsorted(cum, task.energy * (1 - 1e-12)) + 1))
    k = max(1, k)
    root = np.sqrt(S[:k])
    Bm = (U[:, :k] * root).astype(wide)
    Am = (root[:, None] * Vh[:k]).astype(wide)
    resid = M.astype(np.float64) - Bm.astype(np.float64) @ Am.astype(np.float64)
    resid2 = float(np.sum(resid * resid))
    del resid
    err = float(np.sqrt(resid2 / total)) if total > 0 else 0.0
    (ka, sa), (kb, sb) = list(parameter_shapes(layer, k).items())
    return {"module": task.module, "singular_values": np.asarray(S, dtype=np.float64),
            "params": {ka: np.ascontiguousarray(Am.reshape(sa)), kb: np.ascontiguousarray(Bm.reshape(sb))},
            "report": {"rank": k, "relative_error": err, "delta_norm": float(np.sqrt(total)), "svd": svd,
                       "shape": list(shape), "layer": layer.kind.value},
            "resid2": resid2, "total": total}


def _compiled(option: str, pattern: str | None) -> re.Pattern | None:
    """``pattern`` compiled (None for none); an invalid one is a ConfigError naming ``option``."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{option} {pattern!r} is not a valid regular expression ({exc})") from exc


def write_adapter(ad: Any, out: Path, *, force: bool, metadata: dict | None = None) -> None:
    """Save ``ad`` as a PEFT adapter folder at ``out`` atomically: a temporary sibling folder renamed into
    place when complete (an existing ``out`` is replaced only with ``force``)."""
    from .io import save_adapter
    from .io.stream import _commit

    from .io.atomic import clean_stale_siblings, temp_sibling

    clean_stale_siblings(out)
    tmp = temp_sibling(out, folder=True)
    try:
        save_adapter(ad, tmp, metadata=metadata)
        _commit(tmp, out, force, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _warn(msg: str) -> None:
    warnings.warn(msg, PeftMathWarning, stacklevel=3)
