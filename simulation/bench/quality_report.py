"""The report of ``fedbrats bench quality``: every stored part merged into tables and charts.

Parts are grouped by preset, fraction and data; within a group each method has the seeds it was run
for (with the settings its key records). Cells are mean +/- sd over seeds of a population's mean
over its test cases; *paired* differences are taken per seed (the same teachers, data split and test
cases) and then summarised over the seeds both methods share.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.common.utils.plotting import pyplot
from fedbrats.simulation.bench.perf import fmt_mean_sd, machine_markdown, md_table, mean_sd
from fedbrats.simulation.bench.quality import (
    DECIDING,
    DISTILLATION_VARIANTS,
    METHODS,
    SUBSETS,
    QualitySettings,
    compute_matched_rounds,
)

Part = Mapping[str, Any]

TARGET_MARGIN = 0.03
"""The issue's margins: worst-population WT gain over FedAvg, and the most a student cell may
fall below its own site's teacher."""


class Group:
    """The parts of one (preset, fraction, data): method -> seed -> part."""

    def __init__(self, parts: Sequence[Part]) -> None:
        first = parts[0]
        self.preset, self.fraction = first["preset"], first["fraction"]
        self.key = first.get("group", first["key"])
        self.parts: dict[str, dict[int, Part]] = {}
        for p in parts:
            self.parts.setdefault(p["method"], {})[int(p["seed"])] = p
        self.methods = [m for m in METHODS if m in self.parts]

    @property
    def title(self) -> str:
        share = "full schedule" if self.fraction == 1 else f"{self.fraction:g} of the schedule"
        return f"preset {self.preset}, {share}"

    def seeds(self, method: str) -> list[int]:
        return sorted(self.parts.get(method, {}))

    def values(self, method: str, pop: str, region: str, metric: str = "dice",
               seeds: Sequence[int] | None = None) -> list[float]:
        runs = self.parts.get(method, {})
        return [float(runs[s]["scores"][pop][region].get(metric, math.nan))
                for s in (seeds if seeds is not None else sorted(runs)) if s in runs]

    def summary(self, method: str, region: str, metric: str = "dice", higher: bool = True,
                seeds: Sequence[int] | None = None) -> dict:
        """Per population the values over seeds; per seed the mean, worst and gap."""
        seeds = list(seeds if seeds is not None else self.seeds(method))
        per_pop = {p: self.values(method, p, region, metric, seeds) for p in POPULATIONS}
        mean, worst, gap, worst_pop = [], [], [], []
        for i in range(len(seeds)):
            finite = {p: v[i] for p, v in per_pop.items() if math.isfinite(v[i])}
            if not finite:
                continue
            mean.append(sum(finite.values()) / len(finite))
            wp = (min if higher else max)(finite, key=finite.get)
            worst.append(finite[wp])
            gap.append(max(finite.values()) - min(finite.values()))
            worst_pop.append(wp)
        return {"populations": per_pop, "mean": mean, "worst": worst, "gap": gap,
                "worst_population": worst_pop}

    def headline(self) -> dict:
        out = {}
        for method in self.methods:
            out[method] = {"seeds": len(self.seeds(method))}
            for region in REGIONS:
                s = self.summary(method, region)
                out[method][region] = {"mean": mean_sd(s["mean"])[0],
                                       "worst": mean_sd(s["worst"])[0],
                                       "gap": mean_sd(s["gap"])[0]}
        return out

    def paired(self, a: str, b: str) -> dict | None:
        """``a - b`` per population and region (and the mean over populations, and the worst
        population's WT), per seed both have; None when they share no seed."""
        seeds = sorted(set(self.seeds(a)) & set(self.seeds(b)))
        if not seeds:
            return None
        out: dict[str, Any] = {"seeds": seeds}
        for region in REGIONS:
            out[region] = {p: [x - y for x, y in zip(self.values(a, p, region, seeds=seeds),
                                                     self.values(b, p, region, seeds=seeds))]
                           for p in POPULATIONS}
            sa, sb = self.summary(a, region, seeds=seeds), self.summary(b, region, seeds=seeds)
            out[region]["mean"] = [x - y for x, y in zip(sa["mean"], sb["mean"])]
            out[region]["worst"] = [x - y for x, y in zip(sa["worst"], sb["worst"])]
            out[region]["gap"] = [x - y for x, y in zip(sa["gap"], sb["gap"])]
        return out


