"""A stop signal sent to ``fedbrats simulate`` alone (not its group), inside a distillation round,
ends every process of the run within 30 s; the same command then resumes after the last saved
round. Also: a run killed outright (SIGKILL, no clean-up) leaves processes that the next start
on the folder ends, and a folder whose run is still going is refused.

Real processes throughout: the command line in its own session (so a signal reaches it alone, as
from a job scheduler, ``timeout`` or systemd), Flower's SuperLink and simulation engine, Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import record_recovery

from fedbrats.common.utils.processes import command_line, descendants, end_processes, run_processes
from fedbrats.simulation.phantoms import write_dataset

SITES = ("GLI", "SSA", "PED")
ROUNDS = 5
FEDBRATS = str(Path(sys.executable).with_name("fedbrats"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals") / "data"
    write_dataset(root, {p: 3 for p in SITES}, shape=(48, 48, 48), seed=2, progress=False)
    return root


def command(out: Path, data: Path) -> list[str]:
    return [FEDBRATS, "simulate", "--out", str(out), "--data", str(data), "--preset", "tiny",
            "--sites", str(len(SITES)), "--set", f"num-rounds={ROUNDS}",
            "--set", "local-steps=60"]  # rounds of several seconds: a signal lands inside one


def start(out: Path, data: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.terminal.log", "ab")  # noqa: SIM115 (the child's)
    return subprocess.Popen(command(out, data), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_inside_a_round(out: Path, proc: subprocess.Popen, timeout: float = 400.0) -> int:
    """Block until a distillation round after the first is under way; its number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (out.parent / f"{out.name}.terminal.log").read_text()[-3000:]
        try:
            phase = json.loads((out / "progress.json").read_text())["phase"]
            done = len(json.loads((out / "rounds.json").read_text()))
        except (OSError, ValueError, KeyError):
            phase, done = None, 0
        if phase == "distillation" and 1 <= done < ROUNDS - 1:
            time.sleep(1.0)  # well inside the next round
            return done + 1
        time.sleep(0.5)
    raise AssertionError(f"no distillation round under way after {timeout} s")


def the_run_is_gone(out: Path, pids: list[int], within: float) -> list[str]:
    """What is still alive of the run after ``within`` seconds (empty: nothing)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = set(run_processes(out)) | {p for p in pids if os.path.exists(f"/proc/{p}")
                                          and command_line(p)}
        if not left:
            return []
        time.sleep(0.5)
    return [f"{p} {command_line(p)}" for p in sorted(left)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_every_process_and_the_run_resumes(tmp_path, data, sig):
    out = tmp_path / "run"
    proc = start(out, data)
    try:
        inside = wait_inside_a_round(out, proc)
        pids = descendants(proc.pid) + run_processes(out)
        assert any("flwr-simulation" in command_line(p) for p in pids)
        assert any("raylet" in command_line(p) for p in pids), "Ray is running"
        sent = time.monotonic()
        os.kill(proc.pid, sig)  # the process alone, not its group
        rc = proc.wait(timeout=60)
        left = the_run_is_gone(out, pids, within=30.0 - (time.monotonic() - sent))
        assert not left, f"still running {time.monotonic() - sent:.0f} s after {sig.name}: {left}"
        record_recovery(f"fedbrats simulate sent {sig.name}", time.monotonic() - sent,
                        "signal to the last process of the run ended")
        assert rc == 128 + sig
        terminal = (tmp_path / "run.terminal.log").read_text()
        assert f"stopped by {sig.name}: every process of the run has ended" in terminal
        assert not (out / "run.pid").exists()
    finally:
        end_processes([proc.pid, *run_processes(out)], grace=5.0)

    saved = len(json.loads((out / "rounds.json").read_text()))
    assert saved == inside - 1  # the round under way was not counted
    again = subprocess.run(command(out, data), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "flwr-run.log").read_text()
    assert f"resuming after round {saved} of {ROUNDS}" in log
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # none lost or repeated
    assert (out / "report.md").exists() and not run_processes(out)


@pytest.mark.slow
def test_what_a_killed_run_leaves_is_ended_by_the_next_start(tmp_path, data):
    out = tmp_path / "run"
    proc = start(out, data)
    try:
        wait_inside_a_round(out, proc)
        # a second start on the folder while the run goes on is refused, and harms nothing
        busy = subprocess.run(command(out, data), capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2
        assert f"{out} is in use by a running simulation (process {proc.pid}" in busy.stderr
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all
        proc.wait(timeout=30)
        time.sleep(2.0)
        orphans = run_processes(out)
        assert orphans, "a SIGKILL-ed run leaves its SuperLink and Ray behind"
        again = subprocess.run(command(out, data), capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"process(es) left running by an earlier run of {out}" in again.stderr
        assert not any(os.path.exists(f"/proc/{p}") and command_line(p) for p in orphans)
        assert not run_processes(out)
        rounds = json.loads((out / "rounds.json").read_text())
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    finally:
        end_processes([proc.pid, *run_processes(out)], grace=5.0)


# The rehearsal: a Python process that holds a LocalFederation (SuperLink, SuperNodes, and with
# a run under way its ServerApp and ClientApps) gets the signal.
REHEARSAL = """
import json, sys, time
from pathlib import Path
from fedbrats.simulation.rehearsal import LocalFederation
folder, data, with_run = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "run"
sites = {s: data / s for s in ("GLI", "SSA", "PED")}
with LocalFederation(folder, sites, env={"OMP_NUM_THREADS": "1"}) as fed:
    if with_run:
        fed.start_run({"preset": "tiny", "num-sites": 3, "output-dir": str(folder / "run"),
                       "num-rounds": 50, "local-steps": 20})
    (folder / "token").write_text(fed.token)
    time.sleep(3600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig,with_run", [(signal.SIGTERM, True), (signal.SIGINT, False),
                                          (signal.SIGHUP, False)],
                         ids=["SIGTERM-in-a-round", "SIGINT", "SIGHUP"])
def test_a_stop_signal_to_the_rehearsal_ends_its_federation(tmp_path, data, sig, with_run):
    from fedbrats.simulation.rehearsal import marked_processes

    folder = tmp_path / "fed"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", REHEARSAL, str(folder), str(data),
                             "run" if with_run else "idle"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    token = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            if (folder / "token").exists():
                token = (folder / "token").read_text()
                if not with_run or _round_under_way(folder / "run"):
                    break
            time.sleep(1.0)
        else:
            raise AssertionError("the federation did not get going")
        before = marked_processes(token)
        names = " ".join(command_line(p) for p in before)
        assert "flower-superlink" in names and names.count("flower-supernode") == 3
        if with_run:
            assert "flwr-clientapp" in names or "flwr-serverapp" in names, names
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        deadline = sent + 30.0
        while marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"{p} {command_line(p)}" for p in marked_processes(token)]
        assert not left, f"still running {time.monotonic() - sent:.0f} s after {sig.name}: {left}"
    finally:
        end_processes([proc.pid, *(marked_processes(token) if token else [])], grace=5.0)


def _round_under_way(out: Path) -> bool:
    try:
        return len(json.loads((out / "rounds.json").read_text())) >= 1
    except (OSError, ValueError):
        return False
