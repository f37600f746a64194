"""How long this process has been running: in deployment every message runs in a new ClientApp
process, so its age when a round's first step starts is the round's start-up cost."""

from __future__ import annotations

import os

__all__ = ["process_age"]


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None where that is not known."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start)


