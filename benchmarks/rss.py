"""Peak resident memory of this process, for the memory benchmarks (Linux: /proc)."""
from __future__ import annotations


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
