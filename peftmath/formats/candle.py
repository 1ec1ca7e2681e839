"""candle-lora <-> PEFT (LoRA).

Keys ``<prefix>.a<i>.weight`` = A and ``<prefix>.b<i>.weight`` = B, ``i`` the module's position in sorted
order; the files store neither module names nor alpha (peftmath keeps both in the safetensors metadata
for the way back). Constants follow ynishi/candle-lora's ``peft_convert.rs``. See ``specs/formats.md``
(candle-lora section)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ._common import (ConversionWarning, Converted, META_KEY, PEFT_PREFIX, _any_conv1d_t, _check_prefix, _host,
                      _meta_json, _no_options, _number, _patterns, _read_meta, _some)

# candle-lora constants, as in ynishi/candle-lora candle-lora/src/peft_convert.rs
CANDLE_DEFAULT_PREFIX = "lora_llama"
CANDLE_TYPED_PREFIXES = ("lora_llama", "lora_llama_csa", "lora_llama_block")
#: (vocab_size, hidden_size, rank) of the dummy embedding pair the typed conversion adds
CANDLE_DUMMY_EMBEDDING = (32000, 2048, 4)


# --- candle-lora ----------------------------------------------------------------------------------
def candle_prefix_for(name: str) -> str:
    """candle-lora's typed prefix for a PEFT layer name (``CandleLoraPrefix::from_peft_layer_name``).

    >>> [candle_prefix_for(n) for n in ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")]
    ['lora_llama', 'lora_llama_csa', 'lora_llama_block']
    """
    if "embed_tokens" in name or "lm_head" in name:
        return "lora_llama"
    if "self_attn" in name and any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "lora_llama_csa"
    return "lora_llama_block"


def _candle_pairs(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """candle-lora's pairing rule: a key containing ``.lora_A.weight`` with the matching ``.lora_B.weight``
    key; returns (base names of the pairs, keys it ignores). Base names keep the file's prefix."""
    keys = set(keys)
    bases, used = [], set()
    for k in keys:
        if ".lora_A.weight" in k:
            base = k.replace(".lora_A.weight", "")
            b = f"{base}.lora_B.weight"
            if b in keys:
                bases.append(base)
                used.update((k, b))
    return sorted(bases), sorted(keys - used)


def _to_candle(adapter: Adapter, *, prefix: str = CANDLE_DEFAULT_PREFIX, typed: bool = False,
               add_dummy_embeddings: bool = False, lossy: bool = False,
               dummy_embedding: tuple[int, int, int] = CANDLE_DUMMY_EMBEDDING, **unknown: Any) -> Converted:
    _no_options(unknown, "candle-lora")
    _check_prefix(prefix, "candle-lora")
    if adapter.peft_type != "LORA":
        raise UnsupportedError(f"candle-lora's converter reads LoRA pairs only; a {adapter.peft_type} adapter "
                               f"would be lost entirely")
    state = {k: _host(v) for k, v in adapter.state_dict().items()}
    bases, ignored = _candle_pairs(state)
    lost = []
    if ignored:
        lost.append(f"tensors its converter ignores: {_some(ignored)}")
    if adapter.config.use_dora:
        lost.append("DoRA's magnitude (candle-lora has plain LoRA only)")
    if lost:
        msg = "candle-lora cannot hold " + "; ".join(lost)
        if not lossy:
            raise UnsupportedError(msg + ". Pass lossy=True to drop them as candle-lora's own converter does")
        warnings.warn(msg + "; dropped (lossy=True), as candle-lora's convert_peft_to_candle_lora does",
                      ConversionWarning, stacklevel=3)
    modules = [b[len(PEFT_PREFIX):] if b.startswith(PEFT_PREFIX) else b for b in bases]
    groups: dict[str, list[tuple[str, str]]] = {}
    for base, m in zip(bases, modules):
        pfx = candle_prefix_for(base) if typed else prefix
        groups.setdefault(pfx, []).append((base, m))
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for pfx, items in groups.items():
        for idx, (base, m) in enumerate(sorted(items)):
            tensors[f"{pfx}.a{idx}.weight"] = state[f"{base}.lora_A.weight"]
            tensors[f"{pfx}.b{idx}.weight"] = state[f"{base}.lora_B.weight"]
            names[f"{pfx}.{idx}"] = m
    dummy = False
    if typed and add_dummy_embeddings and not any(k.startswith("lora_llama.") for k in tensors):
        vocab, hidden, rank = dummy_embedding
        tensors["lora_llama.a0.weight"] = np.zeros((rank, vocab), dtype=np.float32)
        tensors["lora_llama.b0.weight"] = np.zeros((hidden, rank), dtype=np.float32)
        dummy = True
        warnings.warn(f"added candle-lora's dummy embedding pair lora_llama.a0/b0 (zeros, {rank}x{vocab} and "
                      f"{hidden}x{rank}): a zero update, absent from the PEFT adapter", ConversionWarning, stacklevel=3)
    scales = {m: adapter.config.scaling_for(m) for m in modules}
    ranks = {m: adapter.config.rank_and_alpha(m)[0] for m in modules}
    # candle-lora's LoraConfig applies alpha / rank; the alpha that gives PEFT's scale:
    alphas = {m: _number(scales[m] * ranks[m]) for m in modules}
    warnings.warn(
        "candle-lora files store no module names and no alpha: its LoraConfig must be given "
        f"rank/alpha {sorted({(ranks[m], alphas[m]) for m in modules})} (alpha = PEFT scale x rank"
        f"{', rsLoRA folded' if adapter.config.use_rslora else ''}); the names and scales are kept in the "
        f"safetensors metadata {META_KEY!r} for the way back", ConversionWarning, stacklevel=3)
    meta = _meta_json({"format": "candle-lora", "typed": bool(typed), "prefix": prefix, "modules": names,
                       "dummy_embedding": dummy, "rank": ranks, "alpha": alphas,
                       "layer_kinds": {m: k.value for m, k in adapter.layer_kinds.items() if m in modules}})
    return Converted("candle-lora", tensors, None, meta)


# --- candle-lora -> PEFT --------------------------------------------------------------------------
_CANDLE_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)\.(?P<ab>[ab])(?P<idx>\d+)\.weight$")


