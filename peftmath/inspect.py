"""What ``peftmath inspect`` computes, as library code: :func:`inspect_adapter` (a JSON-ready description
of an adapter, optionally checked against a base model), :func:`top_singular_values`, and the text
renderings the command prints (:func:`render_inspect`, :func:`plan_table`, :func:`text_table`).

Nothing here parses arguments or prints; :mod:`peftmath.cli` does both.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import ConfigError, PeftMathError

__all__ = ["inspect_adapter", "top_singular_values", "low_rank_factors", "render_inspect", "plan_table", "text_table", "format_bytes"]


# --- text -----------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """``n`` bytes in B / KB / MB / GB / TB (powers of 1024).

    >>> format_bytes(512), format_bytes(3 * 1024**2)
    ('512 B', '3.0 MB')
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def text_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed rule under the header.

    >>> print(text_table([["a", "1"], ["bcd", "22"]], ["name", "n"]))
    name  n
    ----  --
    a     1
    bcd   22
    """
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def plan_table(pl: Any) -> str:
    """The ``--dry-run`` view of a merge / unmerge plan (:func:`peftmath.io.stream.plan`): one row per
    computed tensor (operation, shape, dtype path, bytes, adapters) and a summary line."""
    rows = []
    copied = [op for op in pl.ops.values() if op.operation == "copy"]
    for op in pl.ops.values():
        if op.operation == "copy":
            continue
        path = op.src_dtype if op.src_dtype == op.dst_dtype == op.work_dtype else \
            " -> ".join(dict.fromkeys([op.src_dtype, op.work_dtype, op.dst_dtype]))
        if op.src_dtype == op.work_dtype and op.work_dtype != op.dst_dtype:
            path = f"{op.src_dtype} -> {op.dst_dtype}"
        rows.append([op.key, op.operation, "x".join(map(str, op.shape)), path, format_bytes(op.nbytes),
                     "; ".join(op.modules)])
    table = text_table(rows, ["tensor", "operation", "shape", "dtype path", "bytes", "adapters"])
    total = pl.bytes_out()
    tail = (f"\n{len(rows)} tensors computed, {len(copied)} copied unchanged "
            f"({format_bytes(sum(op.nbytes for op in copied))}); output {format_bytes(total)}")
    return table + tail


# --- inspect --------------------------------------------------------------------------------------
def top_singular_values(M: np.ndarray, k: int, *, rank_hint: int | None = None) -> tuple[list[float], bool]:
    """The ``k`` largest singular values of ``M`` and whether they are exact.

    Full SVD up to 1024 rows/columns; above, subspace iteration (:func:`peftmath._linalg.randomized_svd`)
    with ``rank_hint + 10`` vectors (exact for a delta of rank <= ``rank_hint``, as LoRA's is).

    >>> M = np.diag([3.0, 2.0, 1.0])
    >>> top_singular_values(M, 2)
    ([3.0, 2.0], True)
    """
    from ._linalg import randomized_svd

    m = min(M.shape)
    k = min(k, m)
    if m <= 1024:
        return [float(s) for s in np.linalg.svd(M, compute_uv=False)[:k]], True
    q = min(m, max(k, rank_hint or k) + 10)
    _, S, _ = randomized_svd(M, q, niter=2, rng=np.random.default_rng(0))
    return [float(s) for s in np.asarray(S)[:k]], bool(rank_hint is not None and rank_hint + 10 <= q)


def inspect_adapter(path: str | os.PathLike, *, base: Any = None, layer_kinds: dict | None = None,
                    top: int = 3, norms: bool = True, strict: bool = False, progress: Any = None) -> dict[str, Any]:
    """Everything ``peftmath inspect`` reports, as a JSON-ready dict.

    ``base`` is an opened :class:`~peftmath.io.stream.Model` (or None); every adapted module is then
    checked against it (``modules[i]["base"]`` is ``"ok"`` or the problem). For additive methods each
    module's ``‖ΔW‖_F`` and ``top`` largest singular values of ``ΔW`` (as a matrix) are given: exact from
    the factors where ``ΔW = s·BA`` (:func:`low_rank_factors`, :func:`peftmath._linalg.low_rank_singular_values`:
    ``O((m + n) r²)``), else from the dense ``ΔW`` (:func:`top_singular_values`). ``progress(1)``, when
    given, is called after each module.
    """
    from ._array import dtype_name
    from .io import load_adapter
    from .methods import describe_method

    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise ConfigError(f"inspect: top must be an integer >= 0 (the number of singular values), got {top!r}")
    ad = load_adapter(path, strict=strict)
    cfg = ad.config
    method = describe_method(ad.peft_type)
    layer_kinds = layer_kinds or {}
    trainable = ad.num_trainable_parameters()
    dtypes = ad.dtypes()
    if method.prompt_learning:  # the virtual-token tensors are what was trained (unless the method counts them)
        if method.count_trainable is None:
            trainable += sum(int(np.prod(v.shape)) for v in ad.shared.values())
        dtypes = sorted(set(dtypes) | {dtype_name(v.dtype) for v in ad.shared.values()})
    info: dict[str, Any] = {
        "path": str(path),
        "peft_type": ad.peft_type,
        "additive": method.additive,
        "target_modules": cfg.to_dict().get("target_modules"),
        "num_modules": len(ad.modules),
        "trainable_parameters": trainable,
        "dtypes": dtypes,
        "shared": {k: list(v.shape) for k, v in ad.shared.items()},
        "replaced_base_tensors": {k: list(v.shape) for k, v in sorted(ad.other.items())},
        "modules": [],
        "problems": [],
    }
    for m in ad.modules:
        info["modules"].append(_inspect_module(ad, m, base, layer_kinds.get(m), top, norms and method.additive,
                                               info["problems"]))
        if progress is not None:
            progress(1)
    return info


def _inspect_module(ad: Any, m: str, base: Any, kind: Any, top: int, norms: bool, problems: list[str]) -> dict[str, Any]:
    """One row of :func:`inspect_adapter`'s ``modules`` (appends what does not fit ``base`` to ``problems``)."""
    from ._array import dtype_name
    from .config import resolve_pattern

    cfg = ad.config
    p = ad.params[m]
    entry: dict[str, Any] = {
        "module": m,
        "parameters": {s: {"shape": list(a.shape), "dtype": dtype_name(a.dtype)} for s, a in p.items()},
        "num_parameters": int(sum(int(np.prod(a.shape)) for a in p.values())),
    }
    r = getattr(cfg, "r", None)  # a config field (rank-based methods), not a method probe
    rows_only = set(p) == {"token_adapter.trainable_tokens_delta"}  # LoRA's trainable-token rows: no factors, no rank
    if isinstance(r, int) and not isinstance(r, bool) and r > 0 and not rows_only:
        entry["rank"] = resolve_pattern(getattr(cfg, "rank_pattern", None) or {}, m, r)
    wshape = None
    if base is not None:
        wkey, _ = ad.weight_keys(m, base)  # <m>.weight; an nn.MultiheadAttention's in_proj_weight / out_proj.weight
        if wkey not in base:
            near = base.closest(wkey)
            msg = f"no tensor {wkey!r} in the base" + (f" (closest: {', '.join(near)})" if near else "")
            entry["base"] = msg
            problems.append(f"{m}: {msg}")
        else:
            wshape = base.shape(wkey)
    try:
        mod = ad.module(m, weight_shape=wshape, kind=kind)
        known = wshape is not None or all(int(d) > 0 for d in mod.layer.weight_shape)
        entry["layer"] = mod.layer.kind.value if known else None
        entry["weight_shape"] = list(mod.layer.weight_shape) if known else None
        described = mod.describe()
        entry.update({k: v for k, v in described.items() if k in ("alpha", "scaling")})
        if "rank" in entry and isinstance(described.get("r"), int):  # the module's own rank (LoRA's target_parameters:
            entry["rank"] = described["r"]  # its rank_pattern is keyed by the parameter's name, not the module's)
        if base is not None and "base" not in entry:
            entry["base"] = "ok"
    except PeftMathError as exc:
        mod = None
        entry["layer"] = None
        if base is not None and "base" not in entry:
            entry["base"] = str(exc)
            problems.append(str(exc))
    entry["delta_norm"] = None
    entry["top_singular_values"] = None
    if mod is not None and not mod.additive:  # per module: KaSA, PEANuT, trainable tokens, ... (W' != W + ΔW)
        entry["additive"] = False
    if norms and mod is not None and mod.additive:
        try:
            factors = low_rank_factors(mod)
            if factors is not None:  # exact from the r x r core: O((m + n) r²), no dense ΔW
                from ._linalg import low_rank_singular_values

                S = low_rank_singular_values(*factors)
                entry["delta_norm"] = float(np.sqrt(np.sum(S**2)))
                entry["top_singular_values"] = [float(s) for s in S[:top]]
                entry["singular_values_exact"] = True
            else:
                d = np.asarray(mod.delta_weight(), dtype=np.float64)
                M = mod.layer.as_matrix(d, np)
                entry["delta_norm"] = float(np.linalg.norm(M))
                sv, exact = top_singular_values(M, top, rank_hint=entry.get("rank"))
                entry["top_singular_values"] = sv
                entry["singular_values_exact"] = exact
        except PeftMathError as exc:
            entry["delta_norm_error"] = str(exc)
    return entry


def low_rank_factors(mod: Any) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(B (m, r), A (r, n), s)`` with ``ΔW = s · B A`` as the ``(out, in_flat)`` matrix of a bound module
    whose delta is exactly that product, else None (then the dense ΔW is used).

    Which modules: those of methods whose description combines them as low-rank factors
    (``Method.combine == "low_rank"``: LoRA's ``A``, ``B`` and ``scaling``, the contract
    :func:`peftmath.combine` relies on too), without a merge record (DoRA's column norms make ΔW
    full-rank) and without conv groups (no dense delta in PEFT's layout). Embedding and Conv1D deltas
    are the transpose of the product: the same singular values.
    """
    method = mod.description
    if method.combine != "low_rank" or method.needs_record(mod) or mod.layer.groups != 1:
        return None
    r = int(mod.A.shape[0])
    A = np.asarray(mod.A, dtype=np.float64).reshape(r, -1)
    B = np.asarray(mod.B, dtype=np.float64).reshape(mod.B.shape[0], -1)
    if B.shape[1] != r:
        return None
    return B, A, float(mod.scaling) * getattr(mod, "change_factor", 1.0)  # an attention's out-projection: 2s


def render_inspect(info: dict[str, Any], *, with_base: bool = False) -> str:
    """The text view of :func:`inspect_adapter`'s result: a header block and one table row per module
    (a ``base`` column when the adapter was checked against a base model)."""
    lines = [f"adapter:     {info['path']}",
             f"method:      {info['peft_type']} ({'additive: W + dW' if info['additive'] else 'not additive'})",
             f"targets:     {info['target_modules']}",
             f"modules:     {info['num_modules']}   trainable parameters: {info['trainable_parameters']:,}   "
             f"dtypes: {', '.join(info['dtypes'])}"]
    if info["shared"]:
        lines.append(f"shared:      {info['shared']}")
    if info["replaced_base_tensors"]:
        lines.append(f"other:       {info['replaced_base_tensors']}")
    rows = []
    for e in info["modules"]:
        sv = e["top_singular_values"]
        rows.append([
            e["module"], e["layer"] or "?", "x".join(map(str, e.get("weight_shape") or [])) or "?",
            str(e.get("rank", "-")), str(e.get("alpha", "-")),
            f"{e['scaling']:.4g}" if "scaling" in e else "-", f"{e['num_parameters']:,}",
            "n/a" if e["delta_norm"] is None else f"{e['delta_norm']:.4g}",
            "n/a" if sv is None else ", ".join(f"{s:.4g}" for s in sv),
            *([e["base"]] if with_base else []),
        ])
    header = ["module", "layer", "weight", "rank", "alpha", "scaling", "params", "|dW|_F", "top singular values"]
    lines.append(text_table(rows, header + (["base"] if with_base else [])))
    return "\n".join(lines)
