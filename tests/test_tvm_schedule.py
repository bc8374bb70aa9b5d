"""The CPU schedules of afedge's TVM libraries: which kernels they take, and that those compute the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from afedge.exporters.tvm import compile_module  # noqa: E402
from afedge.parity.metrics import max_rel  # noqa: E402
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


def _lowered(model: torch.nn.Module, *args: torch.Tensor) -> dict[str, str]:
    """{PrimFunc name: TIR} after `compile_module`'s "cpu-fast" passes."""
    import tvm
    from tvm import tirx
    from tvm.relax.frontend.torch import from_exported_program

    from afedge.exporters.tvm import _pipeline
    lowered = _pipeline(tvm.target.Target({"kind": "llvm"}), "cpu-fast")(
        from_exported_program(torch.export.export(model.eval(), args)))
    return {gv.name_hint: f.script() for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)}


def _compiled(model: torch.nn.Module, *args: torch.Tensor) -> np.ndarray:
    """The module compiled by `compile_module`, run with 2 threads (so a race between tiles shows)."""
    from afedge.runtimes.tvm import _set_threads, prime_thread_env
    prime_thread_env()
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program
    _set_threads(tvm, 2)
    ex, _ = compile_module(from_exported_program(torch.export.export(model.eval(), args)), {"kind": "llvm"})
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
