"""Every process a run starts, found and ended: stop signals, a marker in every environment.

A run (``fedbrats simulate``, the deployment rehearsal) starts processes that start their own:
the SuperLink starts ``flower-superexec``, which starts ``flwr-simulation``, which starts Ray (GCS
server, raylet, workers, dashboard and runtime-env agents); a SuperNode starts a ClientApp per
message. Several of them leave their parent's process group or are re-parented to init when it
dies, so stopping the processes the run started itself leaves the rest running. Two things make
the end complete:

* a marker in the environment of everything the run starts (``FEDBRATS_RUN=<folder>`` for a
  simulation, ``FEDBRATS_PROCESS=<token>:<component>`` in the rehearsal), inherited by every
  descendant, re-parented or not: :func:`marked` finds a run's processes by it, also
  those of an earlier run of the same folder whose owner was killed outright (``kill -9``);
  :func:`descendants` (by /proc's parent ids) adds any that cleared their environment;
* :func:`end_processes`: SIGTERM, a grace period, SIGKILL for what is left (a zombie counts as
  ended; a child's exit status is left for its ``Popen`` to collect).

:class:`StopSignals` turns SIGINT, SIGTERM and SIGHUP into :class:`RunStopped` in the main thread,
so that a run unwinds through its ``finally`` blocks, which end its processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

__all__ = [
    "RUN_MARKER",
    "RunStopped",
    "StopSignals",
    "alive",
    "command_line",
    "descendants",
    "end_processes",
    "environ",
    "marked",
    "run_processes",
    "send",
]

RUN_MARKER: Final = "FEDBRATS_RUN"
"""The environment variable that names the run folder in every process of a run."""

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunStopped(SystemExit):
    """The run's process got a stop signal; its exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals(contextlib.AbstractContextManager):
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`RunStopped` (once: a second
    signal while the run is ending is ignored, so the clean-up is not cut short). The previous
    handlers come back on exit. Only in the main thread (elsewhere it does nothing)."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self.received: int | None = None

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            raise RunStopped(signum)

    def ignore(self) -> None:
        """From now on the signals raise nothing (while the run ends its processes)."""
        if self.received is None:
            self.received = 0

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return int(rest[1]), rest[0]


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def descendants(pid: int | None = None) -> list[int]:
    """Every living descendant of ``pid`` (default: this process), parents before children."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for p in _pids():
        st = _stat(p)
        if st is not None and st[1] not in ("Z", "X"):
            children.setdefault(st[0], []).append(p)
    out, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def environ(pid: int) -> list[bytes]:
    """The process's environment, ``VAR=value`` entries ([] when it is gone or not ours)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def marked(var: str, value: str, *, prefix: bool = False) -> list[int]:
    """Living processes (this one excepted) whose environment sets ``var`` to ``value`` (or,
    with ``prefix``, to a value starting with it), in pid order."""
    needle = f"{var}={value}".encode()
    me, out = os.getpid(), []
    for p in _pids():
        if p == me:
            continue
        entries = environ(p)
        hit = (any(e.startswith(needle) for e in entries) if prefix else needle in entries)
        if hit and alive(p):
            out.append(p)
    return sorted(out)


def run_processes(run_folder: str | Path) -> list[int]:
    """The living processes of the run in ``run_folder`` (marked with :data:`RUN_MARKER`)."""
    return marked(RUN_MARKER, str(Path(run_folder).resolve()))


def send(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each process of ``pids`` that is still there."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def command_line(pid: int) -> str:
    """The process's command line, for messages ('' when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def end_processes(pids: Iterable[int], grace: float = 10.0) -> list[int]:
    """SIGTERM every process of ``pids``, SIGKILL those still alive after ``grace`` seconds;
    returns those that had to be killed."""
    pids = [p for p in dict.fromkeys(pids) if p != os.getpid()]
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return []
        time.sleep(0.2)
    killed = [p for p in pids if alive(p)]
    send(killed, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while time.monotonic() < end and any(alive(p) for p in killed):
        time.sleep(0.1)
    return killed
