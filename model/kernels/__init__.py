"""Fast paths of the hashed attentions (YOSO, BERT-LSH) behind one switch, ``impl`` in their configs.

    impl: auto       CUDA tensors -> Triton kernels (when triton imports), anything else -> torch
    impl: triton     the Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1, for tests)
    impl: torch      vectorized PyTorch paths chunked so the workspace stays under max_memory_mb
    impl: reference  the original dense vectorized PyTorch code of model/attention/ (debugging)

Modules (the Triton ones are imported lazily, on first use, never by ``import model.attention``):

    dispatch.py      resolve ``impl`` for a device; load the Triton modules (interpreter-aware)
    lsh_torch.py     BERT-LSH, row-blocked with recomputation in the backward: O(block * n) memory
    yoso_torch.py    YOSO cumulation with per-hash scatter + embedding_bag gather, and the surrogate
                     dQ/dK backward over bucket-sorted tiles (cost ~ colliding pairs, not n^2)
    triton_common.py @triton.jit helpers shared by the kernels (acos, LSH codes)
    yoso_triton.py   YOSO: fused hash + table build (atomics), fused hash + gather; dense tiled
                     backward (and YOSO-E forward) with on-the-fly collision weights
    lsh_triton.py    BERT-LSH: flash-style forward/backward computing the collision-masked logits
                     from the hash codes on the fly (online softmax, O(n) memory), both semantics
"""

from model.kernels.dispatch import IMPLS, Impl, interpreter_enabled, resolve_impl, triton_available

__all__ = ["IMPLS", "Impl", "interpreter_enabled", "resolve_impl", "triton_available"]
