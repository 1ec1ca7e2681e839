"""Adapter format conversion: PEFT <-> kohya / LyCORIS, MLX (mlx-lm) and candle-lora.

PEFT is the hub: every conversion reads its source into an :class:`~peftmath.adapter.Adapter` (PEFT's
parameter names and config) and writes the target from it. The grammar, layout and scaling of each
format are in ``specs/formats.md``; in short (``s`` is the factor that multiplies ``B @ A``):

============  =====================================  ==========================  =========================
format        per-module tensors                     layout                      scaling
============  =====================================  ==========================  =========================
PEFT          ``<m>.lora_A.weight`` / ``lora_B``      A ``(r, in)``, B ``(out,r)``  config: alpha/r, alpha/√r
kohya         ``<pfx>_<m with _>.lora_down.weight``   down = A, up = B            ``alpha`` tensor / rank
MLX           ``<m>.lora_a`` / ``<m>.lora_b``         a = Aᵀ ``(in, r)``, b = Bᵀ   raw ``scale`` in config
candle-lora   ``<pfx>.a<i>.weight`` / ``b<i>``        a = A, b = B; i = sort rank  not stored (LoraConfig)
============  =====================================  ==========================  =========================

Every conversion keeps the delta weights identical (the same bits where only names and transposes change;
one rounding of the scale where a scale is folded), refuses with :class:`~peftmath.errors.UnsupportedError`
what the target cannot express (saying what would be lost), and reports keys it cannot place with
:class:`~peftmath.errors.CheckpointError` instead of dropping them. Nothing is written on an error, and
every file is written atomically (a temporary file renamed into place).

Entry points: :func:`convert` (Adapter -> :class:`Converted`), :func:`to_adapter` (tensors of a format ->
Adapter), :func:`read_any` / :func:`detect_format` (files -> Adapter / format name) and
:func:`convert_path` (what ``peftmath convert ADAPTER --to FORMAT -o OUT`` calls).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapter import Adapter
from .errors import CheckpointError, ConfigError, PeftMathWarning, ShapeError, UnsupportedError
from .io.safetensors import SafeTensorsFile, atomic_path, save_file

__all__ = [
    "FORMATS",
    "Converted",
    "ConversionWarning",
    "convert",
    "to_adapter",
    "detect_format",
    "read_any",
    "convert_path",
    "kohya_name",
]

#: the formats :func:`convert` writes and :func:`read_any` reads
FORMATS = ("peft", "kohya", "mlx", "candle-lora")
_ALIASES = {"lycoris": "kohya", "candle": "candle-lora", "candle_lora": "candle-lora", "mlx-lm": "mlx", "hf": "peft"}

PEFT_PREFIX = "base_model.model."
#: safetensors metadata key holding what a target format cannot store (module names, alpha, kinds)
META_KEY = "peftmath.convert"

# candle-lora constants, as in ynishi/candle-lora candle-lora/src/peft_convert.rs
CANDLE_DEFAULT_PREFIX = "lora_llama"
CANDLE_TYPED_PREFIXES = ("lora_llama", "lora_llama_csa", "lora_llama_block")
#: (vocab_size, hidden_size, rank) of the dummy embedding pair the typed conversion adds
CANDLE_DUMMY_EMBEDDING = (32000, 2048, 4)

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KOHYA_LORA_KEYS = ("lora_down.weight", "lora_up.weight")
KOHYA_UNSUPPORTED = ("lora_mid.weight", "dora_scale", "diff", "diff_b", "bias_indices", "bias_values", "oft_blocks",
                     "oft_diag", "oft_R", "boft_R", "w_norm", "b_norm", "on_input", "a1.weight", "a2.weight",
                     "b1.weight", "b2.weight")


class ConversionWarning(PeftMathWarning):
    """Something the target format does not store (alpha, module names) or a tool's own drop rule."""


