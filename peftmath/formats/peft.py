"""PEFT <-> :class:`~peftmath.adapter.Adapter`: the hub format (``adapter_config.json`` +
``adapter_model.safetensors``; keys ``base_model.model.<module>.<parameter suffix>``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..adapter import Adapter
from ._common import Converted, _host

def _to_peft(adapter: Adapter) -> Converted:
    from ..io.peft import LAYER_KINDS_KEY, PEFT_VERSION

    tensors = {k: _host(v) for k, v in adapter.state_dict().items()}
    meta = {"format": "pt"}
    if adapter.layer_kinds:
        meta[LAYER_KINDS_KEY] = json.dumps({k: v.value for k, v in sorted(adapter.layer_kinds.items())})
    data = adapter.config.to_dict()
    if data.get("peft_version") is None:
        data["peft_version"] = PEFT_VERSION
    data["inference_mode"] = True
    return Converted("peft", tensors, data, meta)


def _peft_from_tensors(tensors: dict, config: Any, metadata: Mapping[str, str] | None, source: str) -> Adapter:
    """PEFT's format in memory: the same reading as a PEFT folder (:func:`peftmath.io.peft.adapter_from_tensors`:
    per-module, shared and replaced tensors, and the refusal of tensors nobody owns)."""
    from ..io.peft import adapter_from_tensors

    return adapter_from_tensors(tensors, config, metadata=metadata, source=source)
