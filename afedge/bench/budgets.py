"""Per-target budgets: the `[budgets]` table of a target profile, and checking bench figures against it.

Every key is optional. Latency, throughput and memory figures are checked only when they were measured on the
target's own device (this machine for `host`, or `afedge bench --on-target` on the device itself); state and
artifact sizes do not depend on the machine and are checked everywhere."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# key -> (direction, unit, what it bounds, measured on the device?)
BUDGET_KEYS: dict[str, tuple[str, str, str, bool]] = {
    "decode_ms_p90": ("max", "ms", "p90 decode latency per token, at every measured context", True),
    "decode_tok_s": ("min", "tok/s", "decode throughput (from the median step) at the smallest context", True),
    "prefill_tok_s": ("min", "tok/s", "chunked prefill throughput over the prompt", True),
    "ttft_ms": ("max", "ms", "time to first token after the prompt", True),
    "peak_rss_mib": ("max", "MiB", "peak resident memory of the runtime's process", True),
    "context_growth": ("max", "x", "decode latency and peak memory at the largest context / at the smallest", True),
    "prefill_speedup": ("min", "x", "chunked prefill / token-by-token prefill throughput", True),
    "state_kib": ("max", "KiB", "recurrent state size", False),
    "artifact_mib": ("max", "MiB", "size of the runtime's files in the bundle", False),
}


class BudgetError(ValueError):
    """A `[budgets]` table with an unknown key or a bad value; the message names the field."""


def budget_errors(budgets: object) -> list[str]:
    """Problems with a `[budgets]` table, each naming the field (empty when it is valid)."""
    if not isinstance(budgets, dict):
        return [f"budgets must be a table, got {type(budgets).__name__}"]
    errors = []
    for key, value in budgets.items():
        if key not in BUDGET_KEYS:
            errors.append(f"budgets.{key} is not a known budget; known: {', '.join(BUDGET_KEYS)}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            errors.append(f"budgets.{key} must be a positive number ({BUDGET_KEYS[key][1]}), got {value!r}")
        elif key in ("context_growth", "prefill_speedup") and value < 1:
            errors.append(f"budgets.{key} is a ratio and must be >= 1, got {value!r}")
    return errors


@dataclass(frozen=True)
class Verdict:
    runtime: str
    budget: str
    limit: float
    value: float | None
    status: str            # "pass" | "fail" | "not-on-device" | "not-measured"
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _figures(row: dict) -> dict[str, float | None]:
    """The figure each budget bounds, from one runtime's bench row (None where it was not measured)."""
    decode = [d for d in row.get("decode", []) if d.get("median_ms") is not None]
    growth = row.get("growth") or {}
    ratios = [g for g in (growth.get("latency"), growth.get("memory")) if g is not None]
    prefill = row.get("prefill") or {}
    return {
        "decode_ms_p90": max((d["p90_ms"] for d in decode), default=None),
        "decode_tok_s": 1e3 / decode[0]["median_ms"] if decode else None,
        "prefill_tok_s": prefill.get("chunked_tok_s"),
        "ttft_ms": row.get("ttft_ms"),
        "peak_rss_mib": row["peak_rss_bytes"] / 2**20 if row.get("peak_rss_bytes") else None,
        "context_growth": max(ratios) if ratios else None,
        "prefill_speedup": prefill.get("speedup"),
        "state_kib": row["state_bytes"] / 1024 if row.get("state_bytes") is not None else None,
        "artifact_mib": row["artifact_bytes"] / 2**20 if row.get("artifact_bytes") is not None else None,
    }


def check(rows: list[dict], budgets: dict, on_device: bool, target: str) -> list[Verdict]:
    """One verdict per (afedge runtime row, budget). `on_device`: these rows were measured on `target`'s device."""
    out = []
    for row in rows:
        figures = _figures(row)
        for key, limit in budgets.items():
            direction, unit, _, device_bound = BUDGET_KEYS[key]
            value = figures[key]
            if device_bound and not (on_device and row.get("on_device", True)):
                out.append(Verdict(row["name"], key, limit, None, "not-on-device",
                                   f"measured on this machine, not on a {target} device: not checked"))
            elif value is None:
                out.append(Verdict(row["name"], key, limit, None, "not-measured", row.get("reason", "")))
            else:
                ok = value <= limit if direction == "max" else value >= limit
                out.append(Verdict(row["name"], key, limit, round(value, 4), "pass" if ok else "fail",
                                   f"{'<=' if direction == 'max' else '>='} {limit} {unit}"))
    return out