def _from_candle(tensors: dict, metadata: Mapping[str, str] | None, source: str, *,
                 modules: Iterable[str] | None = None, lora_alpha: Any = None, typed: bool | None = None) -> Adapter:
    from ..methods.lora import LoraConfig

    meta = _read_meta(metadata, source)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for k, a in tensors.items():
        mt = _CANDLE_RE.match(k)
        if not mt:
            bad.append(k)
            continue
        pairs.setdefault(f"{mt['prefix']}.{int(mt['idx'])}", {})[mt["ab"]] = a
    if bad:
        raise CheckpointError(f"{source}: keys outside candle-lora's grammar (<prefix>.a<i>.weight / b<i>.weight): "
                              f"{_some(bad)}")
    for stem, p in sorted(pairs.items()):
        for ab in "ab":
            if ab not in p:
                pfx, i = stem.rsplit(".", 1)
                raise CheckpointError(f"{source}: {pfx}.{ab}{i}.weight is missing (its pair is present)")
        if p["a"].ndim < 2 or p["b"].shape[1] != p["a"].shape[0]:
            raise ShapeError(f"{source}: {stem}: a {tuple(p['a'].shape)} and b {tuple(p['b'].shape)} do not fit "
                             f"(a is (r, in), b is (out, r))")
    if meta.get("modules"):
        names = dict(meta["modules"])
        for stem in [s for s in pairs if s not in names]:
            if meta.get("dummy_embedding") and stem == "lora_llama.0":
                del pairs[stem]
    elif modules is not None:
        mods = sorted(set(modules))
        if typed is None:
            # a typed file has lora_llama_csa / lora_llama_block groups; with lora_llama alone both readings agree
            typed = any(s.split(".")[0] in CANDLE_TYPED_PREFIXES[1:] for s in pairs)
        names = {}
        grouped: dict[str, list[str]] = {}
        for m in mods:
            grouped.setdefault(candle_prefix_for(m) if typed else None, []).append(m)
        prefixes = sorted({s.rsplit(".", 1)[0] for s in pairs})
        for pfx in prefixes:
            ms = grouped.get(pfx if typed else None, [])
            if not typed and len(prefixes) > 1:
                raise CheckpointError(f"{source}: several prefixes {prefixes} in an untyped candle-lora file")
            count = sum(1 for s in pairs if s.rsplit(".", 1)[0] == pfx)
            if typed and pfx == "lora_llama" and not ms and count == 1 and \
                    not np.any(pairs["lora_llama.0"]["a"]) and not np.any(pairs["lora_llama.0"]["b"]):
                del pairs["lora_llama.0"]   # candle-lora's dummy embedding pair (zeros)
                continue
            if count != len(ms):
                raise CheckpointError(f"{source}: {count} pair(s) under {pfx!r} but {len(ms)} module name(s) given "
                                      f"for it ({_some(ms, 3)}); candle-lora numbers modules in sorted order")
            for i, m in enumerate(ms):
                names[f"{pfx}.{i}"] = m
    else:
        raise CheckpointError(f"{source}: candle-lora files number modules (a0, b0, ...) and keep no names; pass "
                              f"modules=[...] (the adapted module names) to convert it back")
    alphas_meta = meta.get("alpha") or {}
    params, ranks, alphas = {}, {}, {}
    for stem, p in sorted(pairs.items()):
        if stem not in names:
            raise CheckpointError(f"{source}: no module name for candle-lora pair {stem!r}")
        m = names[stem]
        params[m] = {"lora_A.weight": p["a"], "lora_B.weight": p["b"]}
        ranks[m] = int(p["a"].shape[0])
        if lora_alpha is not None:
            alphas[m] = lora_alpha[m] if isinstance(lora_alpha, Mapping) else lora_alpha
        elif m in alphas_meta:
            alphas[m] = alphas_meta[m]
        else:
            raise ConfigError(f"{source}: candle-lora files store no alpha (its LoraConfig holds it); pass "
                              f"lora_alpha= for {m!r}")
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns({m: _number(a) for m, a in alphas.items()})
    kinds = {m: k for m, k in (meta.get("layer_kinds") or {}).items() if m in params}
    cfg = LoraConfig(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     target_modules=sorted(params), fan_in_fan_out=_any_conv1d_t(kinds))
    return Adapter(cfg, params, layer_kinds=kinds)
