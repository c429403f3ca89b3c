"""Attention variants registered by name; configs hold names, never classes.

    @register("yoso", YosoConfig)
    class YosoAttention(CoreAttention): ...

    cfg = config_from_dict({"name": "yoso", "num_hashes": 16})
    core = build(cfg, num_heads=4, head_dim=64, max_seq_len=512)
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from model.attention.base import AttentionConfig, CoreAttention

_REGISTRY: dict[str, type[CoreAttention]] = {}


def register(name: str, config_cls: type[AttentionConfig] = AttentionConfig) -> Callable:
    """Class decorator adding a ``CoreAttention`` subclass to the registry under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"attention {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, CoreAttention)):
            raise TypeError(f"attention {name!r}: {cls!r} must subclass model.attention.base.CoreAttention")
        if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, AttentionConfig)):
            raise TypeError(f"attention {name!r}: config {config_cls!r} must be an AttentionConfig dataclass")
        cls.name = name
        cls.config_cls = config_cls
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Sorted names of every registered variant."""
    return sorted(_REGISTRY)


def get(name: str) -> type[CoreAttention]:
    """The class registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(available())}") from None


def config_from_dict(d: dict[str, Any], where: str = "model.attention") -> AttentionConfig:
    """Build the variant's own config dataclass from ``{name: ..., field: value}``.

    Raises:
        ValueError: unknown name, unknown key (valid keys listed) or a value of the wrong type.
    """
    if isinstance(d, AttentionConfig):
        return d
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"{where} must be a mapping with a 'name' key; available: {', '.join(available())}")
    try:
        cls = get(d["name"])
    except ValueError as e:
        raise ValueError(f"{where}.name: {e}") from None
    ccls = cls.config_cls
    hints = typing.get_type_hints(ccls)
    names = [f.name for f in dataclasses.fields(ccls)]
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ValueError(f"{where}: unknown key {key!r} for attention {d['name']!r}; valid keys: {', '.join(names)}")
        kwargs[key] = _check_value(f"{where}.{key}", value, hints[key])
    cfg = ccls(**kwargs)
    object.__setattr__(cfg, "_where", where)
    cfg.validate(where)
    return cfg


def layer_configs(attention: dict | AttentionConfig, layer_attention: list | None,
                  num_layers: int) -> list[AttentionConfig]:
    """One resolved attention config per layer: ``attention`` (the default), then the overrides
    ``layer_attention`` (one entry or null per layer, or ``{layers: [first, last], name: ...}`` rules).

    Raises:
        ValueError: one line naming the bad key.
    """
    default = config_from_dict(attention, "model.attention")
    per_layer: list[AttentionConfig] = [default] * num_layers
    rules = layer_attention or []
    if rules and all(r is None or "layers" not in r for r in rules):
        if len(rules) != num_layers:
            raise ValueError(f"model.layer_attention has {len(rules)} entries for {num_layers} layers; "
                             "give one per layer (null keeps the default) or use {layers: [a, b], name: ...} rules")
        for i, r in enumerate(rules):
            if r is not None:
                per_layer[i] = config_from_dict(r, f"model.layer_attention[{i}]")
        return per_layer
    for i, r in enumerate(rules):
        r = dict(r)
        span = r.pop("layers", None)
        if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0] <= span[1] < num_layers):
            raise ValueError(f"model.layer_attention[{i}].layers={span!r} must be [first, last] with "
                             f"0 <= first <= last < {num_layers}")
        lc = config_from_dict(r, f"model.layer_attention[{i}]")
        for j in range(span[0], span[1] + 1):
            per_layer[j] = lc
    return per_layer


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}={value!r} is invalid; valid choices: {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be a boolean")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{key}={value!r} must be a number")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} must be a number") from None
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{key}={value!r} must be a string")
    return value


def build(cfg: AttentionConfig | dict, **dims: Any) -> CoreAttention:
    """Instantiate the variant named by ``cfg`` with the layer's dimensions."""
    cfg = config_from_dict(cfg)
    return get(cfg.name)(cfg, **dims)