def group_parts(parts: Sequence[Part]) -> list[Group]:
    """The parts grouped by settings, the full schedule first."""
    by: dict[tuple, list[Part]] = {}
    for p in parts:
        by.setdefault((p["preset"], p["fraction"], p.get("group", p["key"])), []).append(p)
    groups = [Group(v) for v in by.values()]
    return sorted(groups, key=lambda g: (-g.fraction, g.preset, g.key))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _worst_label(pops: Sequence[str]) -> str:
    if not pops:
        return "-"
    name, n = Counter(pops).most_common(1)[0]
    return f"{name}" if n == len(pops) else f"{name} {n}/{len(pops)}"


def method_table(g: Group, region: str, metric: str = "dice", higher: bool = True,
                 digits: int = 3) -> str:
    header = ["method", "seeds", *POPULATIONS, "mean", "worst", "worst pop.", "gap best-worst"]
    rows = []
    for method in g.methods:
        s = g.summary(method, region, metric, higher)
        rows.append([METHODS[method], str(len(g.seeds(method))),
                     *(fmt_mean_sd(s["populations"][p], digits) for p in POPULATIONS),
                     fmt_mean_sd(s["mean"], digits), fmt_mean_sd(s["worst"], digits),
                     _worst_label(s["worst_population"]), fmt_mean_sd(s["gap"], digits)])
    return md_table(header, rows, ["l", "r"] + ["r"] * (len(header) - 2))


def paired_table(g: Group, a: str, others: Sequence[str]) -> str:
    """``a`` minus each of ``others``, per region: populations, mean, worst WT."""
    header = ["difference", "region", "seeds", *POPULATIONS, "mean", "worst", "gap"]
    rows = []
    for b in others:
        d = g.paired(a, b)
        if d is None:
            continue
        for region in REGIONS:
            rows.append([f"{METHODS[a]} - {METHODS[b]}", region, str(len(d["seeds"])),
                         *(fmt_mean_sd(d[region][p], 3) for p in POPULATIONS),
                         fmt_mean_sd(d[region]["mean"], 3), fmt_mean_sd(d[region]["worst"], 3),
                         fmt_mean_sd(d[region]["gap"], 3)])
    if not rows:
        return "(no method shares a seed with it yet)"
    return md_table(header, rows, ["l", "l", "r"] + ["r"] * (len(header) - 3))


TEACHERS_OF: dict[str, tuple[str, str]] = {"warm_student": ("warm_teacher", "warm_ensemble"),
                                           "fedkd": ("fedkd_teacher", "fedkd_ensemble"),
                                           "fedkd_trust": ("fedkd_teacher", "fedkd_ensemble")}
"""A distillation method's own teachers and their ensemble, where not phase 1's."""


def targets(g: Group, student: str = "student") -> list[tuple[str, str, bool]] | None:
    """The issue's four targets for ``student``: (target, measured, met); None when a method
    they need is missing."""
    teacher, ensemble = TEACHERS_OF.get(student, ("teacher", "ensemble"))
    need = ("fedavg", teacher, ensemble, student)
    if any(not g.seeds(m) for m in need):
        return None
    out = []
    d = g.paired(student, "fedavg")
    means = {r: mean_sd(d[r]["mean"])[0] for r in REGIONS}
    out.append(("student >= FedAvg on the mean Dice of WT, TC and ET",
                ", ".join(f"{r} {means[r]:+.3f}" for r in REGIONS),
                all(v >= 0 for v in means.values())))
    worst, gap = mean_sd(d["WT"]["worst"])[0], mean_sd(d["WT"]["gap"])[0]
    out.append((f"worst-population WT >= FedAvg's + {TARGET_MARGIN}, smaller best-worst gap",
                f"worst {worst:+.3f}, gap {gap:+.3f}",
                worst >= TARGET_MARGIN and gap < 0))
    t = g.paired(student, teacher)
    cells = [mean_sd(t[r][p])[0] for r in REGIONS for p in POPULATIONS]
    at_least = sum(v >= 0 for v in cells)
    lowest = min(cells)
    out.append((f"student >= own teacher in >= 13 of 15 cells, none below by > {TARGET_MARGIN}",
                f"{at_least} of 15; lowest {lowest:+.3f}",
                at_least >= 13 and lowest >= -TARGET_MARGIN))
    e = g.paired(student, ensemble)
    emeans = {r: mean_sd(e[r]["mean"])[0] for r in REGIONS}
    out.append(("student >= five-teacher ensemble on the mean of every region",
                ", ".join(f"{r} {emeans[r]:+.3f}" for r in REGIONS),
                all(v >= 0 for v in emeans.values())))
    return out


def targets_table(rows: Sequence[tuple[str, str, bool]]) -> str:
    return md_table(["target", "measured (mean over seeds)", "met"],
                    [[t, m, "yes" if ok else "**no**"] for t, m, ok in rows], ["l", "l", "c"])


