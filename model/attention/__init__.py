"""Attention variants, registered by name. Importing this package registers every variant."""

import importlib
import pkgutil

from model.attention.base import AttentionConfig, CoreAttention
from model.attention.registry import available, build, config_from_dict, get, layer_configs, register

_NOT_VARIANTS = {"base", "registry", "reference", "megatron_adapter", "compare"}

# Auto-import every variant module in this folder, so adding a variant is adding one file.
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in _NOT_VARIANTS:
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["AttentionConfig", "CoreAttention", "available", "build", "config_from_dict", "get", "layer_configs",
           "register"]
