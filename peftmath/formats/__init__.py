"""Adapter format conversion: PEFT <-> kohya / LyCORIS, MLX (mlx-lm) and candle-lora.

PEFT is the hub: every conversion reads its source into an :class:`~peftmath.adapter.Adapter` (PEFT's
parameter names and config) and writes the target from it. The grammar, layout and scaling of each
format are in ``specs/formats.md``; in short (``s`` is the factor that multiplies ``B @ A``):

===========  =====================================  ============================  =========================
format       per-module tensors                     layout                        scaling
===========  =====================================  ============================  =========================
PEFT         ``<m>.lora_A.weight`` / ``lora_B``     A ``(r, in)``, B ``(out,r)``  config: alpha/r, alpha/√r
kohya        ``<pfx>_<m with _>.lora_down.weight``  down = A, up = B              ``alpha`` tensor / rank
MLX          ``<m>.lora_a`` / ``<m>.lora_b``        a = Aᵀ ``(in, r)``, b = Bᵀ    raw ``scale`` in config
candle-lora  ``<pfx>.a<i>.weight`` / ``b<i>``       a = A, b = B; i = sort rank   not stored (LoraConfig)
===========  =====================================  ============================  =========================

Every conversion keeps the delta weights identical (the same bits where only names and transposes change;
one rounding of the scale where a scale is folded), refuses with :class:`~peftmath.errors.UnsupportedError`
what the target cannot express (saying what would be lost), and reports keys it cannot place with
:class:`~peftmath.errors.CheckpointError` instead of dropping them. Nothing is written on an error, and
every file is written atomically (a temporary file renamed into place).

Entry points: :func:`convert` (Adapter -> :class:`Converted`), :func:`to_adapter` (tensors of a format ->
Adapter), :func:`read_any` / :func:`detect_format` (files -> Adapter / format name) and
:func:`convert_path` (what ``peftmath convert ADAPTER --to FORMAT -o OUT`` calls).

Layout: one module per format, both directions (:mod:`.peft`, :mod:`.kohya`, :mod:`.mlx`,
:mod:`.candle`), :mod:`.detect` (which format a path holds), :mod:`._common` (what they share); this
module dispatches by format name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import CheckpointError, ConfigError, UnsupportedError
from ..io.safetensors import SafeTensorsFile
# the constants and helpers of the format modules stay importable from here, as before the split
from ._common import (FORMATS, META_KEY, PEFT_PREFIX, ConversionWarning, Converted, _fmt, _host,  # noqa: F401
                      _no_options, _read_json)
from .candle import (CANDLE_DEFAULT_PREFIX, CANDLE_DUMMY_EMBEDDING, CANDLE_TYPED_PREFIXES,  # noqa: F401
                     _from_candle, _to_candle, candle_prefix_for)
from .detect import _locate, detect_format
from .kohya import (KOHYA_LORA_KEYS, KOHYA_UNSUPPORTED, LOHA_KEYS, LOKR_KEYS, _from_kohya, _to_kohya,  # noqa: F401
                    kohya_name)
from .gguf import GGUF_ARCHITECTURES, _to_gguf, model_config_from  # noqa: F401
from .mlx import _from_mlx, _to_mlx
from .peft import _peft_from_tensors, _to_peft

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


# ==================================================================================================
# PEFT -> X
# ==================================================================================================
def convert(adapter: Adapter, to: str, **options: Any) -> Converted:
    """``adapter`` in format ``to`` (``"peft"``, ``"kohya"``, ``"mlx"``, ``"candle-lora"``, ``"gguf"``).

    Options by target:

    * kohya: ``prefix="lycoris"`` (keys are ``<prefix>_<module with dots as underscores>``; use
      ``"lora_unet"`` / ``"lora_te"`` / ``"lora_te1"`` for Stable Diffusion's UNet / text encoders).
    * mlx: ``num_layers=-1`` (mlx-lm wraps the last ``num_layers`` blocks; -1 means all of them).
    * candle-lora: ``prefix="lora_llama"``, ``typed=False`` (Llama's three prefixes),
      ``add_dummy_embeddings=False`` (typed only), ``lossy=False`` (True reproduces candle-lora's own
      converter, which drops what it does not understand, with a :class:`ConversionWarning`).
    * gguf (llama.cpp LoRA adapter; needs ``pip install 'peftmath[gguf]'``): ``model_config=`` (the base
      model's config.json as a dict, or its path / folder), required: the tensor names, the q / k row
      order and the block count depend on the architecture (:mod:`peftmath.formats.gguf`).
    """
    to = _fmt(to)
    if to == "peft":
        _no_options(options, "peft")
        return _to_peft(adapter)
    if to == "kohya":
        return _to_kohya(adapter, **options)
    if to == "mlx":
        return _to_mlx(adapter, **options)
    if to == "gguf":
        return _to_gguf(adapter, **options)
    return _to_candle(adapter, **options)




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
    if fmt == "gguf":
        raise UnsupportedError(f"{source}: peftmath writes GGUF adapters but does not read them")
    tensors = {k: _host(v) for k, v in tensors.items()}
    if fmt == "peft":
        from ..io.peft import config_from_dict
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




def read_any(path: str | os.PathLike, *, from_: str | None = None, **options: Any) -> Adapter:
    """Read the adapter at ``path`` in any format (detected unless ``from_`` is given) as an Adapter."""
    p = Path(path)
    fmt, weights, cfg = _locate(p)
    if from_ is not None and _fmt(from_) == "gguf":
        raise UnsupportedError(f"{p}: peftmath writes GGUF adapters but does not read them")
    if from_ is not None and _fmt(from_) != fmt:
        want = _fmt(from_)
        if want in ("kohya", "candle-lora") and weights.suffix == ".safetensors":
            fmt = want
        else:
            raise CheckpointError(f"{p}: asked to read it as {want} but its files are {fmt}")
    if fmt == "peft":
        from ..io.peft import load_adapter
        if options:
            _no_options(options, "peft")
        return load_adapter(weights.parent if p.is_dir() else weights)
    f = SafeTensorsFile(weights)
    tensors = {k: f[k] for k in f}
    config = _read_json(cfg) if cfg is not None else None
    return to_adapter(tensors, fmt, config=config, metadata=f.metadata, source=str(weights), **options)





def convert_path(src: str | os.PathLike, dst: str | os.PathLike, to: str, from_: str | None = None,
                 force: bool = False, *, read_options: Mapping[str, Any] | None = None,
                 progress: Any = None, **options: Any) -> Path:
    """Convert the adapter at ``src`` (format detected unless ``from_``) to format ``to`` at ``dst``.

    What ``peftmath convert ADAPTER --to FORMAT -o OUT [--from FORMAT] [--force]`` calls. Everything is
    converted in memory and checked first; only then are files written (atomically), so an error leaves
    ``dst`` untouched. ``read_options`` go to :func:`read_any`, ``options`` to :func:`convert`.
    ``progress(1)``, when given, is called after each of the three steps (read, convert, write).
    """
    step = progress if progress is not None else (lambda n: None)
    adapter = read_any(src, from_=from_, **dict(read_options or {}))
    step(1)
    conv = convert(adapter, to, **options)
    step(1)
    out = conv.save(dst, force=force)
    step(1)
    return out