@dataclass
class Converted:
    """An adapter in a target format, in memory: tensors (NumPy), config (JSON dict or None), metadata."""

    format: str
    tensors: dict[str, np.ndarray]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write to ``path``: a folder for PEFT and MLX, a ``.safetensors`` file for kohya and candle-lora."""
        return _write(self, Path(path), force=force)


# ==================================================================================================
# helpers
# ==================================================================================================
def _fmt(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ConfigError(f"unknown adapter format {name!r}; known formats: {', '.join(FORMATS)}")
    return key


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    from ._array import namespace
    from .backends import backend_for

    return backend_for(namespace(a)).to_host(a)


def _t(a: np.ndarray) -> np.ndarray:
    """A C-contiguous transpose of a 2-D array (same bits)."""
    return np.ascontiguousarray(np.asarray(a).T)


def _some(names: Iterable[str], n: int = 6) -> str:
    names = sorted(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"


def _scalar(value: float) -> np.ndarray:
    """A 0-d alpha tensor: float32 when that holds the value exactly, else float64."""
    value = float(value)
    f32 = np.array(value, dtype=np.float32)
    return f32 if float(f32) == value else np.array(value, dtype=np.float64)


def _number(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A default value and the per-module exceptions (rank_pattern / alpha_pattern)."""
    default = _most_common(list(values.values()))
    return default, {m: v for m, v in sorted(values.items()) if v != default}


def _check_peft_only(adapter: Adapter, target: str, *, allowed: tuple[str, ...], extra_ok: bool = False) -> None:
    if adapter.peft_type not in allowed:
        raise UnsupportedError(
            f"{target} cannot hold a {adapter.peft_type} adapter (it holds {', '.join(allowed)}); "
            f"every module's {adapter.peft_type} parameters would be lost"
        )
    if adapter.shared:
        raise UnsupportedError(f"{target} has no place for the shared tensors {_some(adapter.shared)}; they would be lost")
    if adapter.other and not extra_ok:
        raise UnsupportedError(
            f"{target} has no place for the base-model tensors the adapter replaces (modules_to_save / trained "
            f"biases): {_some(adapter.other)}; they would be lost"
        )


def _meta_json(data: dict[str, Any]) -> dict[str, str]:
    return {META_KEY: json.dumps(data, sort_keys=True)}


