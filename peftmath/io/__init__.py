"""Checkpoint I/O: safetensors (strict, memory-mapped, bf16/fp8) and PEFT's adapter folder format."""

from .peft import config_from_dict, load_adapter, read_config, save_adapter
from .safetensors import SafeTensorsFile, load_file, save_file

__all__ = ["load_adapter", "save_adapter", "read_config", "config_from_dict", "SafeTensorsFile", "load_file", "save_file"]
