"""BERT-LSH (Li & Yip 2024): softmax attention whose q.k logits are kept only for pairs that collide
under random-hyperplane LSH.

Hashing (per head, same for q and k vectors): L tables ("num_hashes"), each a band of ``bands``
sign bits r . x > 0 (an exact 0 gives bit 0) combined with random coefficients C in [0, T):
``code_l(x) = (sum_beta bit_beta * C_l,beta) mod T`` (T = ``table_size``).

``semantics: code`` (default, the authors' released code):
    a pair (i, j) collides if code_l(q_i) = code_l(k_j) for ANY table l;
    U = triu(collide * (q k^T)) (diagonal included), S = U + U^T - diag(U), so S[j, i] = q_i . k_j for
    i < j (the lower triangle is a copy, not q_j . k_i); non-colliding logits are 0, NOT -inf, so every
    key keeps weight exp(0)/Z; then softmax(S / sqrt(d) + padding mask), dropout, P v. Dense O(n^2).
``semantics: paper`` (the paper's prose): a pair collides if it shares a bucket in EVERY table; only
    colliding pairs are attended (others -inf), no symmetric fill; a query with no colliding real key
    outputs the zero vector.

Gradients reach q and k only through colliding (upper-triangle, for ``code``) pairs; v gets a dense
gradient; hashing is not differentiated. Vectorized over batch, heads and tables (no Python loops).
Randomness: hyperplanes and coefficients per head from generators keyed by (seed, layer, global head,
step), shared by every sequence of the batch (the released code redraws per (batch, head) and call).

Implementations (``impl``, see model/kernels/): ``torch`` row-blocks the computation with a recomputing
backward (O(block * n) memory, model/kernels/lsh_torch.py), ``triton`` is a flash-style kernel that
builds the collision-masked logits from the codes on the fly (model/kernels/lsh_triton.py),
``reference`` is the dense code below; ``auto`` picks triton on CUDA, torch elsewhere. All hash the
same way, so they agree up to floating-point rounding (dropout masks differ between them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from model.attention.base import AttentionConfig, CoreAttention, check_qkv, sample_per_head
from model.attention.registry import register
from model.kernels.dispatch import Impl, load, resolve_impl

_MIB = 1 << 20


@dataclass
class BertLshConfig(AttentionConfig):
    """BERT-LSH fields (``model.attention: {name: bert_lsh, bands: 2, table_size: 256, num_hashes: 1}``)."""

    name: str = "bert_lsh"
    bands: int = 2
    """Sign bits per hash table (AND within a band)."""
    table_size: int = 256
    """Buckets per table T: codes are sum(bit * coefficient) mod T."""
    num_hashes: int = 1
    """Hash tables L (OR across tables for ``code``, AND for ``paper``)."""
    semantics: Literal["code", "paper"] = "code"
    """``code``: the released code (zero logits, symmetric fill); ``paper``: sparse AND-collisions."""
    impl: Impl = "auto"
    """``auto`` (Triton on CUDA, else torch), ``triton`` (flash-style kernel; CUDA, or CPU under
    TRITON_INTERPRET=1), ``torch`` (row-blocked, O(block * n) memory), ``reference`` (dense n x n, debugging)."""
    max_memory_mb: float = 256.0
    """Cap on the transient workspace of the ``torch`` path (sets its row block), in MiB."""

    def validate(self, where: str = "model.attention") -> None:
        for key in ("bands", "table_size", "num_hashes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key}={getattr(self, key)} must be a positive integer")
        if self.max_memory_mb <= 0:
            raise ValueError(f"{where}.max_memory_mb={self.max_memory_mb} must be > 0")


def sample_lsh_params(cfg: BertLshConfig, num_heads: int, head_dim: int,
                      generator: torch.Generator | Sequence[torch.Generator] | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hyperplanes R [h, L, bands, d] ~ N(0, 1) and coefficients C int64 [h, L, bands] in [0, T)."""
    shape = (cfg.num_hashes, cfg.bands)
    if generator is None or isinstance(generator, torch.Generator):
        r = sample_per_head("normal", num_heads, (*shape, head_dim), generator, device)
        c = sample_per_head("randint", num_heads, shape, generator, device, high=cfg.table_size)
        return r, c
    gens = list(generator)
    r = torch.stack([sample_per_head("normal", 1, (*shape, head_dim), g, device)[0] for g in gens])
    c = torch.stack([sample_per_head("randint", 1, shape, g, device, high=cfg.table_size)[0] for g in gens])
    return r, c


