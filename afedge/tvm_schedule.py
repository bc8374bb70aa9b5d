"""TIR schedules for the CPU kernels of afedge's TVM libraries: matmuls (`nn.Linear` after FuseTransposeMatmul) and
elementwise kernels.

    C[.., i, j] = sum_k A[.., i, k] * W[j, k]      # W: (N, K) row-major, as the checkpoint stores it

Both operands are read along k, so k is split into `lanes`-wide vectors and rfactored: each (i, j) output keeps a
vector accumulator in registers over the k loop, reduced once at the end. Outputs are tiled (up to 4 rows x 3
columns for prefill blocks, 1 x 8 for a decode GEMV: 12 or 8 accumulators, fewer than the 16 / 32 vector registers
of AVX2 / NEON) and the column tiles run in parallel. Weight rows stream contiguously, which is what a
memory-bound decode step needs. Static shapes only, K a multiple of the lane count; anything else (batched
matmuls, dynamic shapes) is left to the other rules. A decode GEMV whose weight's dequantization was fused into it
(afedge/tvm_dequant.py) has it inlined into the weight read, so it streams the int8 / int4 bytes themselves.
Injective epilogues (bias, activation, residual) are computed per output tile when each reads the matmul's output
at its own index (`_pointwise`).

`NNMatmul` takes C = A @ B where B is stored (K, N), the layout the export leaves for a Linear applied to a
transposed activation (Mamba's x_proj and dt_proj): columns in vectors, a 4 x 16 accumulator tile in registers.
Before it, those two small matmuls were scalar loops and took ~60% of the 130M Mamba's prefill.

`Elementwise` vectorizes the fused loop of an injective kernel (decays, gates, the scan's per-token multiply-add),
which LLVM leaves scalar otherwise. It does not parallelize: measured on a 4-layer slice of the 130M Mamba, prefill
1,031 tok/s vectorized against 934-1,026 with the loop also split over 2 threads (from 4K or 32K or 128K elements
up), and 647 before.

`RowReduction` takes a sum over each row's last axis followed by injective blocks (RMS norm): one sum per row in
vector partial sums, rows in parallel.
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.tirx.analysis import undefined_vars
from tvm.target import Target

# Output tile: rows x columns (prefill), columns (one row: decode). Decode 8 columns: 24 stacked int8 768 x 3072
# GEMVs 4.18 -> 2.09 ms (13.6 -> 27.1 GB/s of weights; 2: 15.4, 12: 25.9, 16 spills: 9.7), fp32 6.2 -> 5.1 ms.
ROWS, COLS, GEMV_COLS = 4, 3, 8


def lanes(target: Target) -> int:
    """fp32 lanes per vector: NEON holds 4; on x86 8 (AVX2; on SSE LLVM splits them, measured as fast as 4)."""
    triple = str(target.attrs.get("mtriple", ""))
    return 4 if triple.startswith(("aarch64", "arm")) else 8


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def _tile(n: int, most: int) -> int:
    """The largest divisor of n up to `most` (no tail loops)."""
    return next(t for t in range(most, 0, -1) if n % t == 0)


def _indexed_by(region, names: list) -> bool:
    """Whether a buffer region is indexed exactly by these block vars, after leading zero indices."""
    mins = [r.min for r in region]
    lead, tail = mins[:len(mins) - len(names)], mins[len(mins) - len(names):]
    return (all(isinstance(x, tirx.IntImm) and int(x) == 0 for x in lead)
            and all(isinstance(x, tirx.Var) and x.same_as(v) for x, v in zip(tail, names, strict=True)))


def _same_index(a, b) -> bool:
    """The same block var, or the same constant."""
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return int(a) == int(b)
    return isinstance(a, tirx.Var) and a.same_as(b)


def _pointwise(sch: s_tir.Schedule, infos: list) -> bool:
    """Whether every epilogue reads what the matmul (or an earlier epilogue) wrote, and only at the index it
    writes. Computed per output tile under the parallel loop, an epilogue reading other columns (a split of the
    output into halves) would read outputs another tile has not written yet, and one reading only inputs would be
    computed whole by every thread into one shared buffer (mega's step did: a race)."""
    produced = [sch.get(infos[0].block_rv).writes[0].source]
    for info in infos[1:]:
        block = sch.get(info.block_rv)
        if len(block.writes) != 1:
            return False
        at = block.writes[0].region
        chained = [r for r in block.reads if any(r.source.same_as(b) for b in produced)]
        if not chained:  # an independent block (an input's sigmoid) would run whole in every tile, racing
            return False
        for read in chained:
            if not (len(read.region) == len(at)
                    and all(_same_index(r.min, w.min) and int(r.extent) == int(w.extent) == 1
                            for r, w in zip(read.region, at))):
                return False
        produced.append(block.writes[0].source)
    return True


def _fuse_epilogues(sch: s_tir.Schedule, epilogues: list, loop) -> bool:
    """Compute each injective epilogue (bias, activation, residual) per output tile, under `loop`, vectorized."""
    try:
        for b in epilogues:
            sch.reverse_compute_at(b.block_rv, loop)
            sch.vectorize(sch.get_loops(b.block_rv)[-1])
    except ScheduleError:
        return False
    return True


def _inline_prologue(sch: s_tir.Schedule, infos: list) -> list | None:
    """Inline the injective blocks before a kernel's first reduction that compute its weight from integers (a
    dequantization fused by afedge.tvm_dequant, or the nibbles of QuantLinear's one-row int4 reduction) into it.
    Blocks computing its activation (producers FuseOps fused into a reduction: an MLP's gelu) stay ahead of it and
    run once, not once per output column. The block infos from the reduction on, or None if a weight block cannot
    be inlined."""
    lead = next((n for n, b in enumerate(infos) if not b.is_injective()), 0)
    weight_side: list = []  # buffers computed from the integers
    try:
        for b in infos[:lead]:
            block = sch.get(b.block_rv)
            if any(str(r.source.dtype).startswith(("int", "uint")) or any(r.source.same_as(w) for w in weight_side)
                   for r in block.reads):
                weight_side += [w.source for w in block.writes]
                sch.compute_inline(b.block_rv)
    except ScheduleError:
        return None
    if not lead:
        return infos
    infos = normalize_prim_func(sch)
    return infos[next(n for n, b in enumerate(infos) if not b.is_injective()):]


def _weight_reads(reads: list, j, k, weight_nk: bool) -> bool:
    """Whether the weight side of a matmul is one (N, K) / (K, N) buffer, or (a dequantized weight) buffers
    indexed by the column and k only: integers, scales."""
    if len(reads) == 1:
        return _indexed_by(reads[0].region, [j, k] if weight_nk else [k, j])
    return weight_nk and all(v.same_as(j) or v.same_as(k) for r in reads for x in r.region
                             for v in undefined_vars(x.min))


def _matmul(rule: CPUScheduleRule, func: tirx.PrimFunc, target: Target, weight_nk: bool):
    """(schedule, block infos, row vars, loops, extents) for a static-shape matmul C[i, j] = sum_k A[i, k] W,
    W indexed [j, k] (`weight_nk`) or [k, j] (or dequantized from buffers indexed by j and k, `_inline_prologue`),
    followed by pointwise injective epilogues; None for anything else."""
    if not isinstance(func, tirx.PrimFunc) or not rule.is_target_available(target):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    infos = _inline_prologue(sch, infos) if infos else None
    if not infos or infos[0].dom_kind() not in ("SR", "SSR") or not infos[0].is_reduction():
        return None
    if not all(b.is_injective() for b in infos[1:]) or not _pointwise(sch, infos):
        return None
    block = sch.get(infos[0].block_rv)
    *rows, j, k = [iv.var for iv in block.iter_vars]
    if len(block.reads) < 2 or not (_indexed_by(block.reads[0].region, [*rows, k])
                                     and _weight_reads(block.reads[1:], j, k, weight_nk)):
        return None
    loops = sch.get_loops(infos[0].block_rv)
    extents = [_extent(sch, loop) for loop in loops]
    return None if None in extents else (sch, infos, rows, loops, extents)


class NTMatmul(CPUScheduleRule):
    """C[i, j] = sum_k A[i, k] W[j, k] (dom kinds SSR, or SR for one row) plus injective epilogues."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _matmul(self, func, target, weight_nk=True)
        if found is None:
            return None
        sch, infos, rows, loops, extents = found
        main = infos[0].block_rv
        width = lanes(target)
        if extents[-1] % width:
            return None
        _, kv = sch.split(loops[-1], [None, width])
        rf = sch.rfactor(kv, factor_axis=0)  # rf block: acc[kv, i, j] over ko; `main` now sums acc over kv
        loops = sch.get_loops(rf)
        lj, ko, kv = loops[-3:]
        one_row = math.prod(extents[:len(rows)]) == 1  # a decode GEMV, with or without its unit row
        cols = _tile(extents[-2], GEMV_COLS if one_row else COLS)
        jo, jt = sch.split(lj, [None, cols])
        if rows:
            io, it = sch.split(loops[-4], [None, _tile(extents[-3], ROWS)])
            sch.reorder(jo, io, ko, it, jt, kv)
            sch.unroll(it)
        else:
            sch.reorder(jo, ko, jt, kv)
        tile = io if rows else jo
        sch.reverse_compute_at(main, tile)
        if not _fuse_epilogues(sch, infos[1:], tile):
            return None
        sch.set_scope(rf, 0, "local")
        sch.vectorize(kv)
        sch.unroll(jt)
        sch.parallel(jo)
        init = sch.decompose_reduction(rf, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


class NNMatmul(CPUScheduleRule):
    """C[i, j] = sum_k A[i, k] B[k, j] (SSR, or SR for one row) with B's columns contiguous (a weight the export
    transposed): columns in vectors, a rows x (2 vectors) accumulator tile cached locally over the k loop."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _matmul(self, func, target, weight_nk=False)
        if found is None:
            return None
        sch, infos, rows, loops, extents = found
        main = infos[0].block_rv
        width = 2 * lanes(target)
        if extents[-2] % width:
            return None
        jo, jv = sch.split(loops[-2], [None, width])
        if rows:
            io, it = sch.split(loops[-3], [None, _tile(extents[-3], ROWS)])
            sch.reorder(jo, io, loops[-1], it, jv)
            sch.unroll(it)
        else:
            sch.reorder(jo, loops[-1], jv)
        acc = sch.cache_write(main, 0, "local")
        tile = io if rows else jo
        sch.reverse_compute_at(acc, tile)
        sch.vectorize(sch.get_loops(acc)[-1])
        if not _fuse_epilogues(sch, infos[1:], tile):
            return None
        sch.vectorize(jv)
        sch.parallel(jo)
        init = sch.decompose_reduction(main, loops[-1])
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


