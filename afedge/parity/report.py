"""Parity reports: Markdown + JSON + a PNG of logits error against decode step."""
from __future__ import annotations

import json
from pathlib import Path

from afedge.parity.compare import Report


def write_reports(rows: list[tuple[str, Report | None, str]], md_path: Path, title: str) -> list[Path]:
    """rows: (artifact name, report or None if it could not run, reason). Writes FILE.md, FILE.json, FILE.png."""
    md_path = Path(md_path)
    json_path, png_path = md_path.with_suffix(".json"), md_path.with_suffix(".png")
    lines = [f"# {title}", "", "SQNR: over all the workload's logits (gated); worst position: the lowest single "
             "position (reported). max rel: against its bound (the profile's, or for fp32 "
             "the reference's own fp32-vs-fp64 noise floor times FP32_NOISE_FACTOR where that is larger).", "",
             "| artifact | workload | verdict | max rel (bound) | max abs | SQNR dB | "
             "worst-position SQNR dB | cosine | top-1 | greedy | worst state rel |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep, reason in rows:
        if rep is None:
            lines.append(f"| {name} | — | not run here: {reason} | | | | | | | | |")
            continue
        verdict = "pass" if rep.passed else f"**FAIL**: {rep.failure}"
        lines.append(f"| {name} | {rep.workload} | {verdict} | {rep.max_rel:.2e} ({rep.max_rel_bound:.1e}) | "
                     f"{rep.max_abs:.2e} | {rep.sqnr_db:.1f} | {rep.sqnr_worst_db:.1f} | {rep.cosine:.6f} | "
                     f"{rep.top1:.3f} | {rep.greedy:.3f} | {max(rep.state_rel.values(), default=0.0):.2e} |")
    md_path.write_text("\n".join(lines) + "\n")
    json_path.write_text(json.dumps([{"artifact": n, "reason": r, "report": rep.to_json() if rep else None}
                                     for n, rep, r in rows], indent=2))
    _plot(rows, png_path, title)
    return [md_path, json_path, png_path]


def _plot(rows: list[tuple[str, Report | None, str]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rep, _ in rows:
        if rep is not None:
            ax.semilogy(range(len(rep.per_step_rel)), [max(r, 1e-12) for r in rep.per_step_rel],
                        label=f"{name} ({rep.workload})")
    ax.set_xlabel("position (0 = prefill, then decode steps)")
    ax.set_ylabel("logits max|x - ref| / max|ref|")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