def teacher_cells_table(g: Group, student: str = "student") -> str:
    """Student minus its own site's teacher, every population x region."""
    t = g.paired(student, "teacher")
    if t is None:
        return ""
    rows = [[r, *(fmt_mean_sd(t[r][p], 3) for p in POPULATIONS)] for r in REGIONS]
    return md_table(["region", *POPULATIONS], rows, ["l"] + ["r"] * len(POPULATIONS))


def cross_table(g: Group) -> str:
    runs = g.parts.get("teacher", {})
    if not runs:
        return ""
    header = ["teacher trained on \\ tested on", *POPULATIONS, "mean (others)"]
    rows = []
    for tp in POPULATIONS:
        cells, others = [tp], []
        for ep in POPULATIONS:
            per_region = [mean_sd([r["cross"][tp][ep][reg]["dice"] for r in runs.values()])[0]
                          for reg in REGIONS]
            text = " / ".join(f"{v:.2f}" for v in per_region)
            cells.append(f"**{text}**" if ep == tp else text)
            if ep != tp:
                others.append(per_region)
        cells.append(" / ".join(f"{sum(o[i] for o in others) / len(others):.2f}"
                                for i in range(len(REGIONS))))
        rows.append(cells)
    return md_table(header, rows, ["l"] + ["c"] * (len(header) - 1))


SUBSET_METHODS = ("student", "no_trust")
"""Where the missing-contrast scores are taken from: the first of these whose parts have them
(the preset's student makes them; its parts from before the change of default are ``no_trust``)."""


def subset_method(g: Group) -> str | None:
    return next((m for m in SUBSET_METHODS
                 if any("subsets" in p for p in g.parts.get(m, {}).values())), None)


def subset_means(g: Group) -> dict[str, dict[str, dict[str, float]]]:
    """subset -> population (and "mean") -> region -> the student's Dice over seeds."""
    method = subset_method(g)
    runs = [p for p in g.parts.get(method or "", {}).values() if "subsets" in p]
    out: dict[str, dict[str, dict[str, float]]] = {}
    if not runs:
        return out
    for subset in SUBSETS:
        name = "+".join(subset)
        out[name] = {p: {reg: mean_sd([r["subsets"][name][p][reg]["dice"] for r in runs])[0]
                         for reg in REGIONS} for p in POPULATIONS}
        out[name]["mean"] = {reg: sum(out[name][p][reg] for p in POPULATIONS) / len(POPULATIONS)
                             for reg in REGIONS}
    return out


def subset_table(g: Group) -> str:
    means = subset_means(g)
    if not means:
        return ""
    rows = [[name, *(" / ".join(f"{means[name][c][r]:.2f}" for r in REGIONS)
                     for c in (*POPULATIONS, "mean"))] for name in means]
    return md_table(["contrasts", *POPULATIONS, "mean"], rows, ["l"] + ["c"] * 6)


def lesion_table(g: Group, population: str = "MET") -> str:
    header = ["method", *(f"{r} lesion Dice" for r in REGIONS),
              *(f"{r} lesion HD95" for r in REGIONS)]
    rows = []
    for method in g.methods:
        cells = [METHODS[method]]
        for metric, digits in (("lesion_dice", 3), ("lesion_hd95", 1)):
            for region in REGIONS:
                cells.append(fmt_mean_sd(g.values(method, population, region, metric), digits))
        rows.append(cells)
    return md_table(header, rows, ["l"] + ["r"] * (len(header) - 1))


