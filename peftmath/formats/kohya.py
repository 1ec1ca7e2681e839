"""kohya / LyCORIS <-> PEFT (LoRA, DoRA, LoHa, LoKr).

Keys ``<prefix>_<module with dots as underscores>.<suffix>``: ``lora_down`` = A, ``lora_up`` = B, and
a per-module ``alpha`` tensor (scale ``alpha / rank``); LoHa's ``hada_*`` and LoKr's ``lokr_*`` keep
PEFT's names. See ``specs/formats.md`` (kohya section).

DoRA: LyCORIS' ``dora_scale`` is PEFT's ``lora_magnitude_vector`` when it normalises output rows
(``wd_on_out=True``, LyCORIS' default): ``W' = m / ‖W + s·BA‖_row · (W + s·BA)``, stored ``(out, 1[, 1, ...])``
where PEFT stores ``(out,)`` (Linear) or ``(1, out, 1, ...)`` (ConvNd). A ``dora_scale`` of shape
``(1, in[, 1, ...])`` normalises input columns (``wd_on_out=False``, and LyCORIS' older DoRA): PEFT has no such
decomposition, so it is refused, as are DoRA on LoHa / LoKr (LyCORIS' DoHa / DoKr) and on a transformers
Conv1D. LyCORIS adds ``finfo(dtype).eps`` to the norm; PEFT does not (a relative difference of
``eps / ‖W + s·BA‖_row``, below one rounding for rows of norm >= 1)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ._common import (ConversionWarning, Converted, _any_conv1d_t, _check_peft_only, _check_prefix, _host, _meta_json,
                      _no_options, _number, _patterns, _read_meta, _scalar, _some)

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KOHYA_LORA_KEYS = ("lora_down.weight", "lora_up.weight")
KOHYA_UNSUPPORTED = ("lora_mid.weight", "diff", "diff_b", "bias_indices", "bias_values", "oft_blocks",
                     "oft_diag", "oft_R", "boft_R", "w_norm", "b_norm", "on_input", "a1.weight", "a2.weight",
                     "b1.weight", "b2.weight")


# --- kohya / LyCORIS ------------------------------------------------------------------------------
def kohya_name(module: str, prefix: str = "lycoris") -> str:
    """The kohya / LyCORIS module name: ``<prefix>_<module>`` with every dot replaced by an underscore.

    >>> kohya_name("down_blocks.0.attentions.0.proj_in", "lora_unet")
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    return f"{prefix}_{module}".replace(".", "_")


def _to_kohya(adapter: Adapter, *, prefix: str = "lycoris", **unknown: Any) -> Converted:
    _no_options(unknown, "kohya")
    _check_prefix(prefix, "kohya")
    _check_peft_only(adapter, "kohya/LyCORIS", allowed=("LORA", "LOHA", "LOKR"))
    cfg = adapter.config
    names: dict[str, str] = {}
    for m in adapter.modules:
        k = kohya_name(m, prefix)
        if k in names:
            raise UnsupportedError(
                f"modules {names[k]!r} and {m!r} both become {k!r} in the kohya grammar (dots turn into underscores); "
                f"one would overwrite the other"
            )
        names[k] = m
    tensors: dict[str, np.ndarray] = {}
    algo = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}[adapter.peft_type]
    for k, m in names.items():
        p = {s: _host(a) for s, a in adapter.params[m].items()}
        r, alpha = cfg.rank_and_alpha(m)
        if adapter.peft_type == "LORA":
            out = _kohya_lora_module(m, p, cfg, r, alpha, adapter)
        elif adapter.peft_type == "LOHA":
            out = _kohya_loha_module(m, p, r, alpha, adapter)
        else:
            out = _kohya_lokr_module(m, p, r, alpha, adapter)
        for suffix, a in out.items():
            tensors[f"{k}.{suffix}"] = a
    meta = {"ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": algo})}
    meta.update(_meta_json({"format": "kohya", "prefix": prefix, "modules": names,
                            "layer_kinds": {m: v.value for m, v in adapter.layer_kinds.items()}}))
    return Converted("kohya", tensors, None, meta)


