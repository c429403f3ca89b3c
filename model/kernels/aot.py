"""Ahead-of-time compilation of every Triton kernel for real GPU targets (no GPU needed).

``compile_all(capability)`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
for each kernel with representative specializations (head dim 64, the dtypes training uses) and
returns, per kernel, whether the PTX uses tensor-core instructions (``mma.sync`` / ``wgmma``), the
size of the cubin (ptxas ships with the triton wheel) and the shared memory it needs (which must fit
the target: ``SHARED_MEMORY_LIMIT``). A kernel that only works in the interpreter
fails here. Must run with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction`` s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.kernels.dispatch import interpreter_enabled, load


@dataclass
class KernelSpec:
    """One specialization of one kernel: argument types (``*fp32``, ``i32``, ``fp32``, ...) and constexprs."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = True
    """The kernel does matrix products, so its PTX must use tensor cores."""
    notes: dict[str, Any] = field(default_factory=dict)


def kernel_specs(head_dim: int = 64, dtype: str = "fp16") -> list[KernelSpec]:
    """Every kernel of yoso_triton.py and lsh_triton.py, with the tiles, warps and stages used on GPUs
    for this head dim (YOSO in fp32, as it runs; BERT-LSH in ``dtype``)."""
    y, lsh = load("yoso_triton"), load("lsh_triton")
    d = head_dim
    bd = max(16, 1 << (d - 1).bit_length())
    f32 = "*fp32"
    specs: list[KernelSpec] = []
    yc = y.gpu_config(d)
    ylaunch = {"num_warps": yc["num_warps"], "num_stages": yc["num_stages"]}
    table = dict(D=d, BLOCK_D=bd, BLOCK_N=yc["table"], TAU=9, TAU_P=16, PREC="tf32x3")
    ints = {"n": "i32", "H": "i32", "h0": "i32", "hn": "i32", "m": "i32"}
    specs.append(KernelSpec("yoso_build", y._build_kernel,
                            {"x_ptr": f32, "r_ptr": f32, "v_ptr": f32, "mask_ptr": f32, "codes_ptr": "*i32",
                             "table_ptr": f32, **ints}, dict(table, HASH=True), **ylaunch))
    specs.append(KernelSpec("yoso_gather", y._gather_kernel,
                            {"x_ptr": f32, "r_ptr": f32, "table_ptr": f32, "mask_ptr": f32, "codes_ptr": "*i32",
                             "out_ptr": f32, **ints, "scale": "fp32"}, dict(table, HASH=True, ACCUM=False),
                            **ylaunch))
    dense = dict(TAU=9, D=d, BLOCK_D=bd, BLOCK_M=yc["m"], BLOCK_N=yc["n"], PREC="tf32x3")
    specs.append(KernelSpec("yoso_e_fwd", y._dense_fwd_kernel,
                            {"q_ptr": f32, "k_ptr": f32, "v_ptr": f32, "mask_ptr": f32, "out_ptr": f32,
                             "n": "i32", "H": "i32"}, dense, **ylaunch))
    bwd_sig = {"q_ptr": f32, "k_ptr": f32, "v_ptr": f32, "dy_ptr": f32, "mask_ptr": f32, "cq_ptr": "*i32",
               "ck_ptr": "*i32"}
    for mode, flags in (("sampled", dict(EXPECTATION=False, EXACT=False)),
                        ("expectation_exact", dict(EXPECTATION=True, EXACT=True))):
        specs.append(KernelSpec(f"yoso_dkdv_{mode}", y._dkdv_kernel,
                                {**bwd_sig, "dk_ptr": f32, "dv_ptr": f32, "n": "i32", "H": "i32", "m": "i32"},
                                dict(dense, **flags), **ylaunch))
        specs.append(KernelSpec(f"yoso_dq_{mode}", y._dq_kernel,
                                {**bwd_sig, "dq_ptr": f32, "n": "i32", "H": "i32", "m": "i32"},
                                dict(dense, **flags), **ylaunch))
    t = f"*{dtype}"
    lc = lsh.gpu_config(d)
    llaunch = {"num_warps": lc["num_warps"], "num_stages": lc["num_stages"]}
    common = {"q_ptr": t, "k_ptr": t, "v_ptr": t}
    codes = {"cq_ptr": "*i32", "ck_ptr": "*i32", "kok_ptr": f32}
    scalars = {"n": "i32", "H": "i32", "L": "i32", "scale": "fp32", "seed": "i32", "p_drop": "fp32"}
    for semantics, code in (("code", True), ("paper", False)):
        meta = dict(CODE=code, DROPOUT=True, D=d, BLOCK_D=bd, BLOCK_M=lc["m"], BLOCK_N=lc["n"],
                    DOT_F32=dtype == "fp32", PREC="tf32x3")
        specs.append(KernelSpec(f"lsh_fwd_{semantics}", lsh._fwd_kernel,
                                {**common, **codes, "out_ptr": t, "lse_ptr": f32, **scalars}, meta, **llaunch))
        grads = {"lse_ptr": f32, "delta_ptr": f32, "dq_ptr": f32, "dk_ptr": f32}
        specs.append(KernelSpec(f"lsh_bwd_rows_{semantics}", lsh._bwd_rows_kernel,
                                {**common, "do_ptr": t, **codes, **grads, **scalars}, meta, **llaunch))
        specs.append(KernelSpec(f"lsh_bwd_cols_{semantics}", lsh._bwd_cols_kernel,
                                {**common, "do_ptr": t, **codes, **grads, "dv_ptr": f32, **scalars}, meta,
                                **llaunch))
    return specs


SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
"""Largest shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB."""


def compile_spec(spec: KernelSpec, capability: int) -> dict[str, Any]:
    """Compile one spec for ``cuda:capability`` -> {ptx, cubin size, tensor-core flags}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(spec.signature)
    for key in spec.constexprs:
        sig[key] = "constexpr"
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs))
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = kernel.asm["ptx"]
    return {"kernel": spec.name, "capability": capability, "mma_sync": "mma.sync" in ptx,
            "wgmma": "wgmma" in ptx, "cubin_bytes": len(kernel.asm.get("cubin", b"")), "uses_dot": spec.uses_dot,
            "shared_bytes": int(kernel.metadata.shared), "block_m": spec.constexprs.get("BLOCK_M")}


def compile_all(capability: int, head_dims: tuple[int, ...] = (64,), dtype: str = "fp16") -> list[dict[str, Any]]:
    """Compile every kernel for one target and each head dim (see ``compile_spec``)."""
    if interpreter_enabled():
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the kernels must be JITFunctions)")
    return [dict(compile_spec(s, capability), head_dim=d) for d in head_dims for s in kernel_specs(d, dtype)]
