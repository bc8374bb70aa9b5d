"""Fuse a quantized weight's dequantization into the decode step's matmul (TVM Relax, CPU).

A quantized TVM library holds each planned Linear as integers plus fp32 scales (afedge.quant.weights.QuantLinear).
After legalisation the dequantization is a kernel of its own: it reads the int8 (or packed int4) weight and writes
an fp32 copy, which the matmul then reads again, so a decode step moves 9x the weight bytes of the int8 file. This
pass groups `call_tir(dequant, (q, scale))` with the one `call_tir(matmul, (x, w))` reading it into one PrimFunc
(FuseOpsByPattern + FuseTIR), and `afedge.tvm_schedule.NTMatmul` inlines the dequantization into the weight read:

    y[j] = sum_k x[k] * (float(q[j, k]) * scale[j, k // group])

Only matmuls with one output row (the decode step's GEMVs) are fused: they are bound by weight bytes. A prefill
block reuses each weight over its rows, where dequantizing once per block costs less than once per row tile.
"""
from __future__ import annotations

__all__ = ["fuse_dequant_matmul"]

_EPILOGUE_ARGS = 4  # inputs of a matmul's fused epilogue beyond (x, w) matched: bias, residual, scales


def _callee(ctx, mod, key: str):
    """The PrimFunc an annotated call_tir calls, or None."""
    from tvm import tirx
    gv = ctx.annotated_expr[key].args[0]
    func = mod[gv] if gv in mod.get_global_vars() else None
    return func if isinstance(func, tirx.PrimFunc) else None


def _is_dequant(call, func) -> bool:
    """A call_tir of injective blocks from integer tensors (and fp32 scales) to one fp32 tensor."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    dtypes = [str(a.ty.dtype) for a in call.args[1].fields]
    if not (str(call.ty.dtype) == "float32" and any(d.startswith(("int", "uint")) for d in dtypes)):
        return False
    infos = normalize_prim_func(s_tir.Schedule(func))
    return bool(infos) and all(b.is_injective() for b in infos)


def fuse_dequant_matmul():
    """A module pass (for a legalized, fused module whose packed weights are bound) fusing each decode matmul with
    the dequantization of its weight."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

    dequant = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
    # matmul(x, w), or with the epilogue FuseOps gave it: matmul_add(x, w, bias), ... (x and w come first)
    # (a fresh wildcard per position: one pattern node used twice must match one expression)
    matmuls = [is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard(), dequant]
                                                                        + [wildcard() for _ in range(extra)]))
               for extra in range(_EPILOGUE_ARGS + 1)]

    @tvm.transform.module_pass(opt_level=0, name="afedge.FuseDequantMatmul")
    def _fuse(mod, _ctx):
        def check(ctx) -> bool:
            rows = [int(s) for s in ctx.annotated_expr["matmul"].ty.shape][:-1]
            bound = ctx.value_to_bound_var
            weight = bound[ctx.annotated_expr["dequant"]] if ctx.annotated_expr["dequant"] in bound else None
            func = _callee(ctx, mod, "dequant")
            return (all(r == 1 for r in rows) and weight is not None
                    and len(ctx.var_usages[weight] if weight in ctx.var_usages else []) == 1
                    and func is not None and _is_dequant(ctx.annotated_expr["dequant"], func))

        patterns = [relax.transform.FusionPattern("afedge.dequant_matmul", m, {"matmul": m, "dequant": dequant}, check)
                    for m in matmuls]
        return tvm.transform.Sequential([relax.transform.FuseOpsByPattern(patterns, bind_constants=False),
                                         relax.transform.FuseTIR()])(mod)

    return _fuse
