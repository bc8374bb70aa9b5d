"""The CPU schedules of afedge's TVM libraries: which kernels they take, and that those compute the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from afedge.exporters.tvm import compile_module  # noqa: E402
from afedge.parity.metrics import max_rel  # noqa: E402
from afedge.quant.weights import QuantLinear  # noqa: E402
from afedge.tolerances import tolerance  # noqa: E402

TOL = tolerance("fp32")


class _Linear(torch.nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))  # bias + relu: injective epilogues after the matmul


class _Project(torch.nn.Module):
    """x @ W with W stored (K, N): the layout the export leaves for a Linear on a transposed activation."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.randn(k, n) / k ** 0.5), torch.nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w + self.b)


class _Mixed(torch.nn.Module):
    """A Linear's epilogue that also takes an independent input's sigmoid (mega's gate), fused into one kernel."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(k, n)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lin(x)) * torch.sigmoid(y)


class _Gate(torch.nn.Module):
    def forward(self, a: torch.Tensor, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.abs(a)) * h + u  # a decayed multiply-add: one injective kernel


class _QLinear(torch.nn.Module):
    """A quantized Linear (weights int8 per channel, or int4 in groups) + relu, as the TVM exporter gets it."""

    def __init__(self, k: int, n: int, bits: int, group: int) -> None:
        super().__init__()
        self.lin = QuantLinear(torch.nn.Linear(k, n), bits, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class _QAfterGelu(torch.nn.Module):
    """An int4 projection of an activation (an MLP's down projection): on one row FuseOps fuses the gelu into
    QuantLinear's reduction, ahead of the nibbles."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.lin = QuantLinear(torch.nn.Linear(k, n), 4, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.nn.functional.gelu(x, approximate="tanh"))


class _QResidual(torch.nn.Module):
    """A quantized projection onto a residual stream (out_proj): its epilogue takes the scales and the residual."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.lin = QuantLinear(torch.nn.Linear(k, n, bias=False), 8, 0)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return r + self.lin(x)


class _RMSNorm(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class _Batched(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2))  # (H, M, K) x (H, N, K): a batched matmul, not this rule's


def _legalized(model: torch.nn.Module, *args: torch.Tensor):
    """The module's PrimFuncs as the "cpu-fast" pipeline hands them to dlight (fused, legalized)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as backend
    from tvm.relax.frontend.torch import from_exported_program
    mod = from_exported_program(torch.export.export(model.eval(), args))
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        mod = tvm.transform.Sequential([relax.transform.FuseTransposeMatmul()]
                                       + backend.legalize_passes(target))(mod)
    return mod, target


def _scheduled(mod, target, rule: str = "NTMatmul") -> dict[str, str]:
    """{PrimFunc name: its scheduled TIR} for the functions `rule` takes."""
    from tvm import tirx

    from afedge import tvm_schedule
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            sch = getattr(tvm_schedule, rule)().apply(func, target, False)
            if sch is not None:
                out[gv.name_hint] = sch.mod.script()
    return out


def _imported(model: torch.nn.Module, *args: torch.Tensor):
    """(Relax module, late integer params or None) as the exporter imports it: a model holding QuantLinear keeps
    its integers unbound until after constant folding (`import_quantized`)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from afedge.exporters.tvm import _bind_float_params
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    mod = from_exported_program(torch.export.export(model.eval(), args), keep_params_as_input=quantized)
    if not quantized:
        return mod, None
    func, ints = _bind_float_params(relax, mod, len(args))
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), {"main": ints}


def _lowered(model: torch.nn.Module, *args: torch.Tensor) -> dict[str, str]:
    """{PrimFunc name: TIR} after `compile_module`'s "cpu-fast" passes."""
    import tvm
    from tvm import tirx

    from afedge.exporters.tvm import _pipeline
    mod, late = _imported(model, *args)
    lowered = _pipeline(tvm.target.Target({"kind": "llvm"}), "cpu-fast", late)(mod)
    return {gv.name_hint: f.script() for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)}


def _compiled(model: torch.nn.Module, *args: torch.Tensor) -> np.ndarray:
    """The module compiled by `compile_module`, run with 2 threads (so a race between tiles shows)."""
    from afedge.runtimes.tvm import _set_threads, prime_thread_env
    prime_thread_env()
    import tvm
    from tvm import relax
    _set_threads(tvm, 2)
    mod, late = _imported(model, *args)
    ex, _ = compile_module(mod, {"kind": "llvm"}, late_params=late)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a.numpy()) for a in args))
    return (out[0] if not hasattr(out, "numpy") else out).numpy()


