"""Post-processing tuned by the federation, against the default thresholds, on held-out phantoms.

1. **Choose** as a run with ``postprocess-tuning`` does, with the very functions the sites and
   the server run (:func:`~fedbrats.common.inference.postprocess_tuning.score_points` and
   :func:`~fedbrats.common.inference.postprocess_tuning.choose`): each population's validation
   cases of ``make demo``'s data (phantom seed 0, ``--cases 16``, the run's split: validation
   fraction 0.34, seed 0), segmented by the demo's student with that population's head.
2. **Test** on held-out phantoms (seeds 101, 102, 103; 10 cases per population at 96^3; no run
   trained or tuned on them): lesion-wise Dice per region of the student's segmentations
   post-processed with the defaults (50 and 100 mm^3), with the ``global`` choice and with the
   ``population`` choice. Per population and seed the mean over the cases; then the mean +/- sd
   over the three seeds, and the paired difference tuned - default over all 30 cases.

Segmentations are single-pass (``fedbrats predict``'s default; a run's tuning uses its final
evaluation's, with TTA when ``final-tta``). Resumable: each case's raw segmentation is kept in
WORK_DIR, so a stopped run keeps what it computed.

    .venv/bin/python docs/bench/postprocess_tuning.py MODEL WORK_DIR

Writes ``docs/bench/postprocess-tuning.md`` and ``postprocess-tuning.json``.
"""

import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrats.client.data import split_cases
from fedbrats.common.cli import main as fedbrats
from fedbrats.common.data.cases import discover_cases, voxel_spacing
from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.common.inference.modelfile import PostprocessThresholds, load_student
from fedbrats.common.inference.postprocess_tuning import choose, grid_points, score_points
from fedbrats.common.inference.predict import predict_case
from fedbrats.simulation.bench.perf import machine_info, machine_markdown

SEEDS = (101, 102, 103)
CASES = 10
model, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
here = Path("docs/bench")
command = "python docs/bench/postprocess_tuning.py MODEL WORK"
started = time.perf_counter()
machine = machine_info()
points = grid_points()


def synth(folder: Path, seed: int, cases: int, balanced: bool) -> None:
    if not (folder / "MET").is_dir():
        fedbrats(["synth", "--out", str(folder), "--cases", str(cases), "--shape", "96",
                  "--seed", str(seed), "--no-progress",
                  *(["--balanced", "--min-cases", str(cases)] if balanced else [])])


def raw_cases(folder: Path, pop: str, keep: Path, cases=None) -> list:
    """``(raw segmentation, ground truth, spacing)`` of each case, kept in ``keep``."""
    student = load_student(model, population=pop)
    out = []
    for case in cases if cases is not None else discover_cases(folder / pop):
        path = keep / f"{case.case_id}.nii.gz"
        gt_img = nib.load(str(case.seg))
        if not path.exists():
            labels = predict_case(student, case, apply_postprocess=False).labels
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(labels.astype(np.uint8), gt_img.affine), str(path))
        out.append((np.asarray(nib.load(str(path)).dataobj, dtype=np.uint8),
                    np.asarray(gt_img.dataobj, dtype=np.uint8), voxel_spacing(gt_img.affine)))
    return out


# 1. the choice, on the demo's validation cases
demo = work / "demo-data"
synth(demo, 0, 16, balanced=False)
site_scores, validation = {}, {}
for pop in POPULATIONS:
    _, val = split_cases([c for c in discover_cases(demo / pop) if c.seg is not None], 0.34, 0)
    validation[pop] = [c.case_id for c in val]
    site_scores[pop] = score_points(raw_cases(demo, pop, work / "raw" / "demo" / pop, val), pop,
                                    points)
glob = choose(site_scores, points, "global")
per = choose(site_scores, points, "population")

# 2. the test, on held-out phantoms
settings = {"default": {p: PostprocessThresholds() for p in POPULATIONS},
            "global": {p: glob.chosen for p in POPULATIONS},
            "population": dict(per.by_population)}