def schedule_table(g: Group) -> str:
    rows = []
    for method in g.methods:
        runs = list(g.parts[method].values())
        secs = [r.get("seconds", math.nan) for r in runs]
        rows.append([METHODS[method], runs[0].get("schedule", ""),
                     ", ".join(f"{k}={v}" for k, v in runs[0].get("changes", {}).items()) or "-",
                     f"{mean_sd(secs)[0]:.0f}"])
    return md_table(["method", "schedule per site", "changes to the preset", "seconds per seed"],
                    rows, ["l", "l", "l", "r"])


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def _heatmaps(plt, matrices: Sequence[tuple[str, list[list[float]]]], rows: Sequence[str],
              cols: Sequence[str], title: str, path: Path, height: float) -> Path:
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices) + 2.5, height),
                             sharey=True)
    for i, (ax, (name, matrix)) in enumerate(zip(np.atleast_1d(axes), matrices)):
        arr = np.array(matrix, dtype=float)
        im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        if i:  # the y axis is shared: hide, not replace, the labels of the other panels
            ax.tick_params(labelleft=False)
        ax.set_title(name)
        for (y, x), v in np.ndenumerate(arr):
            if math.isfinite(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.55 else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Dice")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_methods(g: Group, path: Path) -> Path:
    plt = pyplot()
    cols = [*POPULATIONS, "mean", "worst"]
    matrices = []
    for region in REGIONS:
        matrix = []
        for method in g.methods:
            s = g.summary(method, region)
            matrix.append([mean_sd(s["populations"][p])[0] for p in POPULATIONS]
                          + [mean_sd(s["mean"])[0], mean_sd(s["worst"])[0]])
        matrices.append((f"{region} Dice", matrix))
    return _heatmaps(plt, matrices, [METHODS[m] for m in g.methods], cols,
                     f"Dice on held-out phantom test cases ({g.title}, mean over seeds)", path,
                     height=0.42 * len(g.methods) + 1.8)


def plot_curves(g: Group, path: Path) -> Path | None:
    """Global model's Dice on the curve cases over the rounds: each distillation method and the
    labels-only baselines, per population (WT and TC), seed means."""
    methods = [m for m in g.methods if any(p.get("curve") for p in g.parts[m].values())]
    if not methods:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, len(POPULATIONS), figsize=(3.2 * len(POPULATIONS), 5.6),
                             sharex=True, sharey=True)
    for j, pop in enumerate(POPULATIONS):
        for i, region in enumerate(("WT", "TC")):
            ax = axes[i][j]
            for m in methods:
                curves = [p["curve"] for p in g.parts[m].values() if p.get("curve")]
                rounds = sorted({int(r) for c in curves for r in c})
                ys = [mean_sd([c[str(r)][pop][region]["dice"] for c in curves
                               if str(r) in c])[0] for r in rounds]
                ax.plot(rounds, ys, marker=".", label=METHODS[m])
            ax.set_title(f"{pop} {region}")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("Dice")
            if i == 1:
                ax.set_xlabel("round")
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Global model over the rounds ({g.title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _setup_lines(settings: QualitySettings) -> list[str]:
    run = settings.run(settings.seeds[0])
    counts = settings.train_counts()
    drop = (f"modality dropout {run.dropout_prob:g} on {run.dropout_contrasts}"
            if run.modality_dropout else "no modality dropout")
    return [
        "## Setup",
        "",
        f"- **Data**: phantoms (`simulation/phantoms.py`) at {settings.shape}^3, seed "
        f"{settings.data_seed}: per population "
        f"{', '.join(f'{p} {n}' for p, n in counts.items())} cases"
        f"{' (what `make synth` writes)' if settings.train_largest == 16 else ''}; "
        f"each site keeps a validation share of {run.val_fraction:g} as the preset does.",
        f"- **Test**: {settings.test_cases} held-out cases per population from another phantom "
        f"seed ({settings.test_seed}): other brains, other tumours; no training or validation "
        "step sees them. A population's score is the mean over its test cases (MONAI "
        "sliding-window inference on the model grid, probabilities brought back to the case's "
        "own grid, `fedbrats.common.metrics.brats.evaluate_case`), without test-time "
        "augmentation for every method.",
        f"- **Settings**: every method reads preset `{settings.preset}`: teacher "
        f"`{run.teacher_model}` ({run.teacher_epochs} epochs x {run.teacher_steps_per_epoch} "
        f"steps, lr {run.teacher_lr:g}), student `{run.student_model}` ({run.num_rounds} rounds "
        f"x {run.local_steps} local steps, lr {run.student_lr:g} {run.lr_schedule}, "
        f"student-heads {run.student_heads}), "
        f"{run.spacing:g} mm grid, crops {run.patch_size}^3, batch {run.batch_size}; {drop} for "
        f"every student; losses: supervised {run.supervised_weight:g}, logit "
        f"{run.logit_weight:g} (T = {run.temperature:g}, mask {run.kd_mask}, kd-trust "
        f"{run.kd_trust}), feature {run.feature_weight:g} ({run.feature_kind}); FedProx mu "
        f"{run.proximal_mu:g}. "
        f"Compute-matched FedAvg: {compute_matched_rounds(run)} rounds. A group at a fraction "
        "of the schedule scales teacher epochs and rounds alike.",
        "- **In-process federation**: the federated methods call every site's local training "
        "(`fedbrats.client.distill.distill_round`; labels-only baselines the same without the "
        "teacher) and average the returned state dicts, which is what Flower's FedAvg/FedProx "
        "compute; the Flower path itself is tested in `tests/simulation/test_simulation_e2e.py`.",
        "",
    ]


def _group_lines(g: Group, paths: Mapping[str, Path], index: int) -> list[str]:
    lines = [f"## {g.title}", "", schedule_table(g), ""]
    students = [m for m in g.methods if m in DISTILLATION_VARIANTS]
    for s in students:
        rows = targets(g, s)
        if rows:
            lines += [f"### The issue's targets: {METHODS[s]}", "", targets_table(rows), ""]
    for region in REGIONS:
        lines += [f"### {region} Dice", "", method_table(g, region), ""]
    lines += ["### WT HD95 (mm)", "", method_table(g, "WT", "hd95", False, 1), "",
              "### Predicted / true volume (under 1: under-segmentation)", ""]
    for region in ("TC", "ET"):
        lines += [f"{region}:", "", method_table(g, region, "volume_ratio", True, 2), ""]
    if "student" in g.methods:
        others = [m for m in ("fedavg", "fedavg_cm", "fedavg_heads", "ensemble", "teacher",
                              "fedavg_ft") if m in g.methods]
        lines += ["### Paired differences, per seed (mean +/- sd over the shared seeds)", "",
                  paired_table(g, "student", others), ""]
        for s in students:
            if s != "student":
                own = [m for m in TEACHERS_OF.get(s, ()) if m in g.methods]
                vs = [m for m in ("student", "fedavg", "fedavg_cm", "fedavg_heads")
                      if m in g.methods]
                lines += [paired_table(g, s, [*vs, *own]), ""]
        lines += ["### Student minus its own site's teacher", "", teacher_cells_table(g), ""]
    png = paths.get(f"methods_{index}")
    if png:
        lines += [f"![Dice per method and population]({png.name})", ""]
    curves = paths.get(f"curves_{index}")
    if curves:
        lines += ["### Over the rounds", "",
                  f"Dice of the global model on the first {3} test cases of each population "
                  "every few rounds.", "", f"![curves]({curves.name})", ""]
    if "teacher" in g.methods:
        lines += ["### Local teachers on every population", "",
                  "WT / TC / ET Dice (mean over seeds); bold: the teacher's own population.",
                  "", cross_table(g), ""]
    if subset_table(g):
        lines += ["### The student with missing contrasts", "",
                  f"{METHODS[subset_method(g)]}: WT / TC / ET Dice with only these contrasts "
                  "given (others zero-filled).", "",
                  subset_table(g), ""]
    lines += ["### MET lesion-wise (BraTS 2023: dilation 1, lesions over 2 mm^3)", "",
              lesion_table(g, "MET"), ""]
    return lines


def write_report(parts: Sequence[Part], out_dir: Path, command: str, seconds: float,
                 machine: Mapping[str, Any], prefix: str, settings: QualitySettings
                 ) -> dict[str, Path]:
    """``prefix``.md, .json and charts from every part."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_parts(parts)
    paths: dict[str, Path] = {"json": out_dir / f"{prefix}.json",
                              "markdown": out_dir / f"{prefix}.md"}
    for i, g in enumerate(groups):
        suffix = "" if i == 0 else f"-{i}"
        paths[f"methods_{i}"] = plot_methods(g, out_dir / f"{prefix}{suffix}.png")
        curves = plot_curves(g, out_dir / f"{prefix}{suffix}-curves.png")
        if curves:
            paths[f"curves_{i}"] = curves
    paths["json"].write_text(json.dumps({
        "command": command, "seconds": seconds, "machine": dict(machine),
        "groups": [{"title": g.title, "preset": g.preset, "fraction": g.fraction, "key": g.key,
                    "headline": g.headline(),
                    "targets": {s: targets(g, s) for s in g.methods
                                if s in DISTILLATION_VARIANTS}} for g in groups],
    }, indent=1, default=float))
    lines = [
        "# Quality benchmark: the fedbrats student against what a consortium runs today",
        "",
        *machine_markdown(machine, command, seconds),
        "",
        f"The methods that decide: {', '.join(METHODS[m] for m in DECIDING)}. Parts are "
        f"stored one per (fraction, seed, method) in `{prefix}-parts/` and merged here; "
        "the wall time above is that of the last command only.",
        "",
        *_setup_lines(settings),
    ]
    for i, g in enumerate(groups):
        lines += _group_lines(g, paths, i)
    lines += [f"Raw numbers: [`{paths['json'].name}`]({paths['json'].name}) and the parts.", ""]
    paths["markdown"].write_text("\n".join(lines))
    return paths


__all__ = ["Group", "group_parts", "targets", "write_report"]
