"""PEFT LoRA -> GGUF LoRA adapter for llama.cpp (``llama-cli --lora`` / ``--lora-scaled``, ``llama-export-lora``).

Written as llama.cpp's own ``convert_lora_to_gguf.py`` writes it, with the maintained ``gguf`` package
(``pip install 'peftmath[gguf]'``):

* metadata ``general.architecture`` (the base model's llama.cpp architecture), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), ``general.file_type``;
* per module two tensors named after the base tensor in llama.cpp's grammar, from ``gguf.TensorNameMap``
  for that architecture: ``blk.N.attn_q.weight.lora_a`` = A ``(r, in)`` and ``.lora_b`` = B ``(out, r)``
  (numpy shapes; GGML's ``ne`` is the reverse, which is what llama.cpp checks);
* llama.cpp scales a module by ``alpha / rank`` with one ``alpha`` for the file and the rank read from
  ``lora_b``; PEFT's scale ``s_m`` (``alpha_m / r_m``, or ``alpha_m / √r_m`` with rsLoRA) is expressible
  when ``s_m · r_m`` is the same for every module, which is then the file's alpha (so ``rank_pattern``
  is fine; an ``alpha_pattern`` or rsLoRA with mixed ranks that breaks this is refused);
* architectures whose converter reorders the q / k projection rows for llama.cpp's rope (``LlamaModel``:
  Llama, Mistral, Mixtral) get the same row permutation on ``lora_b`` of ``q_proj`` / ``k_proj``
  (``ΔW = s·BA`` has the rows of B), so the adapter matches the converted base model.

Refused, with what would be lost: methods other than LoRA, DoRA (the magnitude), a trained LoRA bias,
embedding and convolution LoRA, modules_to_save / trained biases, an alpha of 0 (llama.cpp reads it as
"no alpha": scale 1), modules llama.cpp's tensor map does not know, architectures not in
:data:`GGUF_ARCHITECTURES`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import ConfigError, ShapeError, UnsupportedError
from ._common import ConversionWarning, Converted, _check_peft_only, _host, _read_json, _some

#: Hugging Face architecture (config.json ``architectures[0]``) -> (llama.cpp architecture, whether its
#: converter permutes the q / k projection rows: ``LlamaModel.undo_permute``)
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "MixtralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise UnsupportedError(f"writing GGUF needs the gguf package ({exc}); pip install 'peftmath[gguf]'") from None
    return gguf


def model_config_from(path: str | os.PathLike) -> dict[str, Any]:
    """The base model's ``config.json`` (a folder holding it, or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no config.json; GGUF needs the base model's config.json (architectures, "
                          f"num_hidden_layers, attention heads)")
    data = _read_json(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: config.json is not an object")
    return data


def _arch(cfg: Mapping[str, Any]) -> tuple[str, bool, str]:
    archs = cfg.get("architectures") or []
    hf = archs[0] if archs else None
    if hf not in GGUF_ARCHITECTURES:
        raise UnsupportedError(f"base architecture {hf!r}: peftmath's GGUF writer knows "
                               f"{', '.join(sorted(GGUF_ARCHITECTURES))}; for others use llama.cpp's "
                               f"convert_lora_to_gguf.py")
    name, permute = GGUF_ARCHITECTURES[hf]
    return name, permute, hf


def _int(cfg: Mapping[str, Any], key: str, default: Any = None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q / k row order: rows grouped ``(n_head, 2, d/2)`` become ``(n_head, d/2, 2)``
    (HF's half-split rope pairs -> GGML's adjacent pairs), columns untouched."""
    out = b.shape[0]
    if out % (2 * n_head):
        raise ShapeError(f"{out} rows do not split into {n_head} heads of an even size")
    return np.ascontiguousarray(b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape))


def _file_alpha(adapter: Adapter) -> float:
    """The one alpha with ``alpha / r_m = s_m`` for every module, or UnsupportedError."""
    cfg = adapter.config
    want: dict[str, float] = {}
    for m in adapter.modules:
        r, alpha = cfg.rank_and_alpha(m)
        want[m] = float(alpha) * math.sqrt(r) if cfg.use_rslora else float(alpha)
    values = sorted(set(want.values()))
    if len(values) > 1:
        by = {v: [m for m in want if want[m] == v] for v in values}
        raise UnsupportedError(
            "llama.cpp scales every module by one alpha / rank; these modules need different alphas "
            + "; ".join(f"{v!r}: {_some(ms, 2)}" for v, ms in by.items())
            + (" (rsLoRA's alpha/√r with mixed ranks)" if cfg.use_rslora else " (alpha_pattern)")
            + "; their scales cannot all be kept")
    alpha = values[0]
    if alpha == 0:
        raise UnsupportedError("alpha 0 (a zero update in PEFT) means 'no alpha: scale 1' to llama.cpp; the "
                               "converted adapter would not be zero")
    if float(np.float32(alpha)) != alpha:
        warnings.warn(f"llama.cpp stores alpha in float32: {alpha!r} becomes {float(np.float32(alpha))!r} "
                      f"(one rounding of every scale)", ConversionWarning, stacklevel=4)
    return alpha


def _tensor(a: np.ndarray, what: str) -> np.ndarray:
    """float16 stays F16; float32 / bfloat16 become F32 exactly; wider floats are rounded to F32 (warned)."""
    a = np.asarray(_host(a))
    if a.dtype == np.float16 or a.dtype == np.float32:
        return np.ascontiguousarray(a)
    if a.dtype.kind != "f" and "bfloat16" not in str(a.dtype):
        raise UnsupportedError(f"{what}: dtype {a.dtype} is not a float; GGUF LoRA tensors are F32 / F16")
    f32 = np.ascontiguousarray(a.astype(np.float32))
    if a.dtype.itemsize > 4 and not np.array_equal(f32.astype(a.dtype), a):
        warnings.warn(f"{what}: {a.dtype} rounded to float32 (GGUF LoRA tensors are F32 / F16)",
                      ConversionWarning, stacklevel=5)
    return f32


def _to_gguf(adapter: Adapter, *, model_config: Mapping[str, Any] | str | os.PathLike | None = None,
             **unknown: Any) -> Converted:
    from ._common import _no_options

    _no_options(unknown, "gguf")
    gguf = _gguf()
    if model_config is None:
        raise ConfigError("GGUF tensor names depend on the base model's architecture: pass model_config= (its "
                          "config.json, or the folder holding it; --model-config on the command line)")
    cfg = model_config if isinstance(model_config, Mapping) else model_config_from(model_config)
    _check_peft_only(adapter, "a GGUF LoRA adapter", allowed=("LORA",))
    if adapter.config.use_dora:
        raise UnsupportedError("llama.cpp's LoRA adapters have no DoRA magnitude (lora_magnitude_vector); "
                               "merge the adapter instead (peftmath merge) and convert the merged model")
    arch, permute, hf = _arch(cfg)
    n_blocks = _int(cfg, "num_hidden_layers")
    n_head = _int(cfg, "num_attention_heads")
    n_kv = _int(cfg, "num_key_value_heads", n_head)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    alpha = _file_alpha(adapter)
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for m in adapter.modules:
        p = adapter.params[m]
        kind = adapter.layer_kinds.get(m)
        kind = getattr(kind, "value", kind)
        extra = sorted(set(p) - {"lora_A.weight", "lora_B.weight"})
        if any(s.startswith("lora_embedding") for s in extra) or kind == "Embedding":
            raise UnsupportedError(f"{m}: an Embedding LoRA (lora_embedding_A/B): peftmath writes Linear modules "
                                   f"to GGUF only (llama.cpp's token_embd LoRA has its own transposed layout)")
        if extra or (kind is not None and kind != "Linear"):
            raise UnsupportedError(f"{m}: llama.cpp LoRA holds Linear lora_A / lora_B only; "
                                   f"{'its ' + ', '.join(extra) if extra else 'a ' + str(kind) + ' module'} would be lost")
        A, B = (_tensor(p[s], f"{m}.{s}") for s in ("lora_A.weight", "lora_B.weight"))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ShapeError(f"{m}: lora_A {A.shape} and lora_B {B.shape} are not (r, in) and (out, r)")
        name = names.get_name(m + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UnsupportedError(f"{m}: llama.cpp's {arch} architecture has no tensor for this module "
                                   f"(gguf.TensorNameMap); the module would be lost")
        if name in where:
            raise UnsupportedError(f"modules {where[name]!r} and {m!r} both map to {name!r}")
        where[name] = m
        if name == "output.weight" and cfg.get("tie_word_embeddings"):
            raise UnsupportedError(f"{m}: the base model ties lm_head to the embeddings, and llama.cpp ignores "
                                   f"an adapter on lm_head there")
        if permute and m.endswith(("q_proj", "k_proj")):
            B = permute_rows(B, n_head if m.endswith("q_proj") else n_kv)
        tensors[name + ".lora_a"] = A
        tensors[name + ".lora_b"] = B
    f16 = all(t.dtype == np.float16 for t in tensors.values())
    kv = {
        "general.architecture": arch,
        "general.type": gguf.GGUFType.ADAPTER,
        gguf.Keys.Adapter.TYPE: "lora",
        gguf.Keys.Adapter.LORA_ALPHA: alpha,
        gguf.Keys.General.FILE_TYPE: int(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32),
        "general.quantization_version": int(gguf.GGML_QUANT_VERSION),
    }
    meta = {"peftmath.convert": json.dumps({"format": "gguf", "hf_architecture": hf, "modules": where},
                                           sort_keys=True)}
    return Converted("gguf", tensors, kv, meta)


def write_gguf(conv: Converted, tmp: Path) -> None:
    """Write ``conv`` (from :func:`_to_gguf`) as a GGUF file at ``tmp`` with gguf's ``GGUFWriter``."""
    gguf = _gguf()
    kv = dict(conv.config or {})
    w = gguf.GGUFWriter(str(tmp), kv.pop("general.architecture"))
    try:
        w.add_type(kv.pop("general.type"))
        w.add_string(gguf.Keys.Adapter.TYPE, kv.pop(gguf.Keys.Adapter.TYPE))
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, kv.pop(gguf.Keys.Adapter.LORA_ALPHA))
        w.add_file_type(kv.pop(gguf.Keys.General.FILE_TYPE))
        w.add_quantization_version(kv.pop("general.quantization_version"))
        for k, v in {**kv, **conv.metadata}.items():
            w.add_string(k, str(v))
        for name, a in conv.tensors.items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
