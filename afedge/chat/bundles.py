"""Open a bundle's runtimes for chat and eval: any artifact by name or runtime, or `torch` (the reference)."""
from __future__ import annotations

from pathlib import Path

from afedge.bundle import Bundle, load_bundle
from afedge.chat.engine import Conversation
from afedge.chat.statefile import bundle_fingerprint
from afedge.session import RuntimeUnavailable, Session

TORCH = "torch"


def open_runtime(bundle: Bundle, name: str) -> Session:
    """`torch` -> the PyTorch reference rebuilt from the bundle; otherwise the artifact named (or of that runtime)."""
    from afedge.pipeline import open_session, reference_program
    if name == TORCH:
        from afedge.runtimes.torch import TorchSession
        return TorchSession(reference_program(bundle), bundle.manifest["target"]["profile"]["threads"])
    return open_session(bundle, bundle.artifact(name))


def runnable(bundle: Bundle) -> tuple[list[str], dict[str, str]]:
    """Artifact names built for this machine's architecture, and why each other one cannot run here."""
    from afedge.target import host_arch
    ok, skipped = [], {}
    for art in bundle.artifacts:
        if art.arch in ("any", host_arch()):
            ok.append(art.name)
        else:
            skipped[art.name] = f"{art.name} is built for {art.arch}; this machine is {host_arch()}"
    return ok, skipped


def open_conversation(path: Path, runtime: str | None = None, max_new: int = 64) -> tuple[Conversation, str]:
    """A fresh conversation over `runtime` (default: the bundle's first artifact that runs here)."""
    from afedge.tokenizer import load_tokenizer
    bundle = load_bundle(Path(path))
    if runtime is None:
        ok, skipped = runnable(bundle)
        if not ok:
            raise RuntimeUnavailable(f"{path}: no artifact runs here ({'; '.join(skipped.values())}); "
                                     f"use --runtime torch for the reference")
        runtime = ok[0]
    session = open_runtime(bundle, runtime)
    tok = load_tokenizer(bundle.file(bundle.manifest["tokenizer"]))
    return Conversation(session, tok, bundle_fingerprint(bundle.manifest, bundle.info.spec), max_new), runtime
