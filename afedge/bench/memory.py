"""Process memory on Linux: current and peak RSS from /proc/self/status, and resetting the peak between phases."""
from __future__ import annotations

import resource
from pathlib import Path

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size now (0 where /proc is missing)."""
    return 1024 * (_status_kib("VmRSS") or 0)


def peak_rss_bytes() -> int:
    """Peak RSS since the process started or since the last `reset_peak()` (VmHWM; ru_maxrss as a fallback)."""
    hwm = _status_kib("VmHWM")
    return 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False where that is not possible,
    in which case `peak_rss_bytes` stays the process-lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False
