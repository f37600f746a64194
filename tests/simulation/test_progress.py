"""The progress display of `fedbrats simulate`, from run-folder files written as the server
writes them (progress.json, rounds.json, baseline/rounds.json)."""

from __future__ import annotations

import io
import json

import pytest

from fedbrats.simulation.progress import (
    Progress,
    ProgressDisplay,
    read_progress,
    remaining,
    status_line,
)


def _round(rnd: int, wt: dict[str, float] | None = None) -> dict:
    entry = {"round": rnd, "train": {"GLI": {"loss": 1.0}}, "evaluate": {}}
    if wt:
        entry["evaluate"] = {s: {"WT": {"dice": d}, "TC": {"dice": 0.1}} for s, d in wt.items()}
    return entry


def _write(run, phase, rounds=None, since=1000.0, total=60, folder=""):
    """progress.json as the server writes it: the phase, and every phase so far."""
    path = run / "progress.json"
    phases = json.loads(path.read_text())["phases"] if path.exists() else []
    if not phases or phases[-1][0] != phase:
        phases.append([phase, since])
    path.write_text(json.dumps({"phase": phase, "since": since, "rounds": total,
                                "phases": phases}))
    if rounds is not None:
        (run / folder).mkdir(exist_ok=True)
        (run / folder / "rounds.json").write_text(json.dumps(rounds))


def test_read_progress_follows_the_phases_and_the_evaluated_rounds(tmp_path):
    assert read_progress(tmp_path).phase == "" and not read_progress(tmp_path).evaluated
    _write(tmp_path, "teachers")
    assert read_progress(tmp_path).phase == "teachers"
    _write(tmp_path, "distillation", [_round(1), _round(2, {"GLI": 0.9, "SSA": 0.61}),
                                      _round(3)])
    p = read_progress(tmp_path)
    assert (p.phase, p.done, p.rounds) == ("distillation", 3, 60)
    assert p.evaluated == [("distillation", 2, {"GLI": 0.9, "SSA": 0.61})]
    # the baseline's rounds are in its own folder
    _write(tmp_path, "baseline", [_round(1, {"GLI": 0.5})], folder="baseline")
    p = read_progress(tmp_path)
    assert (p.phase, p.done) == ("baseline", 1)
    assert p.evaluated[-1] == ("baseline", 1, {"GLI": 0.5})
    # the last rounds' evaluations stay in view after the phase moved on
    _write(tmp_path, "evaluation")
    assert len(read_progress(tmp_path).evaluated) == 2
    (tmp_path / "rounds.json").write_text("[{")  # torn mid-write: read as nothing yet
    _write(tmp_path, "distillation")
    assert read_progress(tmp_path).done == 0


def test_status_line_and_the_estimate_left():
    p = Progress("distillation", since=1000.0, rounds=60, done=12)
    # 12 rounds in 120 s: 48 more take 480 s
    assert remaining(p, now=1120.0) == pytest.approx(480.0)
    # a resumed run: the pace counts from the rounds this display saw done (10 at t=1100)
    assert remaining(p, now=1120.0, first_done=10, first_at=1100.0) == pytest.approx(480.0)
    assert remaining(Progress("teachers", since=1000.0), now=1100.0) is None
    assert remaining(Progress("distillation", since=1000.0, rounds=60), now=1100.0) is None
    line = status_line(p, elapsed=365, left=480)
    assert line == ("phase 2: distillation  round 12/60  elapsed 6:05  "
                    "about 8:00 left in this phase")
    assert status_line(Progress("teachers"), 5, None) == "phase 1: teachers  elapsed 0:05"


def test_the_display_prints_each_change_once_to_a_log(tmp_path):
    out = io.StringIO()
    display = ProgressDisplay(tmp_path, out=out)
    _write(tmp_path, "teachers", since=1000.0)
    display.update()
    display.update()  # nothing new: nothing printed
    _write(tmp_path, "distillation", [_round(1)], since=1072.0)
    display.update()
    _write(tmp_path, "distillation", [_round(1), _round(2, {"GLI": 0.912, "SSA": 0.655})])
    display.update()
    display.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("phase 1: teachers  elapsed")
    assert lines[1] == "phase 1: teachers done in 1:12"
    assert lines[2].startswith("phase 2: distillation  round 1/60  elapsed")
    assert lines[3] == "  round 2/60 WT Dice: GLI 0.912  SSA 0.655"
    assert lines[4].startswith("phase 2: distillation  round 2/60  elapsed")
    assert "left in this phase" in lines[4]
    # a phase that began and ended between two looks is still reported
    _write(tmp_path, "baseline", [_round(1, {"GLI": 0.8})], since=1500.0, folder="baseline")
    _write(tmp_path, "evaluation", since=1530.0)
    display.update()
    lines = out.getvalue().splitlines()
    assert lines[5] == "  baseline round 1/60 WT Dice: GLI 0.800"
    assert lines[6] == "phase 2: distillation done in 7:08 (2/60 rounds)"
    assert lines[7] == "FedAvg baseline done in 0:30 (1/60 rounds)"
    assert lines[8].startswith("final evaluation  elapsed")
    assert len(lines) == 9


def test_the_display_runs_in_a_thread_and_stops_with_the_run(tmp_path):
    out = io.StringIO()
    _write(tmp_path, "evaluation")
    with ProgressDisplay(tmp_path, out=out, interval=0.01):
        _write(tmp_path, "done")
    assert out.getvalue().splitlines()[-1].startswith("done  elapsed")
