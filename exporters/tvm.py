"""TVM (Relax) exporter: both methods of a program compiled into one shared library per architecture.

Flow: `program.export(method)` -> `from_exported_program` (with the negative-index `select.int` guard) -> one
IRModule {"step", "prefill"} -> `tvm.compile` -> `export_library("model-<arch>.so")`. aarch64 libraries are
cross-compiled by LLVM and linked with the profile's `cc`; with `host_twin = true` an x86_64 twin of the same
program is built too, so parity can run on the build machine. Heavy imports are lazy.

Artifacts (arch in brackets):
  llvm aarch64 target -> "tvm-aarch64" [aarch64], model-aarch64.so   (+ "tvm-host" twin with host_twin)
  llvm x86_64 target  -> "tvm-host"    [x86_64],  model-x86_64.so
  cuda target         -> "tvm-cuda"    [x86_64],  model-cuda.so      (+ "tvm-host" twin with host_twin)
A CUDA target on a machine without a usable CUDA toolchain (TVM compiles kernels with NVRTC or nvcc) is an
ExportError for the whole export, host twin included: the exporter never hands back a CPU build alone for the
GPU build the profile asked for (export `--target host` for the CPU library). The CUDA library is built first.

Quantized schemes (int8, int4-g32, int4-g128) swap the planned Linear layers for QuantLinear (integers plus fp32
scales, dequantized in the graph) before export; the integers stay function parameters through constant folding
(`import_quantized`) and are bound right after it, so the library holds them as integers (FIELD-NOTES).

Calling convention of every function: (token(s), *state) -> (logits, *state), in the StateSpec order.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import ClassVar

from afedge.exporting import EXPORTERS, Artifact, Exporter, ExportError, require
from afedge.quant import QuantPlan, QuantPolicy, resolve_plan
from afedge.quant.weights import embedding_bytes, quantized_copy
from afedge.rewrite import METHODS, RecurrentProgram
from afedge.target import Target, host_arch

__all__ = ["TvmExporter", "HOST_TARGET", "PIPELINES", "import_program", "import_quantized", "compile_module",
           "tvm_arch"]

HOST_TARGET: dict = {"kind": "llvm"}    # the host twin: generic x86-64 (-mcpu=native is ignored by TVM 0.27)

# Relax pipelines by name. "cpu-fast" is the default pipeline plus FastMathTransform (a vectorizable polynomial exp,
# relative error <= 4e-6 against 2e-7 for libm's expf; the whole host parity matrix, 65,536-step drift included,
# stays within 1.3e-6 of the reference), FuseTransposeMatmul, and four schedules: afedge's NTMatmul and NNMatmul,
# dlight's CPU Reduction and afedge's Elementwise (afedge/tvm_schedule.py). Measured on this 2-core box, 2
# threads, host target (AVX2 + FMA), against Reduction alone: the demo model's prefill 3,549 -> 22,741 tok/s and
# decode 1,311 -> 2,693 tok/s; the 130M Mamba's prefill 19.7 -> 489.7 and decode 14.6 -> 48.3 tok/s; one
# (64 x 768) x (768 x 3072) matmul 69.7 -> 2.2 ms (generic x86-64: 5.1 ms). dlight's CPU GEMV schedule is left
# out: it vectorizes 128 output lanes over a strided weight gather, slower than NTMatmul and minutes of LLVM time.
PIPELINES = ("cpu-fast", "cpu-default", "gpu-default")


def tvm_arch(target_dict: dict, fallback: str) -> str:
    """The CPU architecture an llvm target dict compiles for; for GPU kinds the host's (`fallback`)."""
    if target_dict.get("kind") != "llvm":
        return fallback
    triple = str(target_dict.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    if triple and not triple.startswith(("x86_64", "amd64")):
        raise ExportError(f"exporter 'tvm': unsupported mtriple '{triple}' (supported: x86_64-*, aarch64-*)")
    return "x86_64"


def cpu_features(target_dict: dict, arch: str) -> list[str]:
    """The x86 CPU flags (as /proc/cpuinfo names them) an llvm target's `mattr` compiles in, e.g. "+avx2" ->
    "avx2": a session refuses the library on a CPU without them. ARM features are not recorded (NEON is baseline
    on aarch64, and /proc/cpuinfo calls it "asimd")."""
    if target_dict.get("kind") != "llvm" or arch != "x86_64":
        return []
    return [m[1:] for m in target_dict.get("mattr", []) if m.startswith("+")]


def _select_int(node, importer):
    """`aten.select.int` with the index normalised to be non-negative.

    TVM 0.27 lowers select to `take(mode="fast")` with the raw index, so `x[..., -1]` reads out of bounds
    (garbage or NaN, silently). Static shapes only, which is all afedge exports."""
    from tvm import relax
    from tvm.tirx import IntImm

    x = importer.env[node.args[0]]
    shape = importer.shape_of(x)
    dim, index = int(node.args[1]), int(node.args[2])
    dim = dim + len(shape) if dim < 0 else dim
    if index < 0:
        size = shape[dim]
        if not isinstance(size, IntImm):
            raise ExportError(f"exporter 'tvm': select with negative index {index} on a dynamic dimension "
                              f"({node.name}); afedge graphs have static shapes")
        index += int(size)
    return importer.block_builder.emit(relax.op.take(x, relax.const(index, "int64"), axis=dim))


def _clamp(which: str):
    """`aten.clamp` / `clamp_min` / `clamp_max` that is safe on integer tensors.

    TVM 0.27 fills a missing bound with +-inf and emits `clip`; on an integer tensor (e.g. the int64
    `(i - j).clamp(min=0)` lag of a Toeplitz index) legalisation then fails with
    `RuntimeError: Cannot convert infinity to BigInt`. Integer clamps become maximum/minimum with only the
    bounds that were given; float clamps keep the importer's own lowering."""

    def convert(node, importer):
        from tvm import relax  # lazy: the map is built at import time, and `import afedge` must stay light
        x = importer.env[node.args[0]]
        dtype = str(x.ty.dtype)
        if not (dtype.startswith("int") or dtype.startswith("uint")):
            return getattr(importer, f"_{which}")(node)
        args = list(node.args[1:])
        if which == "clamp":
            lo = args[0] if args else node.kwargs.get("min")
            hi = args[1] if len(args) > 1 else node.kwargs.get("max")
        elif which == "clamp_min":
            lo, hi = (args[0] if args else node.kwargs.get("min")), None
        else:
            lo, hi = None, (args[0] if args else node.kwargs.get("max"))

        def bound(b):
            if hasattr(b, "op"):  # an fx.Node: a tensor bound
                return importer.env[b]
            return relax.const(int(b), dtype)

        if lo is not None:
            x = importer.block_builder.emit(relax.op.maximum(x, bound(lo)))
        if hi is not None:
            x = importer.block_builder.emit(relax.op.minimum(x, bound(hi)))
        return x

    return convert


# Converters that guard against TVM 0.27 importer bugs; applied to every import.
CUSTOM_CONVERT_MAP = {
    "select.int": _select_int,
    "clamp.default": _clamp("clamp"),
    "clamp_min.default": _clamp("clamp_min"),
    "clamp_max.default": _clamp("clamp_max"),
}


def import_program(program: RecurrentProgram):
    """Both methods as one Relax IRModule {"step", "prefill"}, each (token(s), *state) -> (logits, *state)."""
    return _import(program, late=False)[0]


def import_quantized(program: RecurrentProgram):
    """`import_program` for a program holding quantized weights (afedge.quant QuantLinear): (IRModule, late).

    Every float parameter is bound as a constant at once, as in `import_program`; the integer ones (packed
    weights) stay function parameters, listed in `late` ({function: {param name: tensor}}) for
    `compile_module(..., late_params=late)` to bind after FoldConstant, which would otherwise fold the in-graph
    dequantization back into fp32 constants (FIELD-NOTES: keep_params_as_input + detach_params)."""
    return _import(program, late=True)


def _import(program: RecurrentProgram, late: bool):
    tvm = require("tvm", TvmExporter.extra)
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    n_state, funcs, late_params = len(program.spec.slots), {}, {}
    for method in METHODS:
        ep = program.export(method)
        try:
            mod = from_exported_program(ep, custom_convert_map=CUSTOM_CONVERT_MAP, keep_params_as_input=late)
        except Exception as e:  # the importer raises ValueError/AssertionError/KeyError for unsupported ops
            raise ExportError(f"exporter 'tvm' cannot import the '{method}' graph of "
                              f"{'/'.join(sorted(set(program.model.family_per_layer())))}: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}; "
                              f"try another runtime (onnx, executorch)") from e
        func = mod["main"]
        if late:
            func, late_params[method] = _bind_float_params(relax, mod, 1 + n_state)
        # from_exported_program orders params as the graph signature's user inputs (parameters are bound as
        # constants) and returns the user outputs as one tuple: check the contract rather than trust it.
        names, want = [p.name for p in func.params][:len(func.params) - len(late_params.get(method, {}))], \
            program.input_names(method)
        if len(names) != 1 + n_state:
            raise ExportError(f"exporter 'tvm': '{method}' imported with inputs {names}, expected {want}")
        fields = getattr(func.ret_ty, "fields", None)  # a TupleType: (logits, *state)
        if fields is None or len(fields) != 1 + n_state:
            raise ExportError(f"exporter 'tvm': '{method}' returns {func.ret_ty}, expected a tuple of "
                              f"{1 + n_state} tensors (logits, *state)")
        funcs[method] = func.with_attr("global_symbol", method)
    return tvm.IRModule(funcs), late_params


def _bind_float_params(relax, mod, n_user: int):
    """(main with its float parameters bound as constants, {name: tensor} of the integer ones left unbound)."""
    mod, params = relax.frontend.detach_params(mod)
    func = mod["main"]
    pairs = list(zip(func.params[n_user:], params.get("main", [])))
    bind = {v: relax.const(t) for v, t in pairs if not str(t.dtype).startswith(("int", "uint"))}
    ints = {v.name: t for v, t in pairs if str(t.dtype).startswith(("int", "uint"))}
    return (func.bind_params(bind) if bind else func), ints


def _bind_late(late_params: dict):
    """A module pass binding {function: {param: tensor}} as constants (after FoldConstant: they stay integers)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0)
    def _bind(mod, _ctx):
        for func, params in late_params.items():
            if params and func in [g.name_hint for g in mod.get_global_vars()]:
                mod = relax.transform.BindParams(func, params)(mod)
        return mod

    return _bind


def _pipeline(target, name: str, late_params: dict | None = None):
    """The named Relax pipeline. "cpu-fast": default CPU + FastMathTransform and FuseTransposeMatmul (before
    legalisation) + NTMatmul, NNMatmul, dlight Reduction and Elementwise (after fusion). With `late_params`, they
    are bound right after the legalisation passes (LegalizeOps ... FoldConstant, FuseOps, FuseTIR), so the
    dequantization of packed weights stays in the graph."""
    import tvm
    import tvm.s_tir.dlight as dl
    from tvm import relax

    if name != "cpu-fast" and not late_params:
        return relax.get_default_pipeline(target)
    from afedge.tvm_schedule import Elementwise, NNMatmul, NTMatmul, RowReduction
    if name == "gpu-default":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    fast = name == "cpu-fast"
    late = [_bind_late(late_params)] if late_params else []
    if fast and late_params:  # the decode step's matmuls read the integers themselves (afedge/tvm_dequant.py)
        from afedge.tvm_dequant import fuse_dequant_matmul
        late.append(fuse_dequant_matmul())

    @tvm.transform.module_pass(opt_level=0)
    def _passes(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                ([relax.transform.FastMathTransform(), relax.transform.FuseTransposeMatmul()] if fast else [])
                + backend.library_dispatch_passes(target)
                + backend.legalize_passes(target)
                + late
                + ([dl.ApplyDefaultSchedule(NTMatmul(), NNMatmul(), RowReduction(), dl.cpu.Reduction(),
                                            Elementwise())] if fast else [])
                + backend.dataflow_lower_passes(target)
                + backend.finalize_passes(target))
            return seq(mod)

    return _passes


def compile_module(mod, target_dict: dict, pipeline: str | None = None, late_params: dict | None = None):
    """Compile an IRModule for a TVM target dict; returns (Executable, pipeline name).

    late_params: integer parameters left unbound by `import_quantized`, bound after constant folding."""
    import tvm

    target = tvm.target.Target(target_dict)  # a plain dict reaches target.keys and fails (TypeError)
    kind = target.kind.name
    pipeline = pipeline or ("cpu-fast" if kind == "llvm" else "gpu-default")
    if pipeline not in PIPELINES:
        raise ExportError(f"exporter 'tvm': unknown pipeline '{pipeline}'; known: {', '.join(PIPELINES)}")
    if kind != "llvm" and pipeline.startswith("cpu"):
        raise ExportError(f"exporter 'tvm': pipeline '{pipeline}' is for llvm targets, not '{kind}'")
    passes = _pipeline(target, pipeline, late_params)
    try:
        return tvm.compile(mod, target, relax_pipeline=passes), pipeline
    except Exception as e:
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        if kind == "cuda":  # TVM compiles CUDA kernels with NVRTC (cuda-python) or nvcc, on the build machine
            raise ExportError(f"exporter 'tvm': compiling for {target_dict} failed ({msg}); CUDA kernels need "
                              f"the CUDA toolchain on this machine (NVRTC via cuda-python, or nvcc); install "
                              f"it, or export --target host for the CPU library") from e
        raise ExportError(f"exporter 'tvm': compiling for {target_dict} failed: {msg}") from e


def _write_library(ex, path: Path, cc: str) -> None:
    try:
        if cc:
            ex.export_library(str(path), cc=cc)
        else:
            ex.export_library(str(path))
    except Exception as e:
        raise ExportError(f"exporter 'tvm': linking {path.name} with {cc or 'the host compiler'} failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e


@EXPORTERS.register("tvm")
class TvmExporter(Exporter):
    name = "tvm"
    runtime = "tvm"
    extra = "tvm"
    # Integer schemes as dequantize-in-graph weights: afedge.quant.weights.QuantLinear (int8, or int4 packed two
    # per byte, plus fp32 scales), bound after constant folding so the library really holds the integers.
    quant_schemes: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int4-g32", "int4-g128")
    host_target: ClassVar[dict] = HOST_TARGET

    def export(self, program: RecurrentProgram, target: Target, quant: str | QuantPlan,
               out_dir: Path, policy: QuantPolicy = QuantPolicy()) -> list[Artifact]:
        plan = resolve_plan(quant, program.model, self.quant_schemes, policy, self.realised_as(target))
        self.check_quant(plan.scheme, target)
        from afedge.runtimes.tvm import prime_thread_env
        prime_thread_env()  # before TVM's thread pool starts (compiling runs kernels), so sessions can use >1
        require("tvm", self.extra)
        cfg = target.tvm or {}
        tdict = dict(cfg.get("target") or {})
        if "kind" not in tdict:
            raise ExportError(f"exporter 'tvm' (target {target.name}): {target.path or 'the profile'} has no "
                              f"[tvm] target with a 'kind'")
        kind, arch = tdict["kind"], tvm_arch(tdict, target.arch)
        cc = str(cfg.get("cc", "") or "")  # the cross linker, used only when building for another arch
        cross = kind == "llvm" and arch != host_arch()
        if cross and not cc:
            raise ExportError(f"exporter 'tvm' (target {target.name}): building for {arch} on {host_arch()} "
                              f"needs a cross linker; set [tvm] cc in {target.path or 'the profile'}")
        cc = cc if cross else ""  # a native build links with the host compiler
        if cc and not shutil.which(cc):
            raise ExportError(f"exporter 'tvm' (target {target.name}): the linker '{cc}' is not installed; run "
                              f"`make system-deps` (or `apt-get install gcc-aarch64-linux-gnu`)")

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        mod, late, qinfo = self._import(program, plan)
        import_s = time.perf_counter() - t0

        builds = [(f"tvm-{'cuda' if kind == 'cuda' else ('host' if arch == 'x86_64' else arch)}",
                   arch, tdict, cc, f"model-{'cuda' if kind == 'cuda' else arch}.so")]
        # The twin is for this build machine: only when the primary library cannot run here.
        twin = bool(cfg.get("host_twin", False)) and (kind != "llvm" or cross) and builds[0][0] != "tvm-host"
        if twin:
            builds.append(("tvm-host", host_arch(), dict(self.host_target), "", f"model-{host_arch()}.so"))

        artifacts = []
        for name, a, td, link, fname in builds:
            t1 = time.perf_counter()
            ex, pipeline = compile_module(mod, td, late_params=late)
            _write_library(ex, out_dir / fname, link)
            artifacts.append(Artifact(
                name=name, exporter=self.name, runtime=self.runtime, arch=a,
                files={m: fname for m in METHODS},
                info={"target": td, "device": "cuda" if td["kind"] == "cuda" else "cpu", "pipeline": pipeline,
                      "cpu_features": cpu_features(td, a),
                      "cc": link or "host", "host_twin_of": builds[0][0] if name != builds[0][0] else None,
                      "bytes": (out_dir / fname).stat().st_size,
                      "import_s": round(import_s, 2), "compile_s": round(time.perf_counter() - t1, 2),
                      "quant": qinfo}))
        return artifacts

    @staticmethod
    def _import(program: RecurrentProgram, plan: QuantPlan) -> tuple:
        """(IRModule, late params or None, the manifest's quant record). weight_bytes counts the tensors bound
        into the library: every float parameter plus, when quantized, the packed integers and their scales."""
        fp32 = sum(p.numel() * p.element_size() for p in program.model.parameters())
        if not plan.layers:
            return import_program(program), None, plan.to_json() | {"weight_bytes": fp32, "fp32_weight_bytes": fp32}
        layers = {n: (plan.scheme_of(n).weight_bits, plan.scheme_of(n).group) for n in plan.quantized}
        qprogram = RecurrentProgram(quantized_copy(program.model, layers, plan.embedding), program.chunk_size,
                                    program.prefill_len, program.batch)
        mod, late = import_quantized(qprogram)
        nbytes = sum(p.numel() * p.element_size() for p in qprogram.model.parameters())
        packed = {n: t.numpy().nbytes for params in late.values() for n, t in params.items()}
        return mod, late, plan.to_json() | {"weight_bytes": nbytes, "fp32_weight_bytes": fp32,
                                            "packed_bytes": sum(packed.values()),
                                            "embedding_bytes": embedding_bytes(qprogram.model),
                                            "realised_as": "QuantLinear / QuantEmbedding: int8 / packed int4 + fp32 "
                                                           "scales, dequantized in the graph"}
