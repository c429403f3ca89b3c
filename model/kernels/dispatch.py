"""Which implementation runs: ``resolve_impl(cfg.impl, device)``, and lazy loading of Triton modules.

Triton decides at ``@triton.jit`` time (module import) whether a kernel is compiled for the GPU or
run by its CPU interpreter (``TRITON_INTERPRET=1``). The kernel modules are therefore imported only
through ``load`` on first use, and re-imported if the variable changed since (tests set it once,
before any kernel runs; training never changes it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch", "reference"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch", "reference")

_TRITON_MODULES = ("triton_common", "yoso_triton", "lsh_triton")
TRITON_MAX_HEAD_DIM = {"yoso": 128, "bert_lsh": 256}
"""Largest head dim whose tiles fit the shared memory of an A100 / H100 (the AOT test checks them)."""


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is only importable on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, where: str = "model.attention", variant: str | None = None,
                 head_dim: int | None = None) -> str:
    """``auto`` -> ``triton`` on CUDA (when triton is installed and the head dim fits the kernels),
    else ``torch``; explicit choices are checked against the device.

    Raises:
        ValueError: ``triton`` without the package, on a non-CUDA device outside the interpreter, or
            with a head dim the kernels do not support.
    """
    if impl not in IMPLS:
        raise ValueError(f"{where}.impl={impl!r} is invalid; valid choices: {', '.join(IMPLS)}")
    limit = TRITON_MAX_HEAD_DIM.get(variant or "")
    too_wide = limit is not None and head_dim is not None and head_dim > limit
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() and not too_wide else "torch"
    if impl == "triton" and too_wide:
        raise ValueError(f"{where}.impl=triton supports {variant} head dims up to {limit}, got {head_dim}; "
                         "use impl: auto or torch")
    if impl == "triton":
        if not triton_available():
            raise ValueError(f"{where}.impl=triton needs the triton package (pip install triton); "
                             "use impl: auto or torch")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(f"{where}.impl=triton needs CUDA tensors (got {device.type}); set "
                             "TRITON_INTERPRET=1 to run the kernels on CPU for debugging, or use impl: auto")
    return impl


def load(name: str) -> ModuleType:
    """Import ``model.kernels.<name>`` (a Triton module), re-importing it when ``TRITON_INTERPRET``
    changed since its kernels were decorated."""
    if name not in _TRITON_MODULES:
        raise ValueError(f"unknown kernel module {name!r}; known: {', '.join(_TRITON_MODULES)}")
    mod = importlib.import_module(f"model.kernels.{name}")
    if getattr(mod, "INTERPRETED", None) != interpreter_enabled():
        if name != "triton_common":  # helpers first: the kernels call them by reference
            load("triton_common")
        mod = importlib.reload(mod)
    return mod