def _alpha_for_kohya(m: str, alpha: float, r: int) -> None:
    if alpha == 0:
        raise UnsupportedError(
            f"{m}: alpha 0 (a zero update in PEFT) means 'alpha = rank, scale 1' to kohya/LyCORIS loaders; "
            f"the converted module would not be zero"
        )


def _kohya_lora_module(m: str, p: dict, cfg: Any, r: int, alpha: float, adapter: Adapter) -> dict[str, np.ndarray]:
    lost = sorted(set(p) - {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"})
    if any(s.startswith("lora_embedding") for s in lost):
        raise UnsupportedError(f"{m}: kohya/LyCORIS LoRA has no Embedding layout (lora_embedding_A/B); "
                               f"this module would be lost")
    if lost:
        raise UnsupportedError(f"{m}: kohya LoRA has no place for {lost}; they would be lost")
    A, B = p["lora_A.weight"], p["lora_B.weight"]
    if A.shape[0] != r:   # kohya reads the rank from lora_down's rows; PEFT's scale uses the config's r
        raise ShapeError(f"{m}: lora_A has {A.shape[0]} rows but the config's rank for it is r={r}")
    if A.shape[0] != B.shape[1]:
        raise UnsupportedError(f"{m}: lora_A has {A.shape[0]} rows but lora_B {B.shape[1]} columns (a grouped conv); "
                               f"kohya LoRA holds ungrouped factors only")
    _alpha_for_kohya(m, alpha, r)
    # kohya scale = alpha_k / rank; PEFT's is alpha / r or alpha / sqrt(r) (rsLoRA, folded: alpha_k = alpha·√r)
    alpha_k = alpha * math.sqrt(r) if cfg.use_rslora else alpha
    out = {"lora_down.weight": A, "lora_up.weight": B, "alpha": _scalar(alpha_k)}
    if "lora_magnitude_vector" in p:
        out["dora_scale"] = _dora_scale_out(m, p["lora_magnitude_vector"], A, B, adapter)
    return out


def _dora_scale_out(m: str, mag: np.ndarray, A: np.ndarray, B: np.ndarray, adapter: Adapter) -> np.ndarray:
    """PEFT's ``lora_magnitude_vector`` as LyCORIS' ``dora_scale`` (output rows, ``wd_on_out=True``):
    ``(out,)`` / ``(1, out, 1, ...)`` -> ``(out, 1, ...)`` with as many axes as the weight (same values)."""
    kind = adapter.layer_kinds.get(m)
    if (kind is not None and getattr(kind, "value", kind) == "Conv1D") or adapter.config.fan_in_fan_out:
        raise UnsupportedError(f"{m}: DoRA on a transformers Conv1D (weight stored (in, out), fan_in_fan_out): "
                               f"LyCORIS' dora_scale normalises the stored weight's first axis, PEFT the output "
                               f"axis; the magnitude would scale the wrong axis")
    out = B.shape[0]
    if mag.size != out or sum(int(d) != 1 for d in mag.shape) > 1:
        raise ShapeError(f"{m}: lora_magnitude_vector {tuple(mag.shape)} does not hold one value per output "
                         f"({out}, the rows of lora_B {tuple(B.shape)})")
    return np.ascontiguousarray(mag.reshape((out,) + (1,) * (A.ndim - 1)))


def _kohya_loha_module(m: str, p: dict, r: int, alpha: float, adapter: Adapter) -> dict[str, np.ndarray]:
    _alpha_for_kohya(m, alpha, r)
    if p["hada_w1_b"].shape[0] != r:   # LyCORIS reads the rank from hada_w1_b's rows
        raise ShapeError(f"{m}: hada_w1_b has {p['hada_w1_b'].shape[0]} rows but the config's rank for it is r={r}")
    out = {}
    for s in LOHA_KEYS:
        if s in p:
            a = p[s]
            out[s] = _lycoris_core(adapter, m, a) if s in ("hada_t1", "hada_t2") else a
    out["alpha"] = _scalar(alpha)
    return out


def _lycoris_core(adapter: Adapter, m: str, t: np.ndarray) -> np.ndarray:
    """A tucker core in LyCORIS' layout: PEFT stores a Conv1d core as (r, r, k, 1), LyCORIS as (r, r, k)."""
    kind = adapter.layer_kinds.get(m)
    if kind is not None and kind.value == "Conv1d" and t.ndim == 4 and t.shape[-1] == 1:
        return t.reshape(t.shape[:-1])
    return t


def _kohya_lokr_module(m: str, p: dict, r: int, alpha: float, adapter: Adapter) -> dict[str, np.ndarray]:
    _alpha_for_kohya(m, alpha, r)
    if "lokr_w2" in p and p["lokr_w2"].ndim == 3:
        raise UnsupportedError(
            f"{m}: a Conv1d LoKr with a full lokr_w2 {p['lokr_w2'].shape}: PEFT pads w1 in front and LyCORIS "
            f"behind, so the same tensors mean different kernels; converting would change the delta"
        )
    out = {s: p[s] for s in LOKR_KEYS if s in p}
    if "lokr_t2" in out:
        out["lokr_t2"] = _lycoris_core(adapter, m, out["lokr_t2"])
    full = "lokr_w1" in p and "lokr_w2" in p
    scale = alpha / r
    if full:
        # LyCORIS ignores alpha when both factors are full (scale 1): fold PEFT's scale into w1
        if scale != 1.0:
            w1 = p["lokr_w1"]
            out["lokr_w1"] = (w1.astype(np.float64) * scale).astype(w1.dtype)
            warnings.warn(f"{m}: LyCORIS applies no alpha when lokr_w1 and lokr_w2 are both full; PEFT's scale "
                          f"{scale!r} was folded into lokr_w1 (one rounding)", ConversionWarning, stacklevel=4)
        out["alpha"] = _scalar(1.0)
    else:
        rank = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else p["lokr_w2_b"].shape[0]
        if rank != r:
            raise ShapeError(f"{m}: LoKr factors have rank {rank} but the config says r={r}")
        out["alpha"] = _scalar(alpha)
    return out


# --- kohya -> PEFT --------------------------------------------------------------------------------
def _kohya_algo(name: str, suffixes: set[str], source: str) -> str:
    bad = sorted(s for s in suffixes if s in KOHYA_UNSUPPORTED)
    if bad:
        raise UnsupportedError(f"{source}: {name}: {', '.join(f'{name}.{s}' for s in bad)} "
                               f"(LyCORIS {'tucker LoCon' if 'lora_mid.weight' in bad else 'OFT / other'}) "
                               f"has no PEFT equivalent this converter writes")
    kinds = set()
    for s in suffixes:
        if s in KOHYA_LORA_KEYS:
            kinds.add("lora")
        elif s in LOHA_KEYS:
            kinds.add("loha")
        elif s in LOKR_KEYS:
            kinds.add("lokr")
        elif s not in ("alpha", "dora_scale"):
            raise CheckpointError(f"{source}: key {name}.{s} is not part of the kohya/LyCORIS grammar "
                                  f"(lora_down/lora_up/alpha, hada_*, lokr_*)")
    if "dora_scale" in suffixes and kinds and kinds != {"lora"}:
        raise UnsupportedError(f"{source}: {name}.dora_scale on a {'/'.join(sorted(kinds))} module (LyCORIS "
                               f"DoHa / DoKr): PEFT's LoHa and LoKr have no weight decomposition, so the "
                               f"magnitude would be lost")
    if len(kinds) != 1:
        raise CheckpointError(f"{source}: module {name!r} mixes formats ({', '.join(sorted(kinds)) or 'only alpha'}): "
                              f"keys {', '.join(sorted(suffixes))}")
    return kinds.pop()


def _resolve_kohya_names(names: list[str], prefix: str | None, modules: Any, meta: dict, source: str) -> dict[str, str]:
    if meta.get("modules"):
        mapping = dict(meta["modules"])
    elif modules is not None:
        if isinstance(modules, Mapping):
            mapping = dict(modules)
        else:
            prefixes = [prefix] if prefix else sorted(_prefixes_of(names) or {n.split("_", 1)[0] for n in names})
            found: dict[str, set[str]] = {}
            for m in modules:
                m = m[: -len(".weight")] if m.endswith(".weight") else m
                for pfx in prefixes:
                    found.setdefault(kohya_name(m, pfx), set()).add(m)
            clash = {k: v for k, v in found.items() if len(v) > 1 and k in names}
            if clash:
                k, v = next(iter(sorted(clash.items())))
                raise CheckpointError(f"{source}: kohya module {k!r} could be any of {_some(v)} (dots and underscores "
                                      f"are the same in kohya names); pass modules= as a mapping")
            mapping = {k: next(iter(v)) for k, v in found.items()}
    else:
        raise CheckpointError(
            f"{source}: kohya names replace dots by underscores, so {_some(names, 3)} cannot be turned back into "
            f"module names without the base model's module names; pass modules=[...] (e.g. the base checkpoint's "
            f"keys) or --base"
        )
    out, missing = {}, []
    for n in names:
        if n in mapping:
            out[n] = mapping[n]
        else:
            missing.append(n)
    if missing:
        raise CheckpointError(f"{source}: no base module matches the kohya module(s) {_some(missing)}; "
                              f"check the prefix ({prefix!r}) and the module names given")
    return out


def _prefixes_of(names: list[str]) -> set[str]:
    known = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris", "lora_transformer", "lora")
    return {p for p in known if any(n.startswith(p + "_") for n in names)}


def _from_kohya(tensors: dict, metadata: Mapping[str, str] | None, source: str, *, prefix: str | None = None,
                modules: Any = None, missing_alpha: str = "error") -> Adapter:
    from ..methods.loha import LoHaConfig
    from ..methods.lora import LoraConfig

    if missing_alpha not in ("error", "rank"):
        raise ConfigError(f"missing_alpha must be 'error' or 'rank', got {missing_alpha!r}")
    meta = _read_meta(metadata, source)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for k, a in tensors.items():
        if "." not in k:
            raise CheckpointError(f"{source}: key {k!r} is not <module>.<tensor> (kohya grammar)")
        name, suffix = k.split(".", 1)
        groups.setdefault(name, {})[suffix] = a
    if prefix is not None:
        stray = sorted(n for n in groups if not n.startswith(prefix + "_"))
        if stray:
            raise CheckpointError(f"{source}: modules without the prefix {prefix + '_'!r}: {_some(stray)}")
    algos = {n: _kohya_algo(n, set(p), source) for n, p in groups.items()}
    if len(set(algos.values())) > 1:
        by = {a: [n for n in algos if algos[n] == a] for a in set(algos.values())}
        raise UnsupportedError(f"{source}: one PEFT adapter holds one method; this file mixes "
                               + "; ".join(f"{a} ({_some(ns, 2)})" for a, ns in sorted(by.items())))
    if not groups:
        raise CheckpointError(f"{source}: no tensors")
    algo = next(iter(algos.values()))
    decompose_both = algo == "lokr" and any("lokr_w1_a" in p for p in groups.values())
    names = _resolve_kohya_names(sorted(groups), prefix, modules, meta, source)
    kinds = dict(meta.get("layer_kinds") or {})
    params: dict[str, dict[str, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    extra: dict[str, Any] = {}
    for n, p in sorted(groups.items()):
        m = names[n]
        if algo == "lora":
            params[m], ranks[m] = _kohya_lora_in(n, p, source)
        elif algo == "loha":
            params[m], ranks[m] = _kohya_loha_in(n, p, source, kinds, m)
        else:
            params[m], ranks[m], extra[m] = _kohya_lokr_in(n, p, source, decompose_both)
            if extra[m]["conv1d"]:
                kinds.setdefault(m, "Conv1d")
        if "alpha" in p:
            a = np.asarray(p["alpha"])
            if a.size != 1:
                raise ShapeError(f"{source}: {n}.alpha must be a scalar, got shape {a.shape}")
            alpha = float(a.reshape(()))
            alphas[m] = float(ranks[m]) if alpha == 0 else alpha    # LyCORIS: alpha 0 means alpha = rank
        elif missing_alpha == "rank":
            alphas[m] = float(ranks[m])
        else:
            raise CheckpointError(f"{source}: {n}.alpha is missing (kohya scale = alpha / rank); loaders disagree "
                                  f"on the default, so pass missing_alpha='rank' if alpha = rank was meant")
        if algo == "lokr" and extra[m]["full"]:
            alphas[m] = float(ranks[m])    # LyCORIS: both factors full -> scale 1, alpha ignored
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns({m: _number(a) for m, a in alphas.items()})
    common = dict(target_modules=sorted(params), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if algo == "lora":
        dora = _dora_modules(params, kinds, source)
        config = LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=_any_conv1d_t(kinds), use_dora=dora, **common)
    elif algo == "loha":
        # one flag in PEFT: a plain-conv module beside a tucker one cannot be told apart without the base shapes
        config = LoHaConfig(r=r, alpha=alpha, use_effective_conv2d=any("hada_t1" in p for p in params.values()),
                            **common)
    else:
        config = _lokr_config(params, extra, r, alpha, common, source)
    config.validate(source=source)
    for m in params:   # PEFT's pattern rule must give each module its own rank and alpha back
        if config.rank_and_alpha(m) != (ranks[m], _number(alphas[m])):
            raise ConfigError(f"{source}: {m}: rank_pattern/alpha_pattern resolve to {config.rank_and_alpha(m)}, "
                              f"expected {(ranks[m], alphas[m])} (module names that are suffixes of each other)")
    return Adapter(config, params, layer_kinds=kinds)


def _kohya_lora_in(n: str, p: dict, source: str) -> tuple[dict, int]:
    for s in KOHYA_LORA_KEYS:
        if s not in p:
            raise CheckpointError(f"{source}: {n}.{s} is missing (a kohya LoRA module has lora_down.weight, "
                                  f"lora_up.weight and alpha)")
    down, up = p["lora_down.weight"], p["lora_up.weight"]
    r = down.shape[0]
    if up.ndim != down.ndim or up.ndim < 2 or up.shape[1] != r or any(int(d) != 1 for d in up.shape[2:]):
        raise ShapeError(f"{source}: {n}.lora_up.weight {tuple(up.shape)} does not fit {n}.lora_down.weight "
                         f"{tuple(down.shape)}: expected (out, {r}{', 1' * (down.ndim - 2)})")
    out = {"lora_A.weight": down, "lora_B.weight": up}
    if "dora_scale" in p:
        out["lora_magnitude_vector"] = _magnitude_in(n, np.asarray(p["dora_scale"]), down, up, source)
    return out, int(r)


def _magnitude_in(n: str, scale: np.ndarray, down: np.ndarray, up: np.ndarray, source: str) -> np.ndarray:
    """LyCORIS' ``dora_scale`` as PEFT's ``lora_magnitude_vector``: ``(out, 1, ...)`` (output rows) ->
    ``(out,)`` for a Linear, ``(1, out, 1, ...)`` for a ConvNd; ``(1, in, 1, ...)`` (input columns) is refused."""
    out, inn, nd = up.shape[0], down.shape[1], down.ndim
    rows, cols = (out,) + (1,) * (nd - 1), (1, inn) + (1,) * (nd - 2)
    shape = tuple(int(d) for d in scale.shape)
    if shape != rows:
        if shape == cols:
            raise UnsupportedError(
                f"{source}: {n}.dora_scale {shape} normalises the weight's input columns (LyCORIS wd_on_output="
                f"False, or its older DoRA); PEFT's DoRA normalises output rows, so the merged weight would differ. "
                f"Retrain with wd_on_output=True or merge it with LyCORIS")
        raise ShapeError(f"{source}: {n}.dora_scale {shape} fits neither output rows {rows} nor input columns "
                         f"{cols} of lora_up {tuple(up.shape)} / lora_down {tuple(down.shape)}")
    return np.ascontiguousarray(scale.reshape((out,) if nd == 2 else (1, out) + (1,) * (nd - 2)))


def _dora_modules(params: dict, kinds: dict, source: str) -> bool:
    """True when every module holds a magnitude (PEFT's ``use_dora`` is one flag); a mix is refused."""
    with_m = sorted(m for m, p in params.items() if "lora_magnitude_vector" in p)
    if with_m and len(with_m) != len(params):
        without = sorted(set(params) - set(with_m))
        raise UnsupportedError(f"{source}: dora_scale on {_some(with_m, 3)} but not on {_some(without, 3)}: PEFT's "
                               f"use_dora holds for every module of an adapter; split the file into two adapters")
    conv1d = [m for m in with_m if str(kinds.get(m)) == "Conv1D"]
    if conv1d:
        raise UnsupportedError(f"{source}: DoRA on transformers Conv1D module(s) {_some(conv1d, 3)}: LyCORIS "
                               f"normalises the stored (in, out) weight's first axis, PEFT the output axis")
    return bool(with_m)


def _kohya_loha_in(n: str, p: dict, source: str, kinds: dict, m: str) -> tuple[dict, int]:
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    missing = [s for s in need if s not in p]
    tucker = [s for s in ("hada_t1", "hada_t2") if s in p]
    if missing or len(tucker) == 1:
        raise CheckpointError(f"{source}: {n}: LoHa tensors missing: "
                              f"{', '.join(f'{n}.{s}' for s in missing + [t for t in ('hada_t1', 'hada_t2') if t not in p and tucker])}")
    r = p["hada_w1_b"].shape[0]
    out = {s: p[s] for s in need + tucker}
    if tucker:
        exp = {"hada_w1_a": r, "hada_w2_a": r, "hada_w1_b": r, "hada_w2_b": r}
        for s, rows in exp.items():
            if out[s].ndim != 2 or out[s].shape[0] != rows:
                raise ShapeError(f"{source}: {n}.{s} {tuple(out[s].shape)} does not have {r} rows (rank of hada_w1_b)")
        for t in tucker:
            if tuple(out[t].shape[:2]) != (r, r):
                raise ShapeError(f"{source}: {n}.{t} {tuple(out[t].shape)} must start with ({r}, {r})")
            if out[t].ndim == 3:   # LyCORIS Conv1d core (r, r, k) -> PEFT's (r, r, k, 1)
                out[t] = out[t].reshape(*out[t].shape, 1)
                kinds.setdefault(m, "Conv1d")
        if out["hada_w1_a"].shape != out["hada_w2_a"].shape or out["hada_w1_b"].shape != out["hada_w2_b"].shape:
            raise ShapeError(f"{source}: {n}: hada_w1_* and hada_w2_* shapes differ")
    else:
        a1, b1, a2, b2 = (out[s] for s in need)
        if not (a1.ndim == b1.ndim == a2.ndim == b2.ndim == 2) or a1.shape[1] != r or a2.shape != a1.shape \
                or b2.shape != b1.shape:
            raise ShapeError(f"{source}: {n}: LoHa factors do not fit: hada_w1_a {tuple(a1.shape)}, hada_w1_b "
                             f"{tuple(b1.shape)}, hada_w2_a {tuple(a2.shape)}, hada_w2_b {tuple(b2.shape)} "
                             f"(expected (out, r), (r, in), (out, r), (r, in))")
    return out, int(r)


def _kohya_lokr_in(n: str, p: dict, source: str, decompose_both: bool) -> tuple[dict, int, dict]:
    has = lambda *ks: all(k in p for k in ks)  # noqa: E731
    if not (has("lokr_w1") or has("lokr_w1_a", "lokr_w1_b")):
        raise CheckpointError(f"{source}: {n}: LoKr needs {n}.lokr_w1 or {n}.lokr_w1_a + {n}.lokr_w1_b")
    if not (has("lokr_w2") or has("lokr_w2_a", "lokr_w2_b")):
        raise CheckpointError(f"{source}: {n}: LoKr needs {n}.lokr_w2 or {n}.lokr_w2_a + {n}.lokr_w2_b")
    out = {s: p[s] for s in LOKR_KEYS if s in p}
    conv1d = False
    if "lokr_w2" in out and out["lokr_w2"].ndim == 3:
        raise UnsupportedError(f"{source}: {n}.lokr_w2 {tuple(out['lokr_w2'].shape)}: a Conv1d LoKr with a full w2 "
                               f"means a different kernel layout in PEFT; converting would change the delta")
    if "lokr_w1" in out:
        a, c = out["lokr_w1"].shape
    else:
        a, r1 = out["lokr_w1_a"].shape
        r1b, c = out["lokr_w1_b"].shape
        if r1 != r1b:
            raise ShapeError(f"{source}: {n}.lokr_w1_a has {r1} columns but {n}.lokr_w1_b {r1b} rows")
    tucker = "lokr_t2" in out
    if "lokr_w2" in out:
        b, d = out["lokr_w2"].shape[:2]
    elif tucker:
        r2, b = out["lokr_w2_a"].shape
        r2b, d = out["lokr_w2_b"].shape
        if not (r2 == r2b and tuple(out["lokr_t2"].shape[:2]) == (r2, r2)):
            raise ShapeError(f"{source}: {n}: lokr_t2 {tuple(out['lokr_t2'].shape)}, lokr_w2_a "
                             f"{tuple(out['lokr_w2_a'].shape)} and lokr_w2_b {tuple(out['lokr_w2_b'].shape)} disagree")
        if out["lokr_t2"].ndim == 3:   # LyCORIS Conv1d core (r, r, k) -> PEFT's (r, r, k, 1)
            out["lokr_t2"] = out["lokr_t2"].reshape(*out["lokr_t2"].shape, 1)
            conv1d = True
    else:
        b, r2 = out["lokr_w2_a"].shape
        r2b, d = out["lokr_w2_b"].shape[0], int(np.prod(out["lokr_w2_b"].shape[1:]))
        if r2 != r2b:
            raise ShapeError(f"{source}: {n}.lokr_w2_a has {r2} columns but {n}.lokr_w2_b {r2b} rows")
    ranks = set()
    if "lokr_w1_b" in out:
        ranks.add(out["lokr_w1_b"].shape[0])
    if "lokr_w2_b" in out:
        ranks.add(out["lokr_w2_b"].shape[0])
    if len(ranks) > 1:
        raise ShapeError(f"{source}: {n}: lokr_w1_b and lokr_w2_b have different ranks {sorted(ranks)}")
    full = not ranks
    # both factors full: the rank is free in LyCORIS (scale 1); PEFT keeps both full when r >= max(b, d) / 2
    # (and, with decompose_both, r >= max(a, c) / 2)
    r = ranks.pop() if ranks else max(1, math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1)
    if "lokr_w2" in out and r < max(b, d) / 2:
        raise UnsupportedError(f"{source}: {n}: a full lokr_w2 {tuple(out['lokr_w2'].shape)} with rank {r}: PEFT "
                               f"factorises w2 whenever r < max(b, d) / 2 = {max(b, d) / 2}, so it cannot hold this")
    if "lokr_w1" in out and decompose_both and r < max(a, c) / 2:
        raise UnsupportedError(f"{source}: {n}: a full lokr_w1 beside factorised ones elsewhere: PEFT's decompose_both "
                               f"would factorise it (r={r} < max(a, c) / 2 = {max(a, c) / 2})")
    if "lokr_w2" not in out and r >= max(b, d) / 2:
        raise UnsupportedError(f"{source}: {n}: a factorised w2 of rank {r} >= max(b, d) / 2 = {max(b, d) / 2}: PEFT "
                               f"would store it full, so it cannot hold this")
    return out, int(r), {"a": a, "b": b, "c": c, "d": d, "full": full, "tucker": tucker, "conv1d": conv1d,
                         "w1_decomposed": "lokr_w1_a" in out, "w2_full": "lokr_w2" in out}


def _lokr_config(params: dict, extra: dict, r: int, alpha: Any, common: dict, source: str) -> Any:
    from ..methods.lokr import LoKrConfig, factorization

    eff = {m: e["tucker"] for m, e in extra.items()}
    decompose_both = any(e["w1_decomposed"] for e in extra.values())
    candidates = None
    for m, e in extra.items():
        out, inn = e["a"] * e["b"], e["c"] * e["d"]
        fs = {f for f in [-1, *range(1, max(out, inn) + 1)]
              if factorization(out, f) == (e["a"], e["b"]) and factorization(inn, f) == (e["c"], e["d"])}
        candidates = fs if candidates is None else candidates & fs
    if not candidates:
        raise UnsupportedError(f"{source}: no single PEFT decompose_factor reproduces every module's Kronecker "
                               f"factor sizes (PEFT derives them from one factor)")
    factor = -1 if -1 in candidates else min(candidates)
    return LoKrConfig(r=r, alpha=alpha, decompose_both=decompose_both, decompose_factor=factor,
                      use_effective_conv2d=any(eff.values()), **common)
