"""`afedge export`: rewrite -> every exporter the target names -> bundle -> parity gate -> rename into place."""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

import afedge
from afedge.bundle import Bundle, BundleError, load_bundle, staged, write_manifest
from afedge.checkpoint import (CheckpointError, describe_nonfinite, load_checkpoint, nonfinite_tensors,
                               save_checkpoint)
from afedge.exporting import EXPORTERS, Artifact, ExportError, load_plugins
from afedge.parity.compare import Report
from afedge.parity.noise import Judge
from afedge.parity.workloads import GATE_STEPS, Workload, prompt_decode
from afedge.precision import check_fp16_range
from afedge.quant.gate import quant_summary, tolerance_name
from afedge.quant.policy import QuantPolicy
from afedge.rewrite import RecurrentProgram, to_recurrent
from afedge.session import RUNTIMES, ArtifactSession, RuntimeUnavailable
from afedge.target import Target
from afedge.tokenizer import byte_tokenizer, load_tokenizer

REFERENCE_DIR, TOKENIZER = "reference", "tokenizer.json"
Progress = Callable[[str], None]


@dataclass
class GateResult:
    artifact: str
    status: str            # "pass" | "fail" | "unavailable"
    report: Report | None
    reason: str = ""

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "metrics": self.report.to_json() if self.report else None}