class Elementwise(CPUScheduleRule):
    """An injective kernel with static shapes (its producers inlined): one fused loop, `lanes`-wide vectors."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        try:
            for b in infos[:-1]:
                sch.compute_inline(b.block_rv)
        except ScheduleError:
            return None
        loops = sch.get_loops(infos[-1].block_rv)
        extents = [_extent(sch, loop) for loop in loops]
        width = lanes(target)
        if not loops or None in extents or math.prod(extents) % width:
            return None
        _, vec = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, width])
        sch.vectorize(vec)
        return sch


class RowReduction(CPUScheduleRule):
    """y[r, :] = f(x[r, :], sum_k g(x[r, k])): one reduction over the last axis per row (RMS norm's mean of squares)
    followed by injective blocks over the row. dlight's CPU Reduction parallelizes a one-row kernel over its outputs
    and computes the whole sum once per output element (the decode step's norms: 768x the work at d 768, 0.15 ms
    each, 18% of the 130M Mamba's step). Here each row's sum is computed once, in `lanes`-wide partial sums, then
    the row's outputs in vectors; rows in parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        infos = _inline_prologue(sch, infos) if infos else None
        if (not infos or len(infos) < 2 or not infos[0].is_reduction() or infos[0].dom_kind().count("R") != 1
                or not infos[0].dom_kind().endswith("SR") or not all(b.is_injective() for b in infos[1:])):
            return None
        red, out = infos[0].block_rv, infos[-1].block_rv
        width = lanes(target)
        try:
            for b in infos[1:-1]:
                sch.compute_inline(b.block_rv)
            loops = sch.get_loops(out)
            extents = [_extent(sch, loop) for loop in [*sch.get_loops(red), loops[-1]]]
            if None in extents:
                return None
            one_row = math.prod(extents[:-2]) == 1  # a decode step: the output may have dropped the unit rows
            if not one_row:
                if len(loops) != len(extents) - 1:
                    return None
                row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                sch.compute_at(red, row)
            if extents[-2] % width == 0:
                _, kv = sch.split(sch.get_loops(red)[-1], [None, width])
                rf = sch.rfactor(kv, factor_axis=0)
                sch.vectorize(sch.get_loops(rf)[-1])
                init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
                sch.vectorize(sch.get_loops(init)[-1])
            if extents[-1] % width == 0:
                sch.vectorize(sch.split(loops[-1], [None, width])[1])
            if not one_row:
                sch.parallel(row)
        except ScheduleError:
            return None
        return sch
