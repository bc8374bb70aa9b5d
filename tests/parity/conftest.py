"""Shared fixtures: one exported bundle per (mixer, exporter, target, quant), and the JSON report."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from afedge import LM, LMConfig, to_recurrent
from afedge.pipeline import export_bundle
from afedge.target import load_target

RESULTS: dict[str, dict] = {}


def tiny_program(mixer: str, target):
    return to_recurrent(LM(LMConfig(d_model=32, n_layers=2, mixer=mixer)), chunk_size=8, prefill_len=16)


@pytest.fixture(scope="session")
def bundle_for(tmp_path_factory):
    cache = {}

    def get(flow):
        if flow not in cache:
            target = load_target(flow.target)
            out = tmp_path_factory.mktemp("bundles") / flow.id
            cache[flow] = export_bundle(tiny_program(flow.mixer, target), target, out, [flow.exporter],
                                        flow.quant, verify=False, progress=lambda m: None)[0]
        return cache[flow]
    return get


def pytest_sessionfinish(session, exitstatus):
    if RESULTS:
        path = Path(os.environ.get("AFEDGE_PARITY_REPORT", "out/parity-report.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(old | RESULTS, indent=2))