def versions() -> dict[str, str]:
    out = {"afedge": afedge.__version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "executorch", "torchao", "apache-tvm", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def open_session(bundle: Bundle, artifact: Artifact, threads: int | None = None) -> ArtifactSession:
    """Open one artifact of a verified bundle with its runtime (RuntimeUnavailable if it cannot run here)."""
    load_plugins()
    profile = bundle.manifest["target"]["profile"]
    options = profile.get({"onnxruntime": "onnx"}.get(artifact.runtime, artifact.runtime), {})
    files = {m: bundle.file(f) for m, f in artifact.files.items()}
    return RUNTIMES.get(artifact.runtime)(files, bundle.info, threads or profile["threads"], artifact.arch, options,
                                          tuple(artifact.info.get("cpu_features", ())))


def reference_program(bundle: Bundle) -> RecurrentProgram:
    """The PyTorch reference rebuilt from the bundle's own (hash-verified) weights."""
    p = bundle.manifest["program"]
    return to_recurrent(load_checkpoint(bundle.file(REFERENCE_DIR)), p["chunk_size"], p["prefill_len"], p["batch"])


def run_gate(bundle: Bundle, workload: Workload, tol_name: str, progress: Progress = print) -> list[GateResult]:
    """Compare every artifact that can run on this machine with the torch reference, each with its quant
    scheme's tolerance profile (`tol_name` for artifacts that record none)."""
    from afedge.runtimes.torch import TorchSession
    judge = Judge(TorchSession(reference_program(bundle), bundle.manifest["target"]["profile"]["threads"]))
    results = []
    for art in bundle.artifacts:
        progress(f"parity {art.name}")
        try:
            sess = open_session(bundle, art)
        except RuntimeUnavailable as e:
            results.append(GateResult(art.name, "unavailable", None, str(e)))
            continue
        art_tol = tolerance_name(art.info, tol_name)  # the artifact's quant scheme's profile
        rep = judge(sess, workload, art_tol)
        sess.close()
        results.append(GateResult(art.name, "pass" if rep.passed else "fail", rep, rep.failure))
    return results


def export_bundle(program: RecurrentProgram, target: Target, out: Path, exporters: list[str] | None = None,
                  quant: str | None = None, verify: bool = True, steps: int = GATE_STEPS, source: dict | None = None,
                  progress: Progress = print, tokenizer: Path | None = None,
                  allow_nonfinite: bool = False,
                  policy: QuantPolicy = QuantPolicy()) -> tuple[Bundle, list[GateResult]]:
    """Export `program` for `target` into the bundle directory `out` (atomically) and run the parity gate.

    policy: what the quant scheme leaves fp32 or quantizes otherwise (the embedding, the LM head).
    tokenizer: a `tokenizer.json` to carry into the bundle (None: the byte-level tokenizer, vocab 256).
    allow_nonfinite: export weights holding NaN / Inf instead of refusing them."""
    load_plugins()
    quant = quant or target.quant
    names = exporters or list(target.exporters)
    for n in names:
        EXPORTERS.get(n)  # unknown names fail before anything is written
    tok = _tokenizer(tokenizer, program.vocab_size)
    _check_weights(program, target, quant, allow_nonfinite)
    with staged(out, need_bytes=sum(p.numel() * p.element_size() for p in program.model.parameters())) as tmp:
        artifacts: list[Artifact] = []
        for n in names:
            progress(f"export {n}")
            try:
                artifacts.extend(EXPORTERS.get(n)().export(program, target, quant, tmp, policy))
            except ExportError as e:
                raise _with_fallback(e, n, names, program, target, quant, tmp, progress, policy) from e
        save_checkpoint(program.model, tmp / REFERENCE_DIR)
        tok.save(str(tmp / TOKENIZER))
        manifest = _manifest(program, target, quant, artifacts, source or {})
        write_manifest(tmp, manifest)
        results: list[GateResult] = []
        if verify:
            results = run_gate(load_bundle(tmp), prompt_decode(steps=steps), target.tolerance, progress)
        verdict = _verdict(results, verify)
        write_manifest(tmp, manifest | {"parity": {"verdict": verdict, "workload": prompt_decode(steps=steps).id,
                                                   "tolerance": target.tolerance,
                                                   "artifacts": {r.artifact: r.to_json() for r in results}}})
        if verdict == "fail":
            failed = "; ".join(r.reason for r in results if r.status == "fail")
            raise ParityGateError(f"parity gate failed, bundle not written to {out}: {failed} "
                                  f"(use --no-verify to write it anyway)", results)
    return load_bundle(out), results


def _with_fallback(err: ExportError, failed: str, names: list[str], program: RecurrentProgram, target: Target,
                   quant: str, tmp: Path, progress: Progress, policy: QuantPolicy) -> ExportError:
    """`err`, plus the fallback that works: the target's other exporters are tried (into a scratch folder of the
    staged bundle, discarded with it) and the ones that export are named as a `--runtimes` list."""
    ok = []
    for n in (x for x in target.exporters if x != failed and x in EXPORTERS):
        progress(f"export {n} (fallback check)")
        try:
            EXPORTERS.get(n)().export(program, target, quant, tmp / f".fallback-{n}", policy)
            ok.append(n)
        except ExportError:
            pass
    rest = [n for n in names if n in ok] or ok
    hint = (f"--runtimes {','.join(rest)} exports without {failed} (checked)" if rest else
            f"no other exporter of target {target.name} ({', '.join(target.exporters)}) exports it either")
    return ExportError(f"{err}; {hint}")


def _tokenizer(src: Path | None, vocab_size: int):
    """`src` loaded (or the byte tokenizer when the model has none and is byte-level); refuse a tokenizer whose
    ids overflow the embedding, and a missing one where the embedding is not the byte tokenizer's 256 rows."""
    if src is None:
        tok = byte_tokenizer()
        if vocab_size != tok.get_vocab_size(with_added_tokens=True):
            raise BundleError(f"no tokenizer.json came with the model, and its embedding has {vocab_size} rows, "
                              f"not the byte tokenizer's {tok.get_vocab_size()}: put the model's tokenizer.json "
                              f"beside its config.json")
        return tok
    tok = load_tokenizer(Path(src))
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise BundleError(f"{src}: {n} token ids but the model's embedding has only "
                          f"{vocab_size} rows (vocab_size in the model config)")
    return tok


def _check_weights(program: RecurrentProgram, target: Target, quant: str, allow_nonfinite: bool) -> None:
    """Refuse NaN / Inf weights (unless allowed) and, for fp16 schemes, values beyond the fp16 range."""
    if not allow_nonfinite and (bad := nonfinite_tensors(program.model)):
        raise CheckpointError(f"the model's weights hold non-finite values: {describe_nonfinite(bad)}; refused "
                              f"(--allow-nonfinite exports them anyway)")
    if quant == "fp16":
        check_fp16_range(program, f"target {target.name}, quant fp16")


class ParityGateError(BundleError):
    def __init__(self, msg: str, results: list[GateResult]) -> None:
        super().__init__(msg)
        self.results = results


def _verdict(results: list[GateResult], verify: bool) -> str:
    if not verify:
        return "skipped"
    if any(r.status == "fail" for r in results):
        return "fail"
    return "pass" if any(r.status == "pass" for r in results) else "unverified"


def _manifest(program: RecurrentProgram, target: Target, quant: str, artifacts: list[Artifact], source: dict) -> dict:
    spec = program.spec
    return {
        "afedge_version": afedge.__version__,
        "model": {"config": program.model.cfg.to_dict(), "families": program.model.family_per_layer(),
                  "parameters": sum(p.numel() for p in program.model.parameters()), "source": source,
                  "reference": REFERENCE_DIR},
        "program": {"vocab_size": program.vocab_size, "prefill_len": program.prefill_len,
                    "chunk_size": program.chunk_size, "batch": program.batch,
                    "input_names": {m: program.input_names(m) for m in ("step", "prefill")},
                    "output_names": program.output_names()},
        "state": spec.to_json(),
        "state_bytes": spec.nbytes,
        "state_exact": spec.exact,
        "rewrite_report": program.report(),
        "target": {"name": target.name, "profile": {k: v for k, v in target.__dict__.items() if k != "path"}},
        "quant": quant,
        "quantization": quant_summary(artifacts),
        "tokenizer": TOKENIZER,
        "artifacts": [a.to_json() for a in artifacts],
        "versions": versions(),
        "parity": {"verdict": "pending"},
    }
