"""PEFT <-> :class:`~peftmath.adapter.Adapter`: the hub format (``adapter_config.json`` +
``adapter_model.safetensors``; keys ``base_model.model.<module>.<parameter suffix>``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..adapter import Adapter
from ._common import Converted, PEFT_PREFIX, _host

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
    from ..io.peft import split_key
    from ..methods import get_method

    method = get_method(config.peft_type)
    params: dict[str, dict[str, Any]] = {}
    other = {}
    for k, a in tensors.items():
        parts = split_key(k, tuple(method.PARAMETER_SUFFIXES))
        if parts is None:
            other[k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k] = a
        else:
            params.setdefault(parts[0], {})[parts[1]] = a
    from ..io.peft import LAYER_KINDS_KEY

    kinds = json.loads((metadata or {}).get(LAYER_KINDS_KEY, "{}"))
    return Adapter(config, params, other=other, layer_kinds=kinds)
