"""Naive, readable references (fp64-capable) the tests compare every fast path with.

They follow the formulas of ATTENTION_SPEC.md literally (loops where the spec's definition is a
loop) and are far too slow for training. All take batch-first [b, h, s, d] tensors and a boolean
key_padding_mask [b, s] (True = real token) and compute in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Dense softmax attention in the inputs' dtype. q, k, v: [b, h, s, d]; mask True = real."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, s, s]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # [b, h, s, d]


# --------------------------------------------------------------------------------------------
# Linformer
# --------------------------------------------------------------------------------------------


def linformer_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, E: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """head_i = softmax(Q_i (E_i K~_i)^T / sqrt(d)) (F_i V~_i), K~, V~ with padded rows zeroed, per head.

    E, F: [k, N] (shared) or [h, k, N] (per head), N >= s; the first s columns are used.
    """
    b, h, n, d = q.shape
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi].clone(), v[bi, hi].clone()
            if key_padding_mask is not None:
                kk[~key_padding_mask[bi]] = 0
                vv[~key_padding_mask[bi]] = 0
            e = (E[hi] if E.dim() == 3 else E)[:, :n]
            f = (F[hi] if F.dim() == 3 else F)[:, :n]
            scores = q[bi, hi] @ (e @ kk).T / math.sqrt(d)  # [n, k]
            out[bi, hi] = torch.softmax(scores, dim=-1) @ (f @ vv)
    return out


# --------------------------------------------------------------------------------------------
# YOSO
# --------------------------------------------------------------------------------------------


def yoso_e_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None, tau: int, normalize: bool = True) -> torch.Tensor:
    """YOSO-E by a double loop: Y_i = sum_j m_i m_j (1 - acos(q^_i . k^_j)/pi)^tau v_j (cosine clamped to
    [-1, 1]); output rows l2-normalized (zero rows stay zero)."""
    b, h, n, d = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                if key_padding_mask is not None and not key_padding_mask[bi, i]:
                    continue
                qi = q[bi, hi, i] / q[bi, hi, i].norm()
                acc = torch.zeros_like(v[bi, hi, 0])
                for j in range(n):
                    if key_padding_mask is not None and not key_padding_mask[bi, j]:
                        continue
                    kj = k[bi, hi, j] / k[bi, hi, j].norm()
                    cos = min(1.0, max(-1.0, float(qi @ kj)))
                    acc = acc + (1 - math.acos(cos) / math.pi) ** tau * v[bi, hi, j]
                norm = float(acc.norm())
                out[bi, hi, i] = acc / max(norm, 1e-12) if normalize else acc
    return out


def yoso_cumulation_reference(codes_q: torch.Tensor, codes_k: torch.Tensor, v: torch.Tensor,
                              key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Hash-table cumulation with Python dicts: Y^_i = (1/m) sum_h table_h[code_h(q_i)] with
    table_h[c] = sum of the real v_j whose key code is c; padded queries give 0.
    codes_q, codes_k: int [b, h, n, m]."""
    b, h, n, d = v.shape
    m = codes_k.shape[-1]
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            for t in range(m):
                table: dict[int, torch.Tensor] = {}
                for j in range(n):
                    if key_padding_mask is None or key_padding_mask[bi, j]:
                        c = int(codes_k[bi, hi, j, t])
                        table[c] = table.get(c, torch.zeros_like(v[bi, hi, j])) + v[bi, hi, j]
                for i in range(n):
                    if key_padding_mask is None or key_padding_mask[bi, i]:
                        c = int(codes_q[bi, hi, i, t])
                        if c in table:
                            out[bi, hi, i] += table[c] / m
    return out


