"""A site's own model against the federated student, on held-out phantoms of the smallest site.

The smallest site of ``make demo`` is SSA. Its own cases (phantom seed 0, ``--cases 16``, as the
demo's data) are what ``fedbrats finetune`` fine-tunes the demo's student on, with the command's
defaults (5 volume-stratified folds, at most one per training case; early stopping), once per
fine-tuning seed (0, 1, 2). Each fine-tuned model and the federated student then segment held-out
SSA phantoms (seeds 101, 102, 103, 10 cases each, no run trained on them; ``fedbrats predict
--population SSA``, post-processed as the student file says) and ``fedbrats evaluate`` scores
them. Resumable: every step whose output exists is skipped.

    .venv/bin/python docs/bench/finetune.py MODEL WORK_DIR

Writes ``docs/bench/finetune.md`` and ``finetune.json``.
"""

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedbrats.common.cli import main as fedbrats
from fedbrats.common.data.contract import REGIONS
from fedbrats.simulation.bench.perf import machine_info, machine_markdown

SITE = "SSA"
TUNE_SEEDS = (0, 1, 2)
TEST_SEEDS = (101, 102, 103)
CASES = 10
model, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
here = Path("docs/bench")
command = "python docs/bench/finetune.py MODEL WORK"
started = time.perf_counter()
machine = machine_info()

demo = work / "demo-data"
if not (demo / "MET").is_dir():
    fedbrats(["synth", "--out", str(demo), "--cases", "16", "--shape", "96", "--seed", "0",
              "--no-progress"])
for seed in TEST_SEEDS:
    data = work / f"seed-{seed}"
    if not (data / "MET").is_dir():
        fedbrats(["synth", "--out", str(data), "--cases", str(CASES), "--min-cases", str(CASES),
                  "--balanced", "--shape", "96", "--seed", str(seed), "--no-progress"])

models = {"federated": model}
tuning = {}
for seed in TUNE_SEEDS:
    out = work / "finetune" / f"seed-{seed}"
    if not (out / "student.pt").exists():
        rc = fedbrats(["finetune", "--model", str(model), "--site", str(demo / SITE), "--out",
                       str(out), "--population", SITE, "--seed", str(seed), "--device", "cpu"])
        assert rc == 0, f"finetune seed {seed}: exit {rc}"
    models[f"own (seed {seed})"] = out / "student.pt"
    tuning[str(seed)] = json.loads((out / "finetune.json").read_text())


def scores(name: str, path: Path, seed: int) -> dict:
    preds = work / "preds" / name.replace(" ", "_").replace("(", "").replace(")", "") / str(seed)
    scored = work / "eval" / preds.relative_to(work / "preds")
    if not (scored / "per_case.csv").exists():
        if not (preds / "done").exists():
            assert fedbrats(["predict", "--model", str(path), "--input",
                             str(work / f"seed-{seed}" / SITE), "--out", str(preds),
                             "--population", SITE, "--device", "cpu", "--no-progress"]) == 0
            (preds / "done").write_text("")
        assert fedbrats(["evaluate", "--pred", str(preds), "--gt", str(work / f"seed-{seed}" / SITE),
                         "--challenge", SITE, "--out", str(scored), "--no-progress"]) == 0
    out: dict = {}
    with (scored / "per_case.csv").open() as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["case_id"], {})[row["region"]] = {
                m: float(row[m]) for m in ("dice", "lesion_dice")}
    return out


results = {name: {str(s): scores(name, path, s) for s in TEST_SEEDS}
           for name, path in models.items()}
(here / "finetune.json").write_text(json.dumps(
    {"command": command, "machine": machine, "model": model.name, "site": SITE,
     "fine_tuning": tuning, "results": results}, indent=1, default=float))


def seed_means(name: str, region: str, metric: str) -> list[float]:
    return [np.mean([c[region][metric] for c in results[name][str(s)].values()])
            for s in TEST_SEEDS]


def paired(name: str, region: str, metric: str) -> np.ndarray:
    return np.array([results[name][str(s)][cid][region][metric]
                     - results["federated"][str(s)][cid][region][metric]
                     for s in TEST_SEEDS for cid in results["federated"][str(s)]])


own = [n for n in models if n != "federated"]
lines = [f"# {SITE}'s own model against the federated student, on held-out phantoms", "",
         *machine_markdown(machine, command, time.perf_counter() - started), "",
         f"Model: the student of `make demo`. The smallest site, {SITE}, fine-tunes it on its "
         f"own cases of the demo's data ({tuning['0']['num_train']} training, "
         f"{tuning['0']['num_val']} validation) with `fedbrats finetune`'s defaults, once per "
         f"fine-tuning seed ({', '.join(map(str, TUNE_SEEDS))}). Test: held-out {SITE} phantoms, "
         f"seeds {', '.join(map(str, TEST_SEEDS))}, {CASES} cases each, "
         "`fedbrats predict --population SSA` then `fedbrats evaluate`.", "",
         "Fine-tuning: " + "; ".join(
             f"seed {s}: {t['steps']} steps (folds' best: "
             f"{', '.join(str(f['best_step']) for f in t['folds'])}), {t['seconds']:.0f} s"
             for s, t in tuning.items()) + ".", "",
         "| region | metric | federated | own model (3 fine-tuning seeds) | paired diff, own - "
         "federated (90 case pairs) |", "|---|---|---|---|---|"]
for region in REGIONS:
    for metric in ("dice", "lesion_dice"):
        fed = seed_means("federated", region, metric)
        mine = [v for n in own for v in seed_means(n, region, metric)]
        diff = np.concatenate([paired(n, region, metric) for n in own])
        lines.append(f"| {region} | {metric.replace('_', ' ')} | {np.mean(fed):.3f} +/- "
                     f"{np.std(fed, ddof=1):.3f} | {np.mean(mine):.3f} +/- "
                     f"{np.std(mine, ddof=1):.3f} | {diff.mean():+.3f} +/- "
                     f"{diff.std(ddof=1):.3f} |")
lines += ["", "Federated and own: the mean over the test seeds (and, for the own model, the "
          "fine-tuning seeds) of the mean over the cases, +/- the sd of those means. Paired: "
          "each held-out case's own-model score minus the federated student's, over the 3 test "
          "seeds x 10 cases x 3 fine-tuning seeds.", "",
          "Raw numbers: [`finetune.json`](finetune.json).", ""]
(here / "finetune.md").write_text("\n".join(lines))
print("\n".join(lines))