def lsh_codes(x: torch.Tensor, hyperplanes: torch.Tensor, coefficients: torch.Tensor,
              table_size: int) -> torch.Tensor:
    """Bucket codes of x [b, h, n, d] -> int64 [b, h, L, n].

    hyperplanes: [h, L, bands, d] or [b, h, L, bands, d]; coefficients: [h, L, bands] or [b, h, L, bands].
    """
    b, h = x.shape[:2]
    r = hyperplanes.expand(b, *hyperplanes.shape[-4:]).to(x.dtype)
    c = coefficients.expand(b, *coefficients.shape[-3:])
    bits = torch.einsum("bhnd,bhlkd->bhlnk", x, r) > 0  # [b, h, L, n, bands]
    return (bits.to(torch.int64) * c[:, :, :, None, :]).sum(-1) % table_size


def collisions(codes_q: torch.Tensor, codes_k: torch.Tensor, semantics: str) -> torch.Tensor:
    """bool [b, h, n, n]: any (code) or all (paper) tables agree on the pair (q_i, k_j)."""
    eq = codes_q[..., :, None] == codes_k[..., None, :]  # [b, h, L, n, n]
    return eq.any(dim=2) if semantics == "code" else eq.all(dim=2)


def bert_lsh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, cfg: BertLshConfig,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       hyperplanes: torch.Tensor | None = None, coefficients: torch.Tensor | None = None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """BERT-LSH attention.

    Args:
        q, k, v: [b, h, n, d] (after the Q/K/V linear layers, before 1/sqrt(d)).
        key_padding_mask: bool [b, n], True = real token (None = all real).
        cfg: the BERT-LSH fields.
        generator: one generator for all heads, one per head, or None (default RNG).
        hyperplanes, coefficients: injected hash parameters (see ``lsh_codes``); override ``generator``.
        dropout_p: dropout on the attention probabilities.

    Returns:
        [b, h, n, d].
    """
    check_qkv("bert_lsh", q, k, v, key_padding_mask)
    b, h, n, d = q.shape
    if hyperplanes is None or coefficients is None:
        hyperplanes, coefficients = sample_lsh_params(cfg, h, d, generator, q.device)
    impl = resolve_impl(cfg.impl, q.device, cfg.where(), "bert_lsh", d)
    if impl != "reference":
        with torch.no_grad():
            cq = lsh_codes(q.detach(), hyperplanes, coefficients, cfg.table_size)
            ck = lsh_codes(k.detach(), hyperplanes, coefficients, cfg.table_size)
        if impl == "torch":
            from model.kernels.lsh_torch import bert_lsh_blocked

            return bert_lsh_blocked(q, k, v, cq, ck, key_padding_mask, cfg.semantics, dropout_p,
                                    int(cfg.max_memory_mb * _MIB))
        return load("lsh_triton").bert_lsh_triton(q, k, v, cq, ck, key_padding_mask, cfg.semantics, dropout_p)
    with torch.no_grad():
        coll = collisions(lsh_codes(q.detach(), hyperplanes, coefficients, cfg.table_size),
                          lsh_codes(k.detach(), hyperplanes, coefficients, cfg.table_size), cfg.semantics)
    scores = q @ k.transpose(-1, -2)  # [b, h, n, n]
    zero = scores.new_zeros(())
    ct = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 at least
    real = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [b, 1, 1, n]
    if cfg.semantics == "code":
        upper = torch.triu(torch.where(coll, scores, zero))
        sym = upper + upper.transpose(-1, -2) - torch.diag_embed(torch.diagonal(upper, dim1=-2, dim2=-1))
        logits = sym.to(ct) / math.sqrt(d)
        if real is not None:  # a fully padded sequence sees every key (its outputs are never used)
            real = real | ~key_padding_mask.any(-1)[:, None, None, None]
            logits = logits.masked_fill(~real, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
    else:
        allowed = coll if real is None else coll & real
        row_ok = allowed.any(-1, keepdim=True)  # [b, h, n, 1]
        logits = (scores.to(ct) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits.masked_fill(~row_ok, 0.0), dim=-1) * row_ok
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return probs.to(v.dtype) @ v


@register("bert_lsh", BertLshConfig)
class BertLshAttention(CoreAttention):
    """BERT-LSH core attention (vectorized; code-faithful by default)."""

    is_stochastic = True
    cfg: BertLshConfig

    def forward(self, q, k, v, key_padding_mask):
        return bert_lsh_attention(q, k, v, key_padding_mask, self.cfg, self.generators(q.device),
                                  dropout_p=self.dropout if self.training else 0.0)