def yoso_grad_reference(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, tau: int,
                        codes_q: torch.Tensor | None = None, codes_k: torch.Tensor | None = None,
                        exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Y = W V with respect to the normalized q^, k^ and v, pair by pair.

    W_ij = m_i m_j * (collision frequency over the m hashes, from codes) or B(q^_i . k^_j) (codes None).
    dV_j = sum_i W_ij dY_i.  dQ^_i = sum_j w'_ij (dY_i . v_j) k^_j, dK^_j = sum_i w'_ij (dY_i . v_j) q^_i,
    with w' = tau/2 W (surrogate) or, when ``exact``, B'(0.99 x) (on pairs with W > 0 when sampling).
    """
    b, h, n, d = v.shape
    dq, dk, dv = torch.zeros_like(qn), torch.zeros_like(kn), torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                for j in range(n):
                    if key_padding_mask is not None and not (key_padding_mask[bi, i] and key_padding_mask[bi, j]):
                        continue
                    x = min(1.0, max(-1.0, float(qn[bi, hi, i] @ kn[bi, hi, j])))
                    if codes_q is None:
                        w = (1 - math.acos(x) / math.pi) ** tau
                    else:
                        w = float((codes_q[bi, hi, i] == codes_k[bi, hi, j]).double().mean())
                    if exact:
                        xs = 0.99 * x
                        wd = tau * (1 - math.acos(xs) / math.pi) ** (tau - 1) / (math.pi * math.sqrt(1 - xs * xs))
                        if codes_q is not None and w == 0:
                            wd = 0.0
                    else:
                        wd = tau / 2 * w
                    g = float(dy[bi, hi, i] @ v[bi, hi, j])
                    dv[bi, hi, j] += w * dy[bi, hi, i]
                    dq[bi, hi, i] += wd * g * kn[bi, hi, j]
                    dk[bi, hi, j] += wd * g * qn[bi, hi, i]
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# BERT-LSH
# --------------------------------------------------------------------------------------------


def _lsh_code(x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, table_size: int) -> int:
    """One vector's bucket in one table: sum over the band of [sign(r . x) > 0] * C, mod T."""
    total = 0
    for beta in range(planes.shape[0]):
        if torch.sign(planes[beta] @ x) > 0:
            total += int(coeffs[beta])
    return total % table_size


def bert_lsh_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, hyperplanes: torch.Tensor,
                       coefficients: torch.Tensor, table_size: int,
                       semantics: str = "code") -> torch.Tensor:
    """Loop port of the released BERT-LSH attention with injected hash parameters.

    Per (batch, head): hash the stacked 2n vectors [q; k] into L tables (buckets as dicts of sets),
    collect the colliding pairs (OR over tables for ``code``; AND for ``paper``), then for ``code``
    fill the upper triangle i <= j of a zero score matrix with q_i . k_j for colliding (q_i, k_j) and
    copy it to [j, i]; scale by 1/sqrt(d), add the extended padding mask (finfo.min), softmax, P v.
    ``paper`` attends only colliding real keys (zero output for a query without any).

    hyperplanes: [h, L, bands, d] or [b, h, L, bands, d]; coefficients: [h, L, bands] or [b, h, L, bands].
    """
    b, h, n, d = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(h):
            planes = hyperplanes[bi, hi] if hyperplanes.dim() == 5 else hyperplanes[hi]
            coeffs = coefficients[bi, hi] if coefficients.dim() == 4 else coefficients[hi]
            z = torch.cat([q[bi, hi], k[bi, hi]])  # [2n, d]
            per_table: list[set[tuple[int, int]]] = []
            for tl in range(planes.shape[0]):
                buckets: dict[int, set[int]] = {}
                for i in range(2 * n):
                    buckets.setdefault(_lsh_code(z[i], planes[tl], coeffs[tl], table_size), set()).add(i)
                pairs = set()
                for members in buckets.values():
                    if len(members) < 2:
                        continue
                    for i in members:
                        for j in members:
                            if i != j:
                                pairs.add((i, j))
                per_table.append(pairs)
            if semantics == "code":
                collided = set().union(*per_table)
            else:
                collided = set.intersection(*per_table)
            scores = torch.zeros(n, n, dtype=q.dtype)
            allowed = torch.zeros(n, n, dtype=torch.bool)
            for i in range(n):
                for j in range(n):
                    if (i, n + j) in collided:
                        allowed[i, j] = True
            if semantics == "code":
                for i in range(n):
                    for j in range(i, n):
                        if allowed[i, j]:
                            s = q[bi, hi, i] @ k[bi, hi, j]
                            scores[i, j] = s
                            scores[j, i] = s
                logits = scores / math.sqrt(d)
                if key_padding_mask is not None and key_padding_mask[bi].any():
                    logits = logits + (~key_padding_mask[bi]).to(q.dtype)[None, :] * torch.finfo(q.dtype).min
                out[bi, hi] = torch.softmax(logits, dim=-1) @ v[bi, hi]
            else:
                for i in range(n):
                    js = [j for j in range(n) if allowed[i, j]
                          and (key_padding_mask is None or key_padding_mask[bi, j])]
                    if not js:
                        continue
                    logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in js]) / math.sqrt(d)
                    out[bi, hi, i] = torch.softmax(logits, dim=0) @ v[bi, hi, js]
    return out


# --------------------------------------------------------------------------------------------
# Shared-weight attention
# --------------------------------------------------------------------------------------------


def shared_qkv_reference(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None, d_q: torch.Tensor,
                         d_k: torch.Tensor, d_v: torch.Tensor, num_heads: int,
                         key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Standard attention with W_q = diag(d_q) W_s, b_q = b_s * d_q (same for k, v), nn.Linear layout.

    x: [b, s, D] -> [b, h, s, D/h] (per-head outputs, before the output projection).
    """
    b, n, dim = x.shape

    def proj(scale: torch.Tensor) -> torch.Tensor:
        w = scale[:, None] * w_s
        y = x @ w.T + (0 if b_s is None else b_s * scale)
        return y.view(b, n, num_heads, dim // num_heads).transpose(1, 2)

    return softmax_reference(proj(d_q), proj(d_k), proj(d_v), key_padding_mask)
