"""The bench orchestrator: one fresh worker process per runtime, then the roofline, the ratios and the budgets."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from afedge.bench.budgets import check
from afedge.bench.roofline import artifact_roofline, measure_bandwidth, roofline
from afedge.bundle import Bundle, load_bundle
from afedge.target import host_arch, load_target, load_target_file

Progress = Callable[[str], None]


@dataclass
class Settings:
    contexts: list[int] = field(default_factory=lambda: [128, 1024, 8192, 65536])
    reference_contexts: list[int] | None = None  # for torch eager and the baseline (None: `contexts`)
    prompt_len: int = 2048
    steps: int = 64                  # timed decode steps per context
    repeats: int = 3                 # chunked-prefill repeats (median)
    tbt_tokens: int | None = None    # tokens fed one by one for the token-by-token figure (None: prompt_len)
    threads: int | None = None       # None: the target profile's
    runtimes: list[str] | None = None  # artifact or runtime names (None: every artifact)
    torch: bool = True               # PyTorch eager reference (step and parallel)
    baseline: bool = True            # KV-cache transformer
    hf: bool = True                  # transformers' generate, for bundles imported from Hugging Face
    max_kv_gib: float = 2.0          # baseline contexts whose KV cache exceeds this are skipped
    budgets: Path | None = None      # a target profile TOML to take `[budgets]` from (None: the bundle's target)
    on_target: bool = False          # this machine is a device of the bundle's target
    bandwidth_mib: int = 512
    device: str | None = None        # run the artifacts on this device (emu:CPU, adb:SERIAL): afedge.device
    reach_with: str | None = None    # artifact or runtime whose prefill reaches the decode contexts for every row


def _machine() -> dict:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "arch": host_arch(),
            "python": platform.python_version(), "nice": os.nice(0)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _reference_model(bundle: Bundle):
    """The bundle's LM without its weights (meta device): enough to count the bytes a step reads."""
    import torch

    from afedge.model import LM, LMConfig
    with torch.device("meta"):
        return LM(LMConfig.from_dict(bundle.manifest["model"]["config"]))


def _artifact_bytes(bundle: Bundle, files: dict[str, str]) -> int:
    return sum(bundle.manifest["files"][f]["bytes"] for f in sorted(set(files.values())))