@pytest.mark.parametrize("rows", [1, 64], ids=["decode-gemv", "prefill-block"])
def test_the_shipping_pipeline_vectorizes_and_parallelizes_linear(rows):
    """Through `compile_module`'s "cpu-fast" passes, the fused matmul + bias + relu comes out scheduled."""
    tir = _lowered(_Linear(128, 96), torch.randn(1, rows, 128))
    (name, script), = ((n, s) for n, s in tir.items() if "NT_matmul" in n)
    assert "T.parallel" in script and "T.vectorized" in script, f"{name} left unscheduled"


@pytest.mark.parametrize("rows", [1, 64], ids=["decode-gemv", "prefill-block"])
def test_the_shipping_pipeline_schedules_a_kn_weight_matmul(rows):
    tir = _lowered(_Project(128, 80), torch.randn(1, rows, 128))
    (name, script), = ((n, s) for n, s in tir.items() if "matmul" in n)
    assert "T.parallel" in script and "T.vectorized" in script, f"{name} left unscheduled"
    assert 'scope="local"' in script, f"{name}: no register tile of accumulators"


@pytest.mark.parametrize("shape", [(1, 128, 80), (64, 48, 96), (6, 256, 32)], ids=str)
def test_scheduled_kn_matmul_equals_torch(shape):
    rows, k, n = shape
    torch.manual_seed(0)
    model, x = _Project(k, n).eval(), torch.randn(1, rows, k)
    assert _scheduled(*_legalized(model, x), rule="NNMatmul")
    assert max_rel(_compiled(model, x), model(x).detach().numpy()) <= TOL.max_rel


def test_a_batched_matmul_and_a_ragged_k_are_left_to_the_other_rules():
    mod, target = _legalized(_Batched(), torch.randn(4, 16, 32), torch.randn(4, 8, 32))
    assert _scheduled(mod, target) == {}
    mod, target = _legalized(_Linear(30, 96), torch.randn(1, 8, 30))  # K = 30: not a multiple of the lanes
    assert _scheduled(mod, target) == {}
    mod, target = _legalized(_Project(64, 20), torch.randn(1, 8, 64))  # N = 20: not a multiple of 2 vectors
    assert _scheduled(mod, target, rule="NNMatmul") == {}


@pytest.mark.parametrize("shape", [(1, 128, 96), (64, 128, 90), (6, 256, 7)], ids=str)
def test_scheduled_linear_equals_torch(shape):
    """Tiles that divide M and N (4 x 3, 1 x 4, 2 x 1 with N = 7): the compiled library equals torch in fp32."""
    rows, k, n = shape
    torch.manual_seed(0)
    model, x = _Linear(k, n).eval(), torch.randn(1, rows, k)
    assert _scheduled(*_legalized(model, x))  # the rule took it
    assert max_rel(_compiled(model, x), model(x).detach().numpy()) <= TOL.max_rel


def test_elementwise_kernels_are_vectorized_and_equal_torch():
    args = [torch.randn(1, 16, 96, 16) for _ in range(3)]
    tir = _lowered(_Gate(), *args)
    assert any("T.vectorized" in s for s in tir.values()), f"no vectorized kernel in {sorted(tir)}"
    assert _scheduled(*_legalized(_Gate(), *args), rule="Elementwise")
    assert max_rel(_compiled(_Gate(), *args), _Gate()(*args).numpy()) <= TOL.max_rel