results: dict = {}
for seed in SEEDS:
    data = work / f"seed-{seed}"
    synth(data, seed, CASES, balanced=True)
    for pop in POPULATIONS:
        cases = raw_cases(data, pop, work / "raw" / str(seed) / pop)
        for name, thresholds in settings.items():
            each = [score_points([c], pop, [thresholds[pop]])[0].tolist() for c in cases]
            results.setdefault(name, {}).setdefault(pop, {})[str(seed)] = {
                "mean": np.mean(each, axis=0).tolist(), "cases": each}

summary = {"command": command, "machine": machine, "model": model.name,
           "validation_cases": validation, "grid_points": len(points),
           "global": glob.to_dict(), "population": per.to_dict(), "results": results}
(here / "postprocess-tuning.json").write_text(json.dumps(summary, indent=1, default=float))


def cell(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} +/- {values.std(ddof=1):.3f}" if values.size > 1 else \
        f"{values.mean():.3f}"


def thresholds(t: PostprocessThresholds) -> str:
    return f"{t.min_component_mm3:g} / {t.et_min_mm3:g}"


lines = ["# Post-processing tuned by the federation, on held-out phantoms", "",
         *machine_markdown(machine, command, time.perf_counter() - started), "",
         f"Model: the student of `make demo` (each population segmented with its own head, "
         f"single pass, no post-processing, then each setting applied). Chosen on the demo's "
         f"validation cases ({', '.join(f'{p} {len(v)}' for p, v in validation.items())}) "
         f"from a grid of {len(points)} threshold pairs (minimum component mm^3 / ET minimum "
         "mm^3) with the functions the sites and the server run; tested on phantom seeds "
         f"{', '.join(map(str, SEEDS))}, {CASES} cases per population. Score: the BraTS 2023 "
         "lesion-wise Dice (the population's lesion matching), mean over WT, TC and ET.", "",
         "| population | default | `global` choice | `population` choice |", "|---|---|---|---|",
         f"| (thresholds) | 50 / 100 | {thresholds(glob.chosen)} | see below |"]
for pop in POPULATIONS:
    row = [pop]
    for name in ("default", "global", "population"):
        per_seed = [np.mean(results[name][pop][str(s)]["mean"]) for s in SEEDS]
        row.append(cell(per_seed))
    row[-1] += f" ({thresholds(per.by_population[pop])})"
    lines.append("| " + " | ".join(row) + " |")
lines += ["", "Each cell: the mean over the three seeds of the per-seed mean over the cases, +/- "
          "its sd over the seeds.", "",
          "Paired difference, tuned - default, over all 30 held-out cases of a population "
          "(mean +/- sd; per region WT / TC / ET, then their mean):", "",
          "| population | `global` - default | `population` - default |", "|---|---|---|"]
for pop in POPULATIONS:
    row = [pop]
    base = np.array([c for s in SEEDS for c in results["default"][pop][str(s)]["cases"]])
    for name in ("global", "population"):
        diff = np.array([c for s in SEEDS for c in results[name][pop][str(s)]["cases"]]) - base
        regions = " / ".join(f"{diff[:, j].mean():+.3f}" for j in range(len(REGIONS)))
        row.append(f"{regions}; mean {diff.mean(1).mean():+.3f} +/- {diff.mean(1).std(ddof=1):.3f}")
    lines.append("| " + " | ".join(row) + " |")
lines += ["", "On the validation cases themselves (optimistic: chosen there), the gain per site: "
          + ", ".join(f"{p} {v['gain']:+.3f}" for p, v in per.site_scores.items())
          + " (`population`); " + ", ".join(f"{p} {v['gain']:+.3f}"
                                          for p, v in glob.site_scores.items()) + " (`global`).",
          "", "Raw numbers: [`postprocess-tuning.json`](postprocess-tuning.json).", ""]
(here / "postprocess-tuning.md").write_text("\n".join(lines))
print("\n".join(lines))
