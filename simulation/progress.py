"""`fedbrats simulate`'s progress display, read from the run folder while the run goes on.

The ServerApp writes ``progress.json`` (the phase and when it began) and ``rounds.json`` (one
entry per finished round, with the sites' per-round evaluation); the baseline's rounds are in
``baseline/rounds.json``. :func:`read_progress` turns those files into a :class:`Progress`, and
:func:`status_line` / :func:`evaluation_line` into what a person reads; :class:`ProgressDisplay`
polls them in a thread and prints. Nothing here talks to Flower: the display works the same for
a resumed run and never slows the run down.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PHASES = {"teachers": "phase 1: teachers", "distillation": "phase 2: distillation",
          "baseline": "FedAvg baseline", "evaluation": "final evaluation", "done": "done"}


@dataclass
class Progress:
    phase: str = ""
    """``teachers``, ``distillation``, ``baseline``, ``evaluation``, ``done`` (or "" before)."""
    since: float | None = None
    """When the phase began (seconds since the epoch)."""
    rounds: int = 0
    """Rounds of phase 2 (and of the baseline)."""
    done: int = 0
    """Rounds of the current phase finished."""
    evaluated: list[tuple[str, int, dict[str, float]]] = field(default_factory=list)
    """``(phase, round, {site: WT Dice})`` of every evaluated round so far (phase
    ``distillation`` for the student, ``baseline`` for the FedAvg baseline)."""
    phases: list[tuple[str, float]] = field(default_factory=list)
    """Every phase of this run so far with when it began, the current one last."""
    rounds_done: dict[str, int] = field(default_factory=dict)
    """Rounds finished of ``distillation`` and ``baseline``."""


def _read(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being replaced: the next poll reads it
        return default


def _evaluated(rounds: Any) -> tuple[int, list[tuple[int, dict[str, float]]]]:
    """Rounds finished, and ``(round, {site: WT Dice})`` of the evaluated ones."""
    if not isinstance(rounds, list):
        return 0, []
    evaluated = []
    for entry in rounds:
        wt = {site: float(scores["WT"]["dice"]) for site, scores in
              (entry.get("evaluate") or {}).items()
              if isinstance(scores, Mapping) and "WT" in scores}
        if wt:
            evaluated.append((int(entry["round"]), wt))
    return max((int(e.get("round", 0)) for e in rounds), default=0), evaluated


def read_progress(run_dir: Path) -> Progress:
    """The run's progress as its files say it now. ``evaluated`` lists the student's rounds and
    then the baseline's (phase ``baseline``), whatever the current phase."""
    state = _read(run_dir / "progress.json", {})
    phase = str(state.get("phase", ""))
    done, evaluated = _evaluated(_read(run_dir / "rounds.json", []))
    base_done, base_eval = _evaluated(_read(run_dir / "baseline" / "rounds.json", []))
    phases = [(str(p), float(t)) for p, t in state.get("phases", [])]
    return Progress(phase, state.get("since"), int(state.get("rounds", 0)),
                    base_done if phase == "baseline" else done,
                    [("distillation", r, wt) for r, wt in evaluated]
                    + [("baseline", r, wt) for r, wt in base_eval],
                    phases, {"distillation": done, "baseline": base_done})


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def remaining(p: Progress, now: float, first_done: int = 0, first_at: float | None = None
              ) -> float | None:
    """Seconds the current phase still needs, from the pace of the rounds finished since this
    display started (``first_done`` rounds were done at ``first_at``); None when unknown."""
    if p.phase not in ("distillation", "baseline") or not p.rounds:
        return None
    start_done, start_at = (first_done, first_at) if first_at is not None else (0, p.since)
    if start_at is None or p.done <= start_done:
        return None
    pace = (now - start_at) / (p.done - start_done)
    return pace * (p.rounds - p.done)


def status_line(p: Progress, elapsed: float, left: float | None) -> str:
    """``phase 2: distillation  round 12/60  elapsed 6:05  about 24:10 left``."""
    parts = [PHASES.get(p.phase, p.phase or "starting")]
    if p.phase in ("distillation", "baseline") and p.rounds:
        parts.append(f"round {p.done}/{p.rounds}")
    parts.append(f"elapsed {_clock(elapsed)}")
    if left is not None:
        parts.append(f"about {_clock(left)} left in this phase")
    return "  ".join(parts)


def phase_done_line(p: Progress, i: int) -> str:
    """``phase 2: distillation done in 9:41 (60/60 rounds)`` for ``p.phases[i]`` (not the
    last)."""
    phase, since = p.phases[i]
    line = f"{PHASES.get(phase, phase)} done in {_clock(p.phases[i + 1][1] - since)}"
    if phase in p.rounds_done and p.rounds:
        line += f" ({p.rounds_done[phase]}/{p.rounds} rounds)"
    return line


def evaluation_line(phase: str, rnd: int, rounds: int, wt: Mapping[str, float]) -> str:
    """``  round 10/60 WT Dice: GLI 0.912  SSA 0.655 ...``."""
    who = "baseline " if phase == "baseline" else ""
    scores = "  ".join(f"{site} {d:.3f}" for site, d in wt.items())
    return f"  {who}round {rnd}/{rounds} WT Dice: {scores}"


class ProgressDisplay:
    """Print the run's progress while it goes on: a status line (rewritten in place on a
    terminal, printed when it changes otherwise) and a line for every evaluated round."""

    def __init__(self, run_dir: Path, out: TextIO | None = None, interval: float = 2.0) -> None:
        self.run_dir, self.out, self.interval = run_dir, out or sys.stdout, interval
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._shown: set[tuple[str, int]] = set()
        self._phases_shown = 0
        self._last = ""
        self._pace: dict[str, tuple[int, float]] = {}

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.update()
        if self.tty and self._last:
            self.out.write("\n")
            self.out.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()

    def update(self) -> None:
        p = read_progress(self.run_dir)
        now = time.time()
        if p.phase and p.phase not in self._pace:  # the pace counts from what this run does
            self._pace[p.phase] = (p.done, now)
        first_done, first_at = self._pace.get(p.phase, (0, None))
        lines = []
        for phase, rnd, wt in p.evaluated:
            if (phase, rnd) not in self._shown:
                self._shown.add((phase, rnd))
                lines.append(evaluation_line(phase, rnd, p.rounds, wt))
        for i in range(self._phases_shown, len(p.phases) - 1):  # phases that have ended
            lines.append(phase_done_line(p, i))
        self._phases_shown = max(self._phases_shown, len(p.phases) - 1)
        status = status_line(p, time.monotonic() - self.start,
                             remaining(p, now, first_done, first_at))
        if self.tty:  # one line, rewritten in place; evaluated rounds scroll above it
            clear = "\r\033[K"
            self.out.write("".join(f"{clear}{line}\n" for line in lines) + f"{clear}{status}")
            self._last = status
        else:  # a log: the status when the phase or the round changes
            key = status.split("  elapsed")[0]
            self.out.write("".join(f"{line}\n" for line in lines))
            if key != self._last:
                self.out.write(status + "\n")
                self._last = key
        self.out.flush()


__all__ = ["Progress", "ProgressDisplay", "evaluation_line", "phase_done_line", "read_progress",
           "remaining", "status_line"]