@pytest.mark.parametrize("rows", [1, 64], ids=["decode-gemv", "prefill-block"])
def test_an_epilogue_block_of_inputs_only_is_not_computed_per_tile(rows):
    """Every tile's thread would compute sigmoid(y) whole into one shared buffer: a race (mega's step, 2 threads)."""
    torch.manual_seed(0)
    model, x, y = _Mixed(64, 48).eval(), torch.randn(rows, 64), torch.randn(rows, 48)  # 2-D: no reshape between
    for _ in range(3):
        assert max_rel(_compiled(model, x, y), model(x, y).detach().numpy()) <= TOL.max_rel


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4-g32"])
def test_a_decode_matmul_reads_the_quantized_weight_itself(bits):
    """Decode: the dequantization is fused into the scheduled GEMV, which reads the integers (no fp32 copy of the
    weight is written; int4: QuantLinear's one-row reduction over the packed nibbles); a prefill block keeps one
    dequantizing kernel and reads its fp32 output."""
    torch.manual_seed(0)
    model = _QLinear(128, 96, bits, 32 if bits == 4 else 0)
    stored = '"int8"' if bits == 8 else '"uint8"'
    for rows, fused in ((1, True), (64, False)):
        tir = _lowered(model, torch.randn(1, rows, 128))
        (reader, script), = ((n, s) for n, s in tir.items() if stored in s)  # the one kernel taking the integers
        if fused:  # it is the GEMV: register accumulators, columns in parallel, k in vectors
            assert all(w in script for w in ("_rf_local", "T.parallel", "T.vectorized")), f"{reader} unscheduled"
            assert "// T.int64(2)]" not in script, f"{reader} gathers each packed byte at k // 2"
        else:
            (name, mm), = ((n, s) for n, s in tir.items() if "matmul" in n)
            assert name != reader and "T.parallel" in mm and "T.vectorized" in mm, f"{name} left unscheduled"


def test_an_activation_fused_ahead_of_an_int4_gemv_runs_once_and_the_gemv_is_scheduled():
    """The gelu stays a block of its own ahead of the reduction (inlined, it would run once per output column)."""
    torch.manual_seed(0)
    model, x = _QAfterGelu(256, 96).eval(), torch.randn(1, 1, 256)
    (name, script), = ((n, s) for n, s in _lowered(model, x).items() if '"uint8"' in s)
    assert "gelu" in name and all(w in script for w in ("_rf_local", "T.parallel", "T.vectorized")), name
    assert script.rindex("T.tanh") < script.index("T.parallel"), f"{name}: the gelu runs inside the column loop"
    assert max_rel(_compiled(model, x), model(x).detach().numpy()) <= TOL.max_rel


@pytest.mark.parametrize(("bits", "group", "rows"), [(8, 0, 1), (4, 32, 1), (4, 0, 1), (8, 0, 6)], ids=str)
def test_fused_dequantizing_matmul_equals_torch(bits, group, rows):
    """int8 per channel, int4 in groups of 32 and int4 with one group per row, through the shipping pipeline with
    2 threads: the library equals the QuantLinear's own torch output within the fp32 table."""
    torch.manual_seed(0)
    model, x = _QLinear(256, 96, bits, group).eval(), torch.randn(1, rows, 256)
    assert max_rel(_compiled(model, x), model(x).detach().numpy()) <= TOL.max_rel


@pytest.mark.parametrize("rows", [1, 6])
def test_a_quantized_projection_onto_the_residual_is_fused_and_equals_torch(rows):
    """The matmul's epilogue (scale, residual) adds inputs after (x, w): the fusion still takes it (decode)."""
    torch.manual_seed(0)
    model, x, r = _QResidual(128, 64).eval(), torch.randn(rows, 128), torch.randn(rows, 64)  # 2-D: epilogue fuses
    (script,) = (s for n, s in _lowered(model, x, r).items() if "matmul" in n)
    assert ('"int8"' in script) is (rows == 1)
    assert max_rel(_compiled(model, x, r), model(x, r).detach().numpy()) <= TOL.max_rel


@pytest.mark.parametrize("rows", [1, 64], ids=["decode", "prefill-block"])
def test_a_norm_sums_each_row_once(rows):
    """RowReduction takes RMS norm: one row's sum in vector partial sums (not once per output element, as dlight's
    CPU Reduction did for a single row), rows in parallel."""
    x = torch.randn(1, rows, 128)
    assert _scheduled(*_legalized(_RMSNorm(128), x), rule="RowReduction")
    (name, script), = ((n, s) for n, s in _lowered(_RMSNorm(128), x).items() if "mean" in n)
    assert "_rf" in script and "T.vectorized" in script, f"{name}: no vector partial sums"
    assert ("T.parallel" in script) is (rows > 1), name


@pytest.mark.parametrize("shape", [(1, 128), (64, 128), (5, 30)], ids=str)
def test_scheduled_norm_equals_torch(shape):
    rows, d = shape
    torch.manual_seed(0)
    model, x = _RMSNorm(d).eval(), torch.randn(1, rows, d) * 3
    assert max_rel(_compiled(model, x), model(x).detach().numpy()) <= TOL.max_rel
