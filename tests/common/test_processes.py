"""``fedbrats.common.utils.processes``: stop signals, the run marker, ending processes, with real
child processes (a grandchild re-parented to init, a process that ignores SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fedbrats.common.utils.processes import (
    RUN_MARKER,
    RunStopped,
    StopSignals,
    alive,
    command_line,
    descendants,
    end_processes,
    marked,
    run_processes,
)

# A child that starts a grandchild in a new session and exits: the grandchild is re-parented to
# init, out of reach of process groups and of the parent chain. Both ignore SIGTERM.
ORPHANING = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "parent":
    g = subprocess.Popen([sys.executable, "-c", sys.argv[2], "grandchild", sys.argv[2], "-"],
                         start_new_session=True)
    print(g.pid, flush=True)
    time.sleep(1 if sys.argv[3] == "orphan" else 600)
else:
    time.sleep(600)
"""


def spawn(tmp_path, marker: str, mode: str):
    env = {**os.environ, RUN_MARKER: marker}
    proc = subprocess.Popen([sys.executable, "-c", ORPHANING, "parent", ORPHANING, mode],
                            env=env, stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    return proc, grandchild


def test_the_marker_finds_a_reparented_grandchild_and_end_processes_kills_it(tmp_path):
    folder = str((tmp_path / "run").resolve())
    proc, grandchild = spawn(tmp_path, folder, "orphan")
    proc.wait(timeout=30)  # the parent is gone: the grandchild now belongs to init
    try:
        assert alive(grandchild) and "grandchild" in command_line(grandchild)
        assert grandchild not in descendants()  # not ours any more
        assert run_processes(tmp_path / "run") == [grandchild]
        assert run_processes(tmp_path / "run2") == []  # another folder, another run
        assert marked(RUN_MARKER, folder[:-1], prefix=True) == [grandchild]
        assert marked(RUN_MARKER, folder[:-1]) == []  # exact unless asked
        t0 = time.monotonic()
        killed = end_processes([grandchild], grace=1.0)  # it ignores SIGTERM
        assert killed == [grandchild] and not alive(grandchild)
        assert time.monotonic() - t0 < 8
    finally:
        end_processes([grandchild], grace=0.1)


def test_descendants_and_a_polite_process(tmp_path):
    proc, grandchild = spawn(tmp_path, "x", "stay")
    try:
        assert descendants(proc.pid) == [grandchild]
        assert proc.pid in descendants()
        polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        assert end_processes([polite.pid], grace=10.0) == []  # SIGTERM was enough
        assert polite.wait(timeout=5) == -signal.SIGTERM
    finally:
        end_processes([proc.pid, grandchild], grace=0.5)
        proc.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_unwind_once_and_restore_the_handlers(sig):
    before = signal.getsignal(sig)
    cleaned = []
    with pytest.raises(RunStopped) as stopped:
        with StopSignals() as stop:
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # interrupted by the handler
            finally:
                stop.ignore()
                os.kill(os.getpid(), sig)  # a second signal during the clean-up: ignored
                cleaned.append(True)
    assert cleaned == [True]
    assert stopped.value.signum == sig and stopped.value.code == 128 + sig
    assert signal.getsignal(sig) == before
