"""The attention contract, for every registered variant (and the main options of each).

A small block = fixed Q/K/V projection (or the variant's own projection for ``linear_qkv`` variants)
+ the registered core attention, on [b, s, D] inputs with right padding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from model.attention import available, base, build, get

D, H, HD, N, PAD, MAXLEN = 16, 2, 8, 10, 4, 24

SMALL = {"linformer": {"k": 8}}  # defaults that do not fit MAXLEN
EXTRA = [
    ("linformer", {"k": 8, "sharing": "none"}),
    ("linformer", {"k": 8, "sharing": "key-value"}),
    ("linformer", {"k": 8, "sharing": "layerwise"}),
    ("yoso", {"num_hashes": 8, "hash_bits": 4, "expectation": True}),
    ("yoso", {"num_hashes": 8, "hash_bits": 4, "hash": "hadamard", "conv_window": 3}),
    ("yoso", {"num_hashes": 8, "hash_bits": 4, "backward": "exact"}),
    ("bert_lsh", {"semantics": "paper", "bands": 1, "num_hashes": 2, "table_size": 8}),
    ("bert_lsh", {"bands": 3, "num_hashes": 2, "table_size": 16}),
]
CASES = [(name, SMALL.get(name, {})) for name in available()] + EXTRA
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items()) or 'default'}" for n, c in CASES]


class Block(nn.Module):
    def __init__(self, name: str, cfg: dict) -> None:
        super().__init__()
        cls = get(name)
        self.core = build({"name": name, **cfg}, num_heads=H, head_dim=HD, max_seq_len=MAXLEN,
                          dropout=0.0, layer_number=3)
        if cls.replaces == "linear_qkv":
            self.proj = cls.projection_cls(D, H, self.core.cfg)
        else:
            self.proj = nn.Linear(D, 3 * D)

    def qkv(self, x):
        if isinstance(self.proj, nn.Linear):
            b, n, _ = x.shape
            return (t.view(b, n, H, HD).transpose(1, 2) for t in self.proj(x).chunk(3, dim=-1))
        return self.proj(x)

    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        return self.core(q, k, v, mask)


def _inputs(n: int = N, real: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, D, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, real:] = False
    return x, mask


def _block(name, cfg):
    torch.manual_seed(0)
    return Block(name, cfg).eval()


def test_every_variant_is_covered():
    assert {n for n, _ in CASES} == set(available())
    assert {"softmax", "linformer", "yoso", "bert_lsh", "shared_qkv"} <= set(available())


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_shape_and_finite(name, cfg):
    x, mask = _inputs()
    out = _block(name, cfg)(x, mask)
    assert out.shape == (2, H, N, HD)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_padding_invariance(name, cfg):
    """Outputs at real tokens are unchanged when (arbitrary-valued) padding is appended."""
    block = _block(name, cfg)
    x, mask = _inputs()
    out = block(x, mask)
    junk = torch.randn(2, PAD, D, generator=torch.Generator().manual_seed(7)) * 3
    x2 = torch.cat([x, junk], dim=1)
    mask2 = torch.cat([mask, torch.zeros(2, PAD, dtype=torch.bool)], dim=1)
    out2 = block(x2, mask2)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out2[:, :, :N][real], out[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_no_mask_equals_an_all_true_mask(name, cfg):
    """The adapter passes None for a batch without padding (it skips the masking work): same outputs."""
    block = _block(name, cfg)
    x, _ = _inputs()
    with_mask = block(x, torch.ones(2, N, dtype=torch.bool))
    torch.testing.assert_close(block(x, None), with_mask, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_finite_gradients_into_every_parameter(name, cfg):
    block = _block(name, cfg).train()
    x, mask = _inputs()
    x.requires_grad_(True)
    out = block(x, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights * mask[:, None, :, None]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"
    for pname, p in block.core.named_parameters():
        assert p.grad.abs().sum() > 0, f"zero gradient in {pname}"


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_same_seed_same_output(name, cfg):
    x, mask = _inputs()
    a, b = _block(name, cfg), _block(name, cfg)
    base.set_step(5)
    out_a, out_a2, out_b = a(x, mask), a(x, mask), b(x, mask)
    assert torch.equal(out_a, out_a2) and torch.equal(out_a, out_b)
    base.set_step(6)
    out_next = a(x, mask)
    sampled = a.core.is_stochastic and not a.core.cfg.__dict__.get("expectation", False)
    assert torch.equal(out_next, out_a) != sampled, "the step must (only) change sampled variants"
    base.set_seed(1)
    base.set_step(5)
    assert torch.equal(a(x, mask), out_a) != sampled, "the seed must (only) change sampled variants"


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_checkpoint_recompute_matches_first_forward(name, cfg):
    """Activation recompute (without restoring the global RNG) reproduces the first forward exactly."""
    block = _block(name, cfg).train()
    x, mask = _inputs()
    seen = []
    block.core.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    x1 = x.clone().requires_grad_(True)
    with set_checkpoint_early_stop(False):  # recompute the whole block, so the hook sees it
        out = checkpoint(block, x1, mask, use_reentrant=False, preserve_rng_state=False)
        torch.manual_seed(1234)  # the global RNG moves between forward and recompute
        torch.randn(100)
        (out * mask[:, None, :, None]).sum().backward()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    x2 = x.clone().requires_grad_(True)
    (block(x2, mask) * mask[:, None, :, None]).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for n, p in block.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)


def test_global_head_index_keys_randomness():
    """Tensor-parallel layouts agree: a module holding heads [2, 3] (head_offset=2) draws what the
    full module draws for its heads 2 and 3."""
    full = build({"name": "yoso", "num_hashes": 4, "hash_bits": 3}, num_heads=4, head_dim=HD, max_seq_len=MAXLEN)
    half = build({"name": "yoso", "num_hashes": 4, "hash_bits": 3}, num_heads=2, head_dim=HD, max_seq_len=MAXLEN,
                 head_offset=2)
    q, k, v = (torch.randn(2, 4, N, HD) for _ in range(3))
    torch.testing.assert_close(half(q[:, 2:], k[:, 2:], v[:, 2:], None), full(q, k, v, None)[:, 2:])
    lsh_full = build({"name": "bert_lsh"}, num_heads=4, head_dim=HD, max_seq_len=MAXLEN)
    lsh_half = build({"name": "bert_lsh"}, num_heads=2, head_dim=HD, max_seq_len=MAXLEN, head_offset=2)
    torch.testing.assert_close(lsh_half(q[:, 2:], k[:, 2:], v[:, 2:], None), lsh_full(q, k, v, None)[:, 2:])
