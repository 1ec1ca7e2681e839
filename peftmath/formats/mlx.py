"""mlx-lm <-> PEFT (LoRA, DoRA).

Keys ``<module>.lora_a`` = Aᵀ ``(in, r)`` and ``<module>.lora_b`` = Bᵀ ``(r, out)``; the raw ``scale``
and the wrapped layers (``num_layers``, ``keys``) live in ``adapter_config.json``'s ``lora_parameters``.
See ``specs/formats.md`` (MLX section)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ._common import (Converted, _any_conv1d_t, _check_peft_only, _host, _lora_scales, _meta_json, _most_common,
                      _no_options, _number, _read_meta, _some, _t)

# --- MLX ------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^(?P<container>.*?)\.(?P<index>\d+)\.(?P<rel>.+)$")


def _to_mlx(adapter: Adapter, *, num_layers: int = -1, **unknown: Any) -> Converted:
    _no_options(unknown, "mlx")
    _check_peft_only(adapter, "MLX (mlx-lm)", allowed=("LORA",))
    cfg = adapter.config
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise ConfigError(f"mlx num_layers must be an integer (-1: every block), got {num_layers!r}")
    ranks = {m: cfg.rank_and_alpha(m)[0] for m in adapter.modules}
    scales = _lora_scales(adapter)
    if len(set(ranks.values())) > 1:
        raise UnsupportedError(f"mlx-lm holds one rank for every layer; this adapter has ranks "
                               f"{dict(sorted(Counter(ranks.values()).items()))} (e.g. {_first_differing(ranks)})")
    if len(set(scales.values())) > 1:
        raise UnsupportedError(f"mlx-lm holds one scale for every layer; this adapter has per-module scales "
                               f"{sorted(set(scales.values()))} (e.g. {_first_differing(scales)})")
    r = next(iter(ranks.values()))
    s = next(iter(scales.values()))
    dora = bool(cfg.use_dora)
    tensors: dict[str, np.ndarray] = {}
    keys: set[str] = set()
    kinds = {m: k.value for m, k in adapter.layer_kinds.items()}
    for m in adapter.modules:
        p = {k: _host(v) for k, v in adapter.params[m].items()}
        if "lora_B.bias" in p:
            raise UnsupportedError(f"{m}: mlx-lm has no LoRA bias (lora_B.bias); it would be lost")
        if "lora_embedding_A" in p:
            if dora:
                raise UnsupportedError(f"{m}: PEFT's DoRA embedding normalises the other axis than mlx-lm's "
                                       f"DoRAEmbedding; the magnitude would mean something else")
            tensors[f"{m}.lora_a"] = _t(p["lora_embedding_A"])   # (num_embeddings, r)
            tensors[f"{m}.lora_b"] = _t(p["lora_embedding_B"])   # (r, dim)
            kinds[m] = "Embedding"
        else:
            A, B = p["lora_A.weight"], p["lora_B.weight"]
            if A.shape[0] != r:
                raise ShapeError(f"{m}: lora_A has {A.shape[0]} rows but the config's rank is r={r}")
            if A.ndim != 2:
                raise UnsupportedError(f"{m}: mlx-lm has no LoRA for convolutions (lora_A {A.shape}); "
                                       f"this module would be lost")
            tensors[f"{m}.lora_a"] = _t(A)   # (in, r)
            tensors[f"{m}.lora_b"] = _t(B)   # (r, out)
            if dora:
                tensors[f"{m}.m"] = np.ascontiguousarray(p["lora_magnitude_vector"])
        match = _LAYER_RE.match(m)
        keys.add(match["rel"] if match else m)
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": int(r), "scale": float(s), "dropout": float(cfg.lora_dropout),
                            "keys": sorted(keys)},
    }
    meta = {"format": "mlx"}
    meta.update(_meta_json({"format": "mlx", "layer_kinds": kinds}))
    return Converted("mlx", tensors, config, meta)


def _first_differing(values: dict[str, Any]) -> str:
    default = _most_common(list(values.values()))
    for m, v in sorted(values.items()):
        if v != default:
            return f"{m!r}: {v!r} against {default!r}"
    return ""


# --- MLX -> PEFT ----------------------------------------------------------------------------------
def _from_mlx(tensors: dict, config: Mapping[str, Any], metadata: Mapping[str, str] | None, source: str, *,
              embedding_modules: Iterable[str] | None = None) -> Adapter:
    from ..methods.lora import LoraConfig

    meta = _read_meta(metadata, source)
    ftype = config.get("fine_tune_type", "lora")
    if ftype not in ("lora", "dora"):
        raise UnsupportedError(f"{source}: fine_tune_type {ftype!r} is not an adapter PEFT's LoRA can hold "
                               f"(lora or dora)")
    lp = config.get("lora_parameters")
    if not isinstance(lp, Mapping) or "rank" not in lp or "scale" not in lp:
        raise ConfigError(f"{source}: adapter_config.json needs lora_parameters with rank and scale, got {lp!r}")
    r, s = lp["rank"], lp["scale"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{source}: lora_parameters.rank must be a positive integer, got {r!r}")
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        raise ConfigError(f"{source}: lora_parameters.scale must be a number, got {s!r}")
    groups: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for k, a in tensors.items():
        m, _, leaf = k.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m") or not m:
            bad.append(k)
            continue
        groups.setdefault(m, {})[leaf] = a
    if bad:
        raise CheckpointError(f"{source}: keys outside the mlx-lm adapter grammar (<module>.lora_a/lora_b/m): {_some(bad)}")
    if embedding_modules is not None:
        emb = set(embedding_modules)
    elif meta.get("layer_kinds") is not None:
        emb = {m for m, k in meta["layer_kinds"].items() if k == "Embedding"}
    else:
        emb = {m for m in groups if "embed" in m.rsplit(".", 1)[-1] or m.endswith(".wte")}
    params: dict[str, dict[str, np.ndarray]] = {}
    kinds = {m: k for m, k in (meta.get("layer_kinds") or {}).items() if m in groups}
    for m, p in sorted(groups.items()):
        missing = [x for x in ("lora_a", "lora_b") + (("m",) if ftype == "dora" and m not in emb else ()) if x not in p]
        if missing:
            raise CheckpointError(f"{source}: {', '.join(f'{m}.{x}' for x in missing)} missing")
        if "m" in p and ftype != "dora":
            raise CheckpointError(f"{source}: {m}.m is a DoRA magnitude but fine_tune_type is {ftype!r}")
        a, b = p["lora_a"], p["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != r or b.shape[0] != r:
            raise ShapeError(f"{source}: {m}.lora_a {tuple(a.shape)} and {m}.lora_b {tuple(b.shape)} do not fit "
                             f"rank {r}: expected (in, {r}) and ({r}, out)")
        if m in emb:
            if ftype == "dora":
                raise UnsupportedError(f"{source}: {m}: mlx-lm's DoRAEmbedding normalises rows, PEFT's DoRA embedding "
                                       f"columns; the magnitude would mean something else")
            params[m] = {"lora_embedding_A": _t(a), "lora_embedding_B": _t(b)}
            kinds[m] = "Embedding"
        else:
            params[m] = {"lora_A.weight": _t(a), "lora_B.weight": _t(b)}
            if ftype == "dora":
                if p["m"].shape != (b.shape[1],):
                    raise ShapeError(f"{source}: {m}.m {tuple(p['m'].shape)} must be ({b.shape[1]},)")
                params[m]["lora_magnitude_vector"] = p["m"]
    if not params:
        raise CheckpointError(f"{source}: no LoRA tensors")
    cfg = LoraConfig(r=r, lora_alpha=_number(s * r), lora_dropout=float(lp.get("dropout", 0.0)),
                     use_rslora=False, use_dora=ftype == "dora", target_modules=sorted(params),
                     fan_in_fan_out=_any_conv1d_t(kinds))
    return Adapter(cfg, params, layer_kinds=kinds)
