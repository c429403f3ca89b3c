"""The attention contract every variant follows.

Notation: b = batch, h = heads (of this tensor-parallel rank), s = sequence, d = head dim.

A variant is a ``CoreAttention`` subclass registered by name (see ``registry.py``) with a config
dataclass subclassing ``AttentionConfig``. It sees batch-first ``q, k, v: [b, h, s, d]`` and a
boolean ``key_padding_mask: [b, s]`` that is True at REAL tokens, and returns ``[b, h, s, d]``.
Megatron's sequence-first layout and its inverted mask are converted once, in
``megatron_adapter.py``, never inside a variant.

Randomness of stochastic variants (yoso, bert_lsh) is keyed by (seed, layer, global head, step):

    from model.attention import base
    base.set_seed(cfg.train.seed)      # once, before the first forward
    base.set_step(step)                # by the trainer, before every optimizer step's forwards

Every forward of the same step (micro batches, activation recompute, every tensor-parallel layout,
every data-parallel rank) then draws the same hyperplanes for a given (layer, global head). The
global head index is ``head_offset + local head`` with ``head_offset = tp_rank * heads_per_partition``
(set by the megatron adapter). Explicit ``torch.Generator`` objects are used, never the global RNG
or megatron's CUDA RNG tracker.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Sequence

import torch
from torch import nn

_RNG_STATE = {"seed": 0, "step": 0}


def set_seed(seed: int) -> None:
    """Base seed of every stochastic attention (the trainer passes ``train.seed``)."""
    _RNG_STATE["seed"] = int(seed)


def set_step(step: int) -> None:
    """The optimizer step the next forwards belong to (the trainer calls this every step)."""
    _RNG_STATE["step"] = int(step)


def get_seed() -> int:
    return _RNG_STATE["seed"]


def get_step() -> int:
    return _RNG_STATE["step"]


def rng_key(seed: int, layer: int, head: int, step: int, stream: int = 0) -> int:
    """A 63-bit generator seed that depends on every part of the key (stable across processes)."""
    raw = f"{seed}/{layer}/{head}/{step}/{stream}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def head_generators(device: torch.device | str, layer: int, heads: Sequence[int], stream: int = 0,
                    seed: int | None = None, step: int | None = None) -> list[torch.Generator]:
    """One seeded generator per global head index in ``heads`` (defaults: the module-level seed/step)."""
    seed = get_seed() if seed is None else seed
    step = get_step() if step is None else step
    device = torch.device(device)
    gens = []
    for h in heads:
        g = torch.Generator(device=device)
        g.manual_seed(rng_key(seed, layer, h, step, stream))
        gens.append(g)
    return gens


def sample_per_head(kind: Literal["normal", "randint"], num_heads: int, shape: Sequence[int],
                    generator: torch.Generator | Sequence[torch.Generator] | None,
                    device: torch.device, dtype: torch.dtype = torch.float32,
                    high: int = 2) -> torch.Tensor:
    """Draw ``[num_heads, *shape]``: one draw per head from a list of per-head generators, or one
    draw for all heads from a single generator (or the default generator when None)."""
    def draw(g: torch.Generator | None, full: Sequence[int]) -> torch.Tensor:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator on {g.device} cannot sample for tensors on {device}")
        if kind == "normal":
            return torch.randn(*full, generator=g, device=device, dtype=dtype)
        return torch.randint(0, high, tuple(full), generator=g, device=device)

    if generator is None or isinstance(generator, torch.Generator):
        return draw(generator, (num_heads, *shape))
    gens = list(generator)
    if len(gens) != num_heads:
        raise ValueError(f"got {len(gens)} generators for {num_heads} heads; pass one per head")
    return torch.stack([draw(g, shape) for g in gens])


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None) -> None:
    """One-line ValueErrors for inputs that break the contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [batch, heads, seq, head_dim]; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{name}: key_padding_mask must be bool (True = real token), got "
                             f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"{name}: key_padding_mask must be [batch, seq] = "
                             f"{(k.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}")


@dataclass
class AttentionConfig:
    """Fields shared by every variant; each variant subclasses it with its own fields."""

    name: str = "softmax"
    """Registered variant name (``model.attention.registry.available()`` lists them)."""

    def validate(self, where: str = "model.attention") -> None:
        """Raise a one-line ValueError naming ``{where}.<key>`` for a bad value (variants override)."""

    def where(self) -> str:
        """The config path this config came from (``model.attention`` or ``model.layer_attention[i]``)."""
        return getattr(self, "_where", "model.attention")


class CoreAttention(nn.Module):
    """Per-head attention math. Owns no Q/K/V or output projections (megatron's layers do),
    except variants with ``replaces == "linear_qkv"``, whose projection lives beside it."""

    config_cls: ClassVar[type[AttentionConfig]] = AttentionConfig
    """The variant's config dataclass (set by ``@register``)."""
    name: ClassVar[str] = ""
    """The registered name (set by ``@register``)."""
    replaces: ClassVar[Literal["core_attention", "linear_qkv"]] = "core_attention"
    """Which submodule of megatron's SelfAttention spec this variant supplies."""
    is_stochastic: ClassVar[bool] = False
    """True when the output depends on sampled randomness (hashes); keyed by explicit generators."""

    def __init__(self, cfg: AttentionConfig, *, num_heads: int, head_dim: int, max_seq_len: int,
                 dropout: float = 0.0, layer_number: int = 1, head_offset: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.layer_number = layer_number
        self.head_offset = head_offset
        """Global index of this module's first head (tensor-parallel rank * heads per partition)."""
        self.replicated_param_hook: Callable[[torch.Tensor], torch.Tensor] = _identity
        """Applied to parameters shared by all heads before use; the megatron adapter sets it to
        megatron's copy-to-TP-region (identity forward, all-reduce backward) when TP > 1."""

    def generators(self, device: torch.device, stream: int = 0) -> list[torch.Generator]:
        """Per-head generators keyed by (seed, layer, global head, step) for this module's heads."""
        heads = range(self.head_offset, self.head_offset + self.num_heads)
        return head_generators(device, self.layer_number, heads, stream)

    def share_key(self) -> object | None:
        """Hashable key of parameters that may be tied across layers of one model (None = none)."""
        return None

    def tie_to(self, other: CoreAttention) -> None:
        """Use ``other``'s cross-layer-shared parameters (called when ``share_key`` matches)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """q, k, v: [b, h, s, d]; key_padding_mask: bool [b, s], True = real token -> [b, h, s, d]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.cfg, f.name)!r}" for f in dataclasses.fields(self.cfg))
        return f"{fields}, heads={self.num_heads}, head_dim={self.head_dim}"


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
