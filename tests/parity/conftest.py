"""Shared fixtures: one exported bundle per (mixer, exporter, target, quant), and the JSON report.

Exporting dominates the matrix (tracing and lowering are single-threaded Python), so on first use every flow the
session selected is submitted to a pool of 2 spawned worker processes; each test then waits for its own bundle.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import pytest

from afedge import LM, LMConfig, to_recurrent
from afedge.bundle import Bundle, load_bundle
from afedge.pipeline import export_bundle
from afedge.target import load_target

RESULTS: dict[str, dict] = {}
WORKERS = 2


def tiny_program(mixer: str):
    return to_recurrent(LM(LMConfig(d_model=32, n_layers=2, mixer=mixer)), chunk_size=8, prefill_len=16)


def export_flow(mixer: str, exporter: str, target: str, quant: str, out: str, threads: int) -> str:
    """Worker body: export one flow's bundle (unverified: the test itself is the parity check)."""
    import torch
    torch.set_num_threads(threads)  # some inits depend on the intra-op thread count; build as the parent would
    export_bundle(tiny_program(mixer), load_target(target), Path(out), [exporter], quant, verify=False,
                  progress=lambda m: None)
    return out


@pytest.fixture(scope="session")
def bundle_for(request, tmp_path_factory):
    """flow -> its verified Bundle (the worker's export is re-read through `load_bundle`, hashes checked)."""
    import torch
    root = tmp_path_factory.mktemp("bundles")
    futures: dict = {}
    pool: ProcessPoolExecutor | None = None

    def submit(flow) -> None:
        nonlocal pool
        if pool is None:
            pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
        futures[flow] = pool.submit(export_flow, flow.mixer, flow.exporter, flow.target, flow.quant,
                                    str(root / flow.id), torch.get_num_threads())

    def get(flow) -> Bundle:
        if not futures:
            for item in request.session.items:
                f = getattr(getattr(item, "callspec", None), "params", {}).get("flow")
                if f is not None and f not in futures and item.get_closest_marker("skip") is None:
                    submit(f)
        if flow not in futures:
            submit(flow)
        result = futures[flow]
        if isinstance(result, Future):
            futures[flow] = load_bundle(Path(result.result()))  # re-raises the worker's ExportError
        return futures[flow]

    yield get
    if pool is not None:
        pool.shutdown(cancel_futures=True)


def pytest_sessionfinish(session, exitstatus):
    if RESULTS:
        path = Path(os.environ.get("AFEDGE_PARITY_REPORT", "out/parity-report.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(old | RESULTS, indent=2))