def _read_meta(metadata: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CheckpointError(f"{source}: metadata {META_KEY!r} is not valid ({exc})") from None
    return data


def _any_conv1d_t(kinds: Mapping[str, str]) -> bool:
    """PEFT's fan_in_fan_out: true when a module is a transformers Conv1D (weight stored (in, out))."""
    return any(str(getattr(k, "value", k)) == "Conv1D" for k in kinds.values())


def _lora_scales(adapter: Adapter) -> dict[str, float]:
    return {m: adapter.config.scaling_for(m) for m in adapter.modules}


# ==================================================================================================
# PEFT -> X
# ==================================================================================================
def convert(adapter: Adapter, to: str, **options: Any) -> Converted:
    """``adapter`` in format ``to`` (``"peft"``, ``"kohya"``, ``"mlx"``, ``"candle-lora"``).

    Options by target:

    * kohya: ``prefix="lycoris"`` (keys are ``<prefix>_<module with dots as underscores>``; use
      ``"lora_unet"`` / ``"lora_te"`` / ``"lora_te1"`` for Stable Diffusion's UNet / text encoders).
    * mlx: ``num_layers=-1`` (mlx-lm wraps the last ``num_layers`` blocks; -1 means all of them).
    * candle-lora: ``prefix="lora_llama"``, ``typed=False`` (Llama's three prefixes),
      ``add_dummy_embeddings=False`` (typed only), ``lossy=False`` (True reproduces candle-lora's own
      converter, which drops what it does not understand, with a :class:`ConversionWarning`).
    """
    to = _fmt(to)
    if to == "peft":
        _no_options(options, "peft")
        return _to_peft(adapter)
    if to == "kohya":
        return _to_kohya(adapter, **options)
    if to == "mlx":
        return _to_mlx(adapter, **options)
    return _to_candle(adapter, **options)


def _to_peft(adapter: Adapter) -> Converted:
    from .io.peft import LAYER_KINDS_KEY, PEFT_VERSION

    tensors = {k: _host(v) for k, v in adapter.state_dict().items()}
    meta = {"format": "pt"}
    if adapter.layer_kinds:
        meta[LAYER_KINDS_KEY] = json.dumps({k: v.value for k, v in sorted(adapter.layer_kinds.items())})
    data = adapter.config.to_dict()
    if data.get("peft_version") is None:
        data["peft_version"] = PEFT_VERSION
    data["inference_mode"] = True
    return Converted("peft", tensors, data, meta)


# --- kohya / LyCORIS ------------------------------------------------------------------------------
def kohya_name(module: str, prefix: str = "lycoris") -> str:
    """The kohya / LyCORIS module name: ``<prefix>_<module>`` with every dot replaced by an underscore.

    >>> kohya_name("down_blocks.0.attentions.0.proj_in", "lora_unet")
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    return f"{prefix}_{module}".replace(".", "_")


def _check_prefix(prefix: Any, what: str) -> None:
    if not isinstance(prefix, str) or not prefix or not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise ConfigError(f"{what} prefix must be a non-empty name of letters, digits and underscores, got {prefix!r}")


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
    lost = sorted(set(p) - {"lora_A.weight", "lora_B.weight"})
    if "lora_magnitude_vector" in lost:
        raise UnsupportedError(f"{m}: DoRA (lora_magnitude_vector) cannot be written as kohya LoRA; the magnitude "
                               f"(and so the weight decomposition) would be lost")
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
    return {"lora_down.weight": A, "lora_up.weight": B, "alpha": _scalar(alpha_k)}


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


def _no_options(unknown: Mapping[str, Any], fmt: str) -> None:
    if unknown:
        raise ConfigError(f"unknown option(s) for {fmt}: {', '.join(sorted(unknown))}")


# ==================================================================================================
# X -> PEFT
# ==================================================================================================
def to_adapter(tensors: Mapping[str, Any], format: str, *, config: Mapping[str, Any] | None = None,
               metadata: Mapping[str, str] | None = None, source: str = "tensors", **options: Any) -> Adapter:
    """An :class:`Adapter` from the tensors (and config / safetensors metadata) of format ``format``.

    Options by source format:

    * kohya: ``prefix=None`` (any prefix), ``modules=`` (module names of the base model, to undo the
      dots-to-underscores rename; not needed for files peftmath wrote), ``missing_alpha="error"``
      (``"rank"``: a module without ``alpha`` gets alpha = rank, as LyCORIS assumes).
    * mlx: ``embedding_modules=None`` (names of Embedding modules; default: from peftmath's metadata,
      else names containing ``embed``).
    * candle-lora: ``modules=`` (the adapted module names; candle-lora numbers them in sorted order),
      ``lora_alpha=`` (one alpha, or a mapping by module), ``typed=None``.
    """
    fmt = _fmt(format)
    tensors = {k: _host(v) for k, v in tensors.items()}
    if fmt == "peft":
        from .io.peft import config_from_dict
        if config is None:
            raise ConfigError(f"{source}: a PEFT adapter needs its adapter_config.json")
        return _peft_from_tensors(tensors, config_from_dict(config, source=source), metadata, source)
    if fmt == "kohya":
        return _from_kohya(tensors, metadata, source, **options)
    if fmt == "mlx":
        if config is None:
            raise ConfigError(f"{source}: an MLX adapter needs its adapter_config.json (lora_parameters)")
        return _from_mlx(tensors, config, metadata, source, **options)
    return _from_candle(tensors, metadata, source, **options)


def _peft_from_tensors(tensors: dict, config: Any, metadata: Mapping[str, str] | None, source: str) -> Adapter:
    from .io.peft import split_key
    from .methods import get_method

    method = get_method(config.peft_type)
    params: dict[str, dict[str, Any]] = {}
    other = {}
    for k, a in tensors.items():
        parts = split_key(k, tuple(method.PARAMETER_SUFFIXES))
        if parts is None:
            other[k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k] = a
        else:
            params.setdefault(parts[0], {})[parts[1]] = a
    from .io.peft import LAYER_KINDS_KEY

    kinds = json.loads((metadata or {}).get(LAYER_KINDS_KEY, "{}"))
    return Adapter(config, params, other=other, layer_kinds=kinds)


# --- kohya -> PEFT --------------------------------------------------------------------------------
def _kohya_algo(name: str, suffixes: set[str], source: str) -> str:
    bad = sorted(s for s in suffixes if s in KOHYA_UNSUPPORTED)
    if bad:
        raise UnsupportedError(f"{source}: {name}: {', '.join(f'{name}.{s}' for s in bad)} "
                               f"(LyCORIS {'tucker LoCon' if 'lora_mid.weight' in bad else 'DoRA / OFT / other'}) "
                               f"has no PEFT equivalent this converter writes")
    kinds = set()
    for s in suffixes:
        if s in KOHYA_LORA_KEYS:
            kinds.add("lora")
        elif s in LOHA_KEYS:
            kinds.add("loha")
        elif s in LOKR_KEYS:
            kinds.add("lokr")
        elif s != "alpha":
            raise CheckpointError(f"{source}: key {name}.{s} is not part of the kohya/LyCORIS grammar "
                                  f"(lora_down/lora_up/alpha, hada_*, lokr_*)")
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
    from .methods.loha import LoHaConfig
    from .methods.lora import LoraConfig

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
        config = LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=_any_conv1d_t(kinds), **common)
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
    return {"lora_A.weight": down, "lora_B.weight": up}, int(r)


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
    from .methods.lokr import LoKrConfig, factorization

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


# --- MLX -> PEFT ----------------------------------------------------------------------------------
def _from_mlx(tensors: dict, config: Mapping[str, Any], metadata: Mapping[str, str] | None, source: str, *,
              embedding_modules: Iterable[str] | None = None) -> Adapter:
    from .methods.lora import LoraConfig

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


# --- candle-lora -> PEFT --------------------------------------------------------------------------
_CANDLE_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)\.(?P<ab>[ab])(?P<idx>\d+)\.weight$")


def _from_candle(tensors: dict, metadata: Mapping[str, str] | None, source: str, *,
                 modules: Iterable[str] | None = None, lora_alpha: Any = None, typed: bool | None = None) -> Adapter:
    from .methods.lora import LoraConfig

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


# ==================================================================================================
# files
# ==================================================================================================
_PEFT_SUFFIX_RE = re.compile(r"\.(lora_[AB]\.weight|lora_B\.bias|lora_embedding_[AB]|lora_magnitude_vector|"
                             r"hada_(w[12]_[ab]|t[12])|lokr_(w[12](_[ab])?|t2)|ia3_l|oft_R\.weight|oft_r|boft_R|boft_s|"
                             r"vera_lambda_[bd]|lora_E|ranknum)$")
_KOHYA_RE = re.compile(r"^[A-Za-z0-9_]+\.(lora_(down|up|mid)\.weight|alpha|dora_scale|hada_(w[12]_[ab]|t[12])|"
                       r"lokr_(w[12](_[ab])?|t2))$")
_MLX_RE = re.compile(r"^.+\.(lora_a|lora_b|m)$")


def _classify_keys(keys: Iterable[str]) -> dict[str, list[str]]:
    """Key -> the formats whose grammar it fits (first match wins in kohya, candle, peft, mlx order)."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if _KOHYA_RE.match(k):
            fmt = "kohya"
        elif _CANDLE_RE.match(k):
            fmt = "candle-lora"
        elif _PEFT_SUFFIX_RE.search(k) or k.startswith(PEFT_PREFIX):
            fmt = "peft"
        elif _MLX_RE.match(k):
            fmt = "mlx"
        else:
            fmt = "unknown"
        out.setdefault(fmt, []).append(k)
    return out


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: cannot read as JSON ({exc})") from None


def _locate(path: Path) -> tuple[str, Path, Path | None]:
    """(format, weights file, config file or None) of an adapter path, from its files and keys."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        cfg = path / "adapter_config.json"
        data = _read_json(cfg) if cfg.exists() else None
        if (path / "adapter_model.safetensors").exists() and isinstance(data, dict) and "peft_type" in data:
            return "peft", path / "adapter_model.safetensors", cfg
        if (path / "adapters.safetensors").exists() and isinstance(data, dict) and "lora_parameters" in data:
            return "mlx", path / "adapters.safetensors", cfg
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: not a PEFT folder (adapter_config.json with peft_type + "
                                  f"adapter_model.safetensors) nor an MLX one (adapter_config.json with "
                                  f"lora_parameters + adapters.safetensors); safetensors files: "
                                  f"{_some(f.name for f in files)}")
        path = files[0]
    folder = path.parent
    cfg = folder / "adapter_config.json"
    if cfg.exists():
        data = _read_json(cfg)
        if path.name == "adapter_model.safetensors" and isinstance(data, dict) and "peft_type" in data:
            return "peft", path, cfg
        if path.name == "adapters.safetensors" and isinstance(data, dict) and "lora_parameters" in data:
            return "mlx", path, cfg
    f = SafeTensorsFile(path)
    fmt = _format_of_keys(list(f), str(path))
    return fmt, path, (cfg if fmt in ("peft", "mlx") and cfg.exists() else None)


def _format_of_keys(keys: list[str], source: str) -> str:
    if not keys:
        raise CheckpointError(f"{source}: no tensors, so no format")
    by = _classify_keys(keys)
    if "unknown" in by:
        raise CheckpointError(f"{source}: keys in no known adapter grammar (PEFT, kohya, MLX, candle-lora): "
                              f"{_some(by['unknown'])}")
    if len(by) > 1:
        raise CheckpointError(f"{source}: keys of several formats in one file: "
                              + "; ".join(f"{f}: {_some(ks, 3)}" for f, ks in sorted(by.items())))
    return next(iter(by))


def detect_format(path: str | os.PathLike) -> str:
    """The format of the adapter at ``path`` (a folder or a ``.safetensors`` file): one of :data:`FORMATS`.

    PEFT: ``adapter_config.json`` (with ``peft_type``) + ``adapter_model.safetensors``; MLX:
    ``adapter_config.json`` (with ``lora_parameters``) + ``adapters.safetensors``; kohya and candle-lora:
    a ``.safetensors`` file whose every key fits their grammar. Unknown or mixed keys raise
    :class:`~peftmath.errors.CheckpointError` naming them.
    """
    return _locate(Path(path))[0]


def read_any(path: str | os.PathLike, *, from_: str | None = None, **options: Any) -> Adapter:
    """Read the adapter at ``path`` in any format (detected unless ``from_`` is given) as an Adapter."""
    p = Path(path)
    fmt, weights, cfg = _locate(p)
    if from_ is not None and _fmt(from_) != fmt:
        want = _fmt(from_)
        if want in ("kohya", "candle-lora") and weights.suffix == ".safetensors":
            fmt = want
        else:
            raise CheckpointError(f"{p}: asked to read it as {want} but its files are {fmt}")
    if fmt == "peft":
        from .io.peft import load_adapter
        if options:
            _no_options(options, "peft")
        return load_adapter(weights.parent if p.is_dir() else weights)
    f = SafeTensorsFile(weights)
    tensors = {k: f[k] for k in f}
    config = _read_json(cfg) if cfg is not None else None
    return to_adapter(tensors, fmt, config=config, metadata=f.metadata, source=str(weights), **options)


def _target_paths(fmt: str, dst: Path) -> list[Path]:
    if fmt == "peft":
        return [dst / "adapter_model.safetensors", dst / "adapter_config.json"]
    if fmt == "mlx":
        return [dst / "adapters.safetensors", dst / "adapter_config.json"]
    return [dst]


def _write(conv: Converted, dst: Path, *, force: bool) -> Path:
    if conv.format in ("kohya", "candle-lora"):
        if dst.suffix != ".safetensors" or dst.is_dir():
            raise ConfigError(f"{dst}: a {conv.format} adapter is one .safetensors file; give a path ending in "
                              f".safetensors")
    elif dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst}: a {conv.format} adapter is a folder, and this is a file")
    targets = _target_paths(conv.format, dst)
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise CheckpointError(f"{_some(str(t) for t in existing)} already exist(s); pass force=True (--force) "
                              f"to overwrite")
    (dst.parent if conv.format in ("kohya", "candle-lora") else dst).mkdir(parents=True, exist_ok=True)
    save_file(conv.tensors, targets[0], metadata=conv.metadata or None)
    if conv.config is not None:
        tmp = atomic_path(targets[1])
        try:
            tmp.write_text(json.dumps(conv.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, targets[1])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dst


def convert_path(src: str | os.PathLike, dst: str | os.PathLike, to: str, from_: str | None = None,
                 force: bool = False, *, read_options: Mapping[str, Any] | None = None,
                 **options: Any) -> Path:
    """Convert the adapter at ``src`` (format detected unless ``from_``) to format ``to`` at ``dst``.

    What ``peftmath convert ADAPTER --to FORMAT -o OUT [--from FORMAT] [--force]`` calls. Everything is
    converted in memory and checked first; only then are files written (atomically), so an error leaves
    ``dst`` untouched. ``read_options`` go to :func:`read_any`, ``options`` to :func:`convert`.
    """
    adapter = read_any(src, from_=from_, **dict(read_options or {}))
    conv = convert(adapter, to, **options)
    return conv.save(dst, force=force)
