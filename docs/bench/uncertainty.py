"""How well the student's uncertainty maps predict its errors, on held-out phantoms.

For each of three phantom seeds that no run trained on (101, 102, 103), 10 cases per population
at 96^3 (``fedbrats synth``), the student segments every case with ``fedbrats predict
--population POP --uncertainty KIND`` (KIND: ``entropy``, then ``tta``) and ``fedbrats evaluate
--uncertainty`` scores the maps against the phantoms' ground truth. Resumable: a step whose
output exists is not run again, so a stopped run keeps what it measured.

    .venv/bin/python docs/bench/uncertainty.py MODEL WORK_DIR

MODEL: the ``student.pt`` of ``make demo`` (cpu-demo preset, 60 rounds). Writes
``docs/bench/uncertainty.md`` and ``uncertainty.json``.
"""

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from fedbrats.common.cli import main as fedbrats
from fedbrats.common.data.contract import POPULATIONS
from fedbrats.simulation.bench.perf import machine_info, machine_markdown

SEEDS = (101, 102, 103)
CASES = 10
KINDS = ("entropy", "tta")
FIGURES = ("spearman", "ece", "aurc", "aurc_optimal", "error_rate", "pooled_ece",
           "case_spearman")

model, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
here = Path("docs/bench")
command = "python docs/bench/uncertainty.py MODEL WORK"
started = time.perf_counter()
machine = machine_info()


def summary(folder: Path) -> dict[str, float]:
    with (folder / "uncertainty_summary.csv").open() as fh:
        return {r["figure"]: float(r["mean"]) if r["mean"] else math.nan
                for r in csv.DictReader(fh)}


def per_case(folder: Path) -> list[dict]:
    with (folder / "uncertainty_per_case.csv").open() as fh:
        return list(csv.DictReader(fh))


results: dict = {}
for seed in SEEDS:
    data = work / f"seed-{seed}"
    if not (data / "MET").is_dir():
        fedbrats(["synth", "--out", str(data), "--cases", str(CASES), "--min-cases", str(CASES),
                  "--balanced", "--shape", "96", "--seed", str(seed), "--no-progress"])
    for kind in KINDS:
        for pop in POPULATIONS:
            preds, scored = work / "preds" / kind / str(seed) / pop, \
                work / "eval" / kind / str(seed) / pop
            if not (scored / "uncertainty_summary.csv").exists():
                if not (preds / "done").exists():
                    rc = fedbrats(["predict", "--model", str(model), "--input", str(data / pop),
                                   "--out", str(preds), "--population", pop, "--uncertainty",
                                   kind, "--device", "cpu", "--no-progress"])
                    assert rc == 0, f"predict {pop} seed {seed}: exit {rc}"
                    (preds / "done").write_text("")
                rc = fedbrats(["evaluate", "--pred", str(preds), "--gt", str(data / pop),
                               "--challenge", pop, "--uncertainty", str(preds), "--out",
                               str(scored), "--no-progress"])
                assert rc == 0, f"evaluate {pop} seed {seed}: exit {rc}"
            results.setdefault(kind, {}).setdefault(pop, {})[str(seed)] = {
                "summary": summary(scored), "cases": per_case(scored)}
        # every population's cases of this seed together: the case-level correlation
        rows = [r for pop in POPULATIONS for r in results[kind][pop][str(seed)]["cases"]
                if r["wt_mean_uncertainty"]]
        from fedbrats.common.metrics.uncertainty import spearman

        results[kind].setdefault("all", {})[str(seed)] = {"summary": {
            "case_spearman": spearman(np.array([float(r["wt_mean_uncertainty"]) for r in rows]),
                                      np.array([1 - float(r["wt_dice"]) for r in rows])),
            **{f: float(np.nanmean([float(r[f]) if r[f] else math.nan for r in rows]))
               for f in ("spearman", "ece", "aurc", "aurc_optimal", "error_rate")},
        }}
    (here / "uncertainty.json").write_text(json.dumps(
        {"command": command, "machine": machine, "model": str(model.name), "seeds": SEEDS,
         "cases_per_population": CASES, "results": results}, indent=1, default=float))


def bound_ratio(kind: str, pop: str, seed: str) -> float:
    """The mean over the cases of the voxel Spearman over its bound for a perfect ranking,
    sqrt(3 e (1 - e)) at the case's error rate e."""
    if pop == "all":
        rows = [r for p in POPULATIONS for r in results[kind][p][seed]["cases"]]
    else:
        rows = results[kind][pop][seed]["cases"]
    ratios = [float(r["spearman"]) / math.sqrt(3 * float(r["error_rate"])
                                               * (1 - float(r["error_rate"])))
              for r in rows if r["spearman"] and float(r["error_rate"]) > 0]
    return float(np.mean(ratios)) if ratios else math.nan


def cell(kind: str, pop: str, figure: str, scale: float = 1.0) -> str:
    if figure == "spearman_over_bound":
        values = [bound_ratio(kind, pop, s) for s in map(str, SEEDS)]
    else:
        values = [results[kind][pop][s]["summary"].get(figure, math.nan) * scale
                  for s in map(str, SEEDS) if s in results[kind].get(pop, {})]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    sd = f" +/- {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd}"


lines = ["# Is the student's uncertainty right? Held-out phantoms", "",
         *machine_markdown(machine, command, time.perf_counter() - started), "",
         f"Model: the student of `make demo` (cpu-demo, 60 rounds, population heads, each "
         f"population segmented with its own head). Data: phantom seeds "
         f"{', '.join(map(str, SEEDS))} (no run trained on them), {CASES} cases per population "
         "at 96^3 (2 mm). `fedbrats predict --uncertainty entropy|tta`, then `fedbrats evaluate "
         "--uncertainty`. Each cell: the mean over the three seeds of the per-seed figure, +/- "
         "its sd over the seeds. Per-seed figures are means over the cases, except pooled ECE "
         "(all voxels of the population's cases) and case Spearman (across the cases: mean "
         "uncertainty over the predicted WT against 1 - WT Dice; the figure the "
         "uncertainty-aware nnU-Net reports as 0.750).", ""]
for kind in KINDS:
    lines += [f"## `--uncertainty {kind}`", "",
              "| population | voxel Spearman | of its bound | ECE | pooled ECE | AURC x 1000 | "
              "AURC x 1000, perfect ranking | error rate x 100 | case Spearman |",
              "|---|---|---|---|---|---|---|---|---|"]
    scale = {"aurc": 1000.0, "aurc_optimal": 1000.0, "error_rate": 100.0}
    for pop in (*POPULATIONS, "all"):
        lines.append(f"| {pop} | " + " | ".join(cell(kind, pop, f, scale.get(f, 1.0)) for f in (
            "spearman", "spearman_over_bound", "ece", "pooled_ece", "aurc", "aurc_optimal",
            "error_rate", "case_spearman")) + " |")
    lines.append("")
lines += ["`all`: the 50 cases of a seed together (case Spearman across all 50; the other "
          "figures their mean over the cases). The voxel Spearman is bounded by "
          "`sqrt(3 e (1 - e))` for an error rate `e` even for a perfect ranking "
          "(0.38 at 5 % errors, 0.13 at 0.6 %); \"of its bound\" is the mean over the cases of "
          "the Spearman over that bound. The AURC beside a perfect ranking's is the other "
          "fair read.", "",
          "Raw numbers: [`uncertainty.json`](uncertainty.json).", ""]
(here / "uncertainty.md").write_text("\n".join(lines))
print("\n".join(lines))