def _worker(spec: dict, timeout: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="afedge-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "afedge.bench.worker", str(spec_path), str(out_path)],
                                  timeout=timeout, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
        if not out_path.is_file():
            return {"status": "error", "reason": f"worker exited with status {proc.returncode} and no result "
                                                 f"(killed? out of memory?)"}
        row = json.loads(out_path.read_text())
        row["wall_s"] = round(time.perf_counter() - t, 2)
        return row


EMULATED = ("emulated: host wall clock around each call into QEMU user mode (frame round trip included); relative "
            "figures only, never device latency")


def _device(name: str | None):
    from afedge.device.devices import RpcDevice, parse_device
    device = parse_device(name) if name else None
    if isinstance(device, RpcDevice):
        raise ValueError(f"{name}: bench runs on emu: and adb: devices; time TVM RPC devices with TVM's own tools")
    return device


def _jobs(bundle: Bundle, s: Settings) -> list[tuple[dict, dict]]:
    """(row header, worker spec or {} when nothing runs) in report order: artifacts, torch, baseline, hf."""
    threads = s.threads or bundle.manifest["target"]["profile"]["threads"]
    common = {"bundle": str(bundle.path.absolute()), "threads": threads, "contexts": sorted(s.contexts),
              "prompt_len": s.prompt_len, "steps": s.steps, "repeats": s.repeats,
              "tbt_tokens": s.tbt_tokens or s.prompt_len, "max_kv_bytes": int(s.max_kv_gib * 2**30)}
    arts = bundle.artifacts
    if s.runtimes:
        wanted = set(s.runtimes)
        arts = [a for a in arts if a.name in wanted or a.runtime in wanted]
        if unknown := wanted - {a.name for a in arts} - {a.runtime for a in arts} - {"torch", "baseline", "hf"}:
            raise ValueError(f"--runtime {', '.join(sorted(unknown))}: not in {bundle.path} (it holds "
                             f"{', '.join(a.name for a in bundle.artifacts)}; also torch, baseline, hf)")
    ref = common | {"contexts": sorted(s.reference_contexts or s.contexts)}
    jobs = []
    device = _device(s.device)
    arch = device.arch if device else host_arch()
    for a in arts:
        head = {"name": a.name if device is None else f"{a.name}@{device.name}", "runtime": a.runtime,
                "kind": "afedge", "arch": a.arch, "artifact_bytes": _artifact_bytes(bundle, a.files),
                "threads": threads, "on_device": a.arch in ("any", arch) and not getattr(device, "emulated", False)}
        spec = common | {"kind": "artifact", "name": a.name, "artifact": a.name}
        if device is not None:
            from afedge.device.session import unavailable_reason
            head |= {"device": device.name, "emulated": device.emulated} | ({"timing": EMULATED} if device.emulated
                                                                            else {})
            spec["device"] = device.name
            reason = unavailable_reason(a, device)
        else:
            reason = None if a.arch in ("any", arch) else f"built for {a.arch}; this machine is {arch}: not measured"
        jobs.append((head | {"status": "unavailable", "reason": reason}, {}) if reason else (head, spec))
    extra = [("torch", s.torch, "torch-eager", "PyTorch eager (reference): step, and the parallel form"),
             ("baseline", s.baseline, "baseline", "softmax attention + KV cache, PyTorch eager"),
             ("hf", s.hf, "hf", "transformers generate")]
    named = set(s.runtimes or ()) & {e[0] for e in extra}  # naming an extra in --runtime selects only those
    for name, on, kind, what in extra:
        if on and (not named or name in named):
            jobs.append(({"name": name, "runtime": "torch", "kind": kind, "what": what, "threads": threads},
                         ref | {"kind": name, "name": name}))
    return jobs


def _reach(bundle: Bundle, s: Settings, jobs: list[tuple[dict, dict]], path: Path, progress: Progress,
           timeout: float | None) -> dict | None:
    """With `--reach-with`: one worker reaches every decode context (artifacts' and references') with that
    artifact's prefill and saves the states to `path`; returns its row with the "states" path, or None."""
    if not s.reach_with:
        return None
    art = next((a for a in bundle.artifacts if s.reach_with in (a.name, a.runtime)), None)
    if art is None:
        raise ValueError(f"--reach-with {s.reach_with}: not in {bundle.path} (it holds "
                         f"{', '.join(a.name for a in bundle.artifacts)})")
    (head, spec), = _jobs(bundle, replace(s, runtimes=[art.name], torch=False, baseline=False, hf=False))
    if not spec:
        raise ValueError(f"--reach-with {s.reach_with}: {head['reason']}")
    contexts = sorted({n for _, sp in jobs if sp.get("kind") in ("artifact", "torch") for n in sp["contexts"]})
    progress(f"reaching contexts {', '.join(map(str, contexts))} with {art.name}: fresh process")
    row = _worker(spec | {"kind": "reach", "name": f"reach:{art.name}", "contexts": contexts, "states": str(path)},
                  timeout)
    if row.get("status") != "ok":
        raise RuntimeError(f"--reach-with {art.name}: {row.get('reason')}")
    return row | {"artifact": art.name, "states": str(path)}


def _derive(rows: list[dict], roof: dict) -> None:
    """Per row: decode tok/s at the smallest context, the roofline ratio and the speed-ups over PyTorch eager."""
    def tok_s(row):
        ok = [d for d in row.get("decode") or [] if d.get("median_ms")]
        return round(1e3 / ok[0]["median_ms"], 2) if ok else None

    for row in rows:
        row["decode_tok_s"] = tok_s(row)
        if row["decode_tok_s"] and row["kind"] != "baseline" and not row.get("emulated"):
            bound = (row.get("roofline") or roof)["decode_upper_bound_tok_s"]  # a quantized artifact's own
            row["roofline_ratio"] = round(row["decode_tok_s"] / bound, 4)
    ref = next((r for r in rows if r["kind"] == "torch-eager" and r.get("status") == "ok"), None)
    if ref is None:
        return
    for row in rows:
        if row is ref or row.get("status") != "ok" or row.get("emulated"):  # host eager vs emulation: no ratio
            continue
        up = {}
        if row.get("decode_tok_s") and ref.get("decode_tok_s"):
            up["decode"] = round(row["decode_tok_s"] / ref["decode_tok_s"], 3)
        mine, theirs = (row.get("prefill") or {}).get("chunked_tok_s"), (ref.get("prefill") or {})
        best = max(theirs.get("chunked_tok_s") or 0, theirs.get("parallel_tok_s") or 0)  # the faster eager form
        if mine and best:
            up["prefill"] = round(mine / best, 3)
        row["speedup_vs_torch"] = up


def _budgets(bundle: Bundle, s: Settings) -> tuple[dict, str]:
    if s.budgets is not None:
        t = load_target_file(Path(s.budgets))
        return t.budgets, str(s.budgets)
    try:
        t = load_target(bundle.target)
        return t.budgets, t.path
    except ValueError:  # a target this afedge no longer ships: the budgets the bundle was exported with
        return bundle.manifest["target"]["profile"].get("budgets", {}), f"{bundle.path}/manifest.json"


def run_bench(path: Path, s: Settings, progress: Progress = print, timeout: float | None = None,
              partial: Path | None = None) -> dict:
    """Measure every selected runtime of the bundle at `path`; returns the JSON-ready result. `partial`: a JSON
    file rewritten after every runtime with the rows so far (a long run that is killed keeps what it measured)."""
    bundle = load_bundle(Path(path))
    if not s.contexts or min(s.contexts) < 1 or s.prompt_len < 1 or s.steps < 1:
        raise ValueError("--contexts must be positive integers, --prompt-len and --steps >= 1")
    load_before = _load()
    progress("memory bandwidth")
    bw = measure_bandwidth(s.bandwidth_mib, threads=s.threads or bundle.manifest["target"]["profile"]["threads"])
    model = _reference_model(bundle)
    roof = roofline(model, bundle.info.spec.nbytes, bw["gb_s"]) | {"bandwidth": bw}
    rows, jobs = [], _jobs(bundle, s)
    bounds = {a.name: artifact_roofline(roof, a.info.get("quant"), model) for a in bundle.artifacts}
    for head, _ in jobs:  # a quantized artifact's own bound (its name, less any "@device")
        if head["kind"] == "afedge" and (own := bounds.get(head["name"].split("@")[0])):
            head["roofline"] = own
    with tempfile.TemporaryDirectory(prefix="afedge-reach-") as tmp:
        reached = _reach(bundle, s, jobs, Path(tmp) / "reached.safetensors", progress, timeout)
        for head, spec in jobs:
            if spec:
                progress(f"{head['name']}: fresh process")
                head = head | _worker(spec | ({"reached": reached["states"]} if reached and spec["kind"] in
                                             ("artifact", "torch") else {}), timeout)
            rows.append(head)
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"roofline": roof, "runtimes": rows, "load": _load()}, indent=1))
    _derive(rows, roof)
    budgets, budget_file = _budgets(bundle, s)
    on_device = (bundle.target == "host" or s.on_target) and not getattr(_device(s.device), "emulated", False)
    afedge_rows = [r for r in rows if r["kind"] == "afedge"]
    verdicts = check(afedge_rows, budgets, on_device, bundle.target)
    m = bundle.manifest
    return {
        "bundle": str(bundle.path), "target": bundle.target, "measured_on_target": on_device,
        "model": {"config": m["model"]["config"], "parameters": m["model"]["parameters"],
                  "families": sorted(set(m["model"]["families"])), "source": m["model"]["source"],
                  "prefill_len": bundle.info.prefill_len, "chunk_size": m["program"]["chunk_size"],
                  "state_bytes": bundle.info.spec.nbytes},
        "machine": _machine() | {"load_before": load_before, "load_after": _load(),
                                 "time": time.strftime("%Y-%m-%d %H:%M:%S %z")},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "roofline": roof, "runtimes": rows, "reached_with": reached and {k: reached[k] for k in ("artifact",
                                                                                               "reached")},
        "budgets": {"file": budget_file, "table": budgets, "verdicts": [v.to_json() for v in verdicts]},
    }
