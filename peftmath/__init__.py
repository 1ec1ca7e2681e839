"""peftmath: the math of parameter-efficient fine-tuning, defined once against the array API.

>>> import peftmath as pm
>>> pm.LoraConfig(r=4, lora_alpha=8).scaling_for("q_proj")
2.0
"""

from . import backends, errors, layers
from .adapter import Adapter
from .combine import combine
from .formats import convert
from .create import create_adapter
from .multi import AdapterSet, mixed_batch_forward
from .errors import PeftMathError
from .io import load_adapter, read_config, save_adapter
from .layers import Layer, LayerKind
from .methods.lora import LoraConfig

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterSet",
    "combine",
    "convert",
    "create_adapter",
    "mixed_batch_forward",
    "Layer",
    "LayerKind",
    "LoraConfig",
    "PeftMathError",
    "backends",
    "errors",
    "layers",
    "load_adapter",
    "read_config",
    "save_adapter",
]
