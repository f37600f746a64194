"""The end-of-run report: ``report.json``, ``report.md`` and two figures, from plain JSON-able data.

Plain functions, no Flower. The server collects three things during a run and hands them to
:func:`write_report`:

``sites``
    ``{site: {"info": {...}, "teacher": {region: {metric: value}} | None,
    "student": {region: {metric: value}} | None, "student_missing": {contrast: {region: {...}}}}}``,
    where the metrics are ``dice``, ``hd95``, ``lesion_dice``, ``lesion_hd95`` (means over the
    site's validation cases) and the counts ``tp``, ``fn``, ``fp``. A failed site has ``None``.
``rounds``
    ``[{"round": n, "train": {site: {"loss": ..., ...}}, "evaluate": {site: {region: {...}}}}]``
    (``evaluate`` optional).
``run``
    ``{"config": {...}, "started": iso, "finished": iso, "phase_seconds": {phase: seconds}}``.

Conventions: sites are listed in contract order (:data:`fedbrats.common.data.contract.POPULATIONS`),
any other
site after them in alphabetical order. Missing, non-finite or non-numeric values are ``null`` in
the JSON (which is strict: no ``NaN``/``Infinity`` tokens) and "—" in the Markdown. Each summary
difference is student minus teacher. The "mean (equal weight)" row weights every listed site
equally: its teacher (student) value is the mean over the sites that have a teacher (student)
value, and its difference is the mean of the per-site differences over the sites that have both
(the same number as student mean minus teacher mean whenever no value is missing).

matplotlib (Agg backend) and numpy are imported inside the plotting functions only, so importing
this module stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from fedbrats.common.data.contract import CONTRASTS, POPULATION_NAMES, POPULATIONS, REGIONS
from fedbrats.common.metrics.scores import COUNT_KEYS, mean_metrics
from fedbrats.common.metrics.scores import finite_or_none as _num
from fedbrats.common.utils.plotting import pyplot
from fedbrats.common.utils.tables import markdown_table

__all__ = [
    "COUNT_KEYS",
    "METRICS",
    "mean_metrics",
    "order_sites",
    "summarise",
    "summary_table",
    "to_jsonable",
    "write_report",
]

REPORT_FORMAT = "fedbrats-report/1"

METRICS: dict[str, str] = {
    "dice": "Dice",
    "hd95": "HD95 (mm)",
    "lesion_dice": "lesion-wise Dice",
    "lesion_hd95": "lesion-wise HD95 (mm)",
}
"""Metrics compared between teacher and student in the summary, with their display names."""

MISSING = "—"
"""How a missing value prints in Markdown."""

MEAN_LABEL = "mean (equal weight)"

FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "dice_png": "population_dice.png",
    "curves_png": "training_curves.png",
}

_REGIONS: tuple[str, ...] = tuple(REGIONS)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...`` or ``None`` where any level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    Mappings get string keys, tuples/sets become lists, numpy scalars and arrays become Python
    numbers and lists, NaN and infinities become ``None``, paths and datetimes become strings,
    anything else unknown becomes its ``str``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, datetime):
        return obj.isoformat()
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        try:
            return to_jsonable(tolist())
        except Exception:  # noqa: BLE001 - fall through to str
            pass
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Per-case means (client side)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _site_key(name: str) -> tuple[int, str]:
    code = str(name).strip().upper()
    if code in POPULATIONS:
        return (POPULATIONS.index(code), "")
    return (len(POPULATIONS), str(name))


def order_sites(names: Iterable[str]) -> list[str]:
    """Site names in contract order (case-insensitive match), then the others alphabetically."""
    return sorted(names, key=_site_key)


def _site_label(name: str) -> str:
    long = POPULATION_NAMES.get(str(name).strip().upper())
    return f"{name} ({long})" if long else str(name)


def _compare(teacher: float | None, student: float | None) -> dict[str, float | None]:
    diff = student - teacher if teacher is not None and student is not None else None
    return {"teacher": teacher, "student": student, "difference": diff}


def summarise(sites: Mapping[str, Any]) -> dict:
    """Teacher vs student per site, region and metric, plus the equal-weight mean over sites.

    Returns ``{"order": [...], "regions": [...], "metrics": [...],
    "populations": {site: {region: {metric: {"teacher", "student", "difference"}}}},
    "mean": {region: {metric: {"teacher", "student", "difference", "n_teacher", "n_student",
    "n_paired"}}}, "missing_modality": {site: {contrast: {region: {"dice", "drop"}}}},
    "failed": {"teacher": [...], "student": [...]}}``; every value a finite float or ``None``.
    ``drop`` is the student's full-input Dice minus its Dice without that contrast.
    """
    sites = sites if isinstance(sites, Mapping) else {}
    order = order_sites([str(k) for k in sites])
    by_name = {str(k): v for k, v in sites.items()}
    populations: dict = {}
    missing_modality: dict = {}
    failed: dict[str, list[str]] = {"teacher": [], "student": []}
    for name in order:
        site = by_name[name] if isinstance(by_name[name], Mapping) else {}
        for role in ("teacher", "student"):
            if not isinstance(site.get(role), Mapping):
                failed[role].append(name)
        populations[name] = {
            region: {
                metric: _compare(
                    _num(_get(site, "teacher", region, metric)),
                    _num(_get(site, "student", region, metric)),
                )
                for metric in METRICS
            }
            for region in _REGIONS
        }
        ablation = site.get("student_missing")
        if isinstance(ablation, Mapping) and ablation:
            contrasts = sorted(
                (str(c) for c in ablation),
                key=lambda c: (CONTRASTS.index(c) if c in CONTRASTS else len(CONTRASTS), c),
            )
            by_contrast = {str(c): v for c, v in ablation.items()}
            missing_modality[name] = {}
            for contrast in contrasts:
                row = {}
                for region in _REGIONS:
                    dice = _num(_get(by_contrast[contrast], region, "dice"))
                    full = _num(_get(site, "student", region, "dice"))
                    drop = full - dice if full is not None and dice is not None else None
                    row[region] = {"dice": dice, "drop": drop}
                missing_modality[name][contrast] = row

    mean: dict = {}
    for region in _REGIONS:
        mean[region] = {}
        for metric in METRICS:
            cells = [populations[name][region][metric] for name in order]
            teachers = [c["teacher"] for c in cells if c["teacher"] is not None]
            students = [c["student"] for c in cells if c["student"] is not None]
            diffs = [c["difference"] for c in cells if c["difference"] is not None]
            mean[region][metric] = {
                "teacher": _mean(teachers),
                "student": _mean(students),
                "difference": _mean(diffs),
                "n_teacher": len(teachers),
                "n_student": len(students),
                "n_paired": len(diffs),
            }
    return {
        "order": order,
        "regions": list(_REGIONS),
        "metrics": list(METRICS),
        "populations": populations,
        "mean": mean,
        "missing_modality": missing_modality,
        "failed": failed,
        "baseline": _baseline_dice(order, by_name),
    }


def _baseline_dice(order: list[str], sites: Mapping[str, Any]) -> dict:
    """``{site: {region: {"teacher", "fedavg", "student", "student - fedavg",
    "student - teacher"}}}`` Dice when the run trained the FedAvg baseline, else ``{}``."""
    if not any(isinstance(v, Mapping) and isinstance(v.get("baseline"), Mapping)
               for v in sites.values()):
        return {}
    out: dict = {}
    for name in order:
        site = sites[name] if isinstance(sites[name], Mapping) else {}
        out[name] = {}
        for region in _REGIONS:
            t, b, st = (_num(_get(site, role, region, "dice"))
                        for role in ("teacher", "baseline", "student"))
            out[name][region] = {
                "teacher": t, "fedavg": b, "student": st,
                "student - fedavg": st - b if st is not None and b is not None else None,
                "student - teacher": st - t if st is not None and t is not None else None,
            }
    return out


def _baseline_markdown(summary: Mapping) -> list[str]:
    """Teacher, FedAvg baseline and student Dice per population and region, with differences."""
    table = summary.get("baseline") or {}
    if not table:
        return []
    cols = ("teacher", "fedavg", "student", "student - fedavg", "student - teacher")
    header = ["population"] + [f"{r} {c}" for r in _REGIONS for c in cols]
    rows = []
    for name, regions in table.items():
        rows.append([_site_label(name)] + [
            _fmt(regions[r][c], signed=c.startswith("student -")) for r in _REGIONS for c in cols])
    means = []
    for r in _REGIONS:
        for c in cols:
            vals = [regions[r][c] for regions in table.values() if regions[r][c] is not None]
            means.append(_fmt(_mean(vals), signed=c.startswith("student -")))
    rows.append(["mean (equal weight)"] + means)
    return ["## Dice: teacher, FedAvg baseline and student", "",
            "The labels-only FedAvg model (`baseline = \"fedavg\"`) trained with the student's "
            "rounds, schedule and modality dropout in the same run, on each site's validation "
            "cases.", "", _table(header, rows), ""]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    v = _num(value)
    if v is None:
        return MISSING
    if signed:
        text = f"{v:+.{digits}f}"
        # a difference that rounds to zero prints as +0.000, never -0.000
        return text.replace("-", "+", 1) if float(text) == 0 else text
    return f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A markdown table; by default the first column left-aligned, the others right-aligned."""
    return markdown_table(header, rows, align or ["l"] + ["r"] * (len(header) - 1))


def _metric_table(summary: Mapping, metric: str, digits: int = 3) -> str:
    """Population x region table of teacher, student and (signed) difference of ``metric``."""
    header = ["population"]
    for region in summary.get("regions", _REGIONS):
        header += [f"{region} teacher", f"{region} student", f"{region} diff"]
    rows = []
    regions = summary.get("regions", _REGIONS)
    for name in summary.get("order", []):
        row = [_site_label(name)]
        for region in regions:
            c = _get(summary, "populations", name, region, metric) or {}
            row += [
                _fmt(c.get("teacher"), digits),
                _fmt(c.get("student"), digits),
                _fmt(c.get("difference"), digits, signed=True),
            ]
        rows.append(row)
    row = [f"**{MEAN_LABEL}**"]
    for region in regions:
        c = _get(summary, "mean", region, metric) or {}
        row += [
            _fmt(c.get("teacher"), digits),
            _fmt(c.get("student"), digits),
            _fmt(c.get("difference"), digits, signed=True),
        ]
    rows.append(row)
    return _table(header, rows)


def summary_table(report_or_sites: Any) -> str:
    """The population x region teacher/student/difference Dice table, as Markdown.

    Accepts a report (the dict :func:`write_report` writes, with ``summary``), a path to a
    ``report.json``, a summary from :func:`summarise`, or a ``sites`` dict.
    """
    obj = report_or_sites
    if isinstance(obj, (str, Path)):
        obj = json.loads(Path(obj).read_text(encoding="utf-8"))
    summary = _find_summary(obj)
    title = "Dice per population: teacher vs student (diff = student - teacher)"
    return f"{title}\n\n{_metric_table(summary, 'dice')}\n"


def _find_summary(obj: Any) -> dict:
    if isinstance(obj, Mapping):
        s = obj.get("summary")
        if isinstance(s, Mapping) and isinstance(s.get("populations"), Mapping):
            return dict(s)
        if isinstance(obj.get("populations"), Mapping) and isinstance(obj.get("mean"), Mapping):
            return dict(obj)
        if isinstance(obj.get("sites"), Mapping) and "run" in obj:
            return summarise(obj["sites"])
        return summarise(obj)
    return summarise({})


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return MISSING
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {sec:02d} s" if hours else f"{minutes} min {sec:02d} s"


def _config_value(config: Any, key: str) -> Any:
    if not isinstance(config, Mapping):
        return None
    for k in (key, key.replace("_", "-")):
        if k in config and config[k] not in (None, "", -1):
            return config[k]
    return None


def _elapsed(run: Mapping) -> float | None:
    try:
        start = datetime.fromisoformat(str(run["started"]))
        end = datetime.fromisoformat(str(run["finished"]))
        return (end - start).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _round_sites(rounds: list, section: str) -> list[str]:
    names = set()
    for r in rounds:
        part = r.get(section) if isinstance(r, Mapping) else None
        if isinstance(part, Mapping):
            names.update(str(k) for k in part)
    return order_sites(names)


def _round_number(r: Any, index: int) -> Any:
    n = r.get("round") if isinstance(r, Mapping) else None
    return n if n is not None else index + 1


def _privacy_markdown(privacy: Any) -> list[str]:
    """The "Differential privacy" section: what was spent, and what it covers."""
    if not isinstance(privacy, Mapping):
        return []
    eps = _num(privacy.get("epsilon"))
    order = _num(privacy.get("optimal_order"))
    out = [
        "## Differential privacy",
        "",
        f"- **guarantee:** ({'∞' if eps is None else f'{eps:.3g}'}, {privacy.get('delta')})-DP "
        f"per {privacy.get('unit', 'site')}, after {privacy.get('rounds')} noisy rounds"
        + (f" (RDP order {order:.3g})" if order is not None else ""),
        f"- **mechanism:** {privacy.get('mechanism', MISSING)}",
        f"- **noise multiplier:** {privacy.get('noise_multiplier')}; **clipping norm:** "
        f"{privacy.get('clipping_norm')}; noise std on the mean "
        f"{_fmt(privacy.get('noise_std'), 4)} over {privacy.get('num_sites')} sites",
        f"- **accountant:** {privacy.get('accountant', MISSING)}",
        f"- **covers:** {privacy.get('covers', MISSING)}",
    ]
    if privacy.get("rounds_with_fewer_sites"):
        out.append("- rounds with fewer sites (accounted with the smaller effective noise "
                   f"multiplier): {', '.join(map(str, privacy['rounds_with_fewer_sites']))}")
    if privacy.get("note"):
        out.append(f"- **note:** {privacy['note']}")
    return out + [""]


def _tta_note(config: Mapping) -> str:
    tta = _config_value(config, "final_tta")
    if tta is None:
        return ""
    if tta:
        return (" Both segment with flip test-time augmentation (softmax averaged over 8 flipped "
                "copies; run setting final-tta).")
    return " Single-pass segmentation (no test-time augmentation)."


def _dropout_note(config: Mapping) -> str:
    """Which contrasts the student learnt to do without (run settings modality-dropout,
    dropout-prob, dropout-contrasts)."""
    on = _config_value(config, "modality_dropout")
    if on is None:
        return ""
    if not on:
        return " The student was trained without modality dropout."
    which = _config_value(config, "dropout_contrasts") or "all"
    prob = _config_value(config, "dropout_prob")
    every = "every contrast" if which.strip() == "all" else f"only {which.replace(',', ', ')}"
    each = f" (each with probability {prob:g})" if isinstance(prob, int | float) else ""
    return (f" In training, modality dropout removed {every}{each}; a contrast it never "
            "removed is one the student did not learn to do without.")


def _facts_markdown(run: Mapping, config: Mapping, rounds: list) -> list[str]:
    """The title and the run's facts: settings, rounds, start, end and durations."""
    phases = run.get("phase_seconds") if isinstance(run.get("phase_seconds"), Mapping) else {}
    out = ["# fedbrats report: federated multi-population distillation", ""]

    def fact(label: str, value: Any) -> None:
        out.append(f"- **{label}:** {MISSING if value in (None, '') else value}")

    fact("preset", _config_value(config, "preset"))
    planned = _config_value(config, "num_rounds")
    fact("rounds", f"{len(rounds)} completed" + (f" of {planned}" if planned is not None else ""))
    fact("strategy", _config_value(config, "strategy"))
    fact("aggregation", _config_value(config, "aggregation"))
    for key, label in (("teacher_model", "teacher model"), ("student_model", "student model")):
        if _config_value(config, key) is not None:
            fact(label, _config_value(config, key))
    fact("started", run.get("started"))
    fact("finished", run.get("finished"))
    if phases:
        fact("durations", ", ".join(f"{k} {_duration(v)}" for k, v in phases.items()))
    total = _elapsed(run)
    if total is None and phases:
        vals = [_num(v) for v in phases.values()]
        total = sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None
    fact("total time", _duration(total))
    return out + [""]


def _sites_markdown(sites: Mapping, summary: Mapping) -> list[str]:
    """The "Sites" section: case counts, contrasts and which results are missing, per site."""
    rows = []
    for name in summary.get("order", []):
        site = sites.get(name) if isinstance(sites.get(name), Mapping) else {}
        info = site.get("info") if isinstance(site.get("info"), Mapping) else {}
        contrasts = info.get("contrasts")
        contrasts = ", ".join(map(str, contrasts)) if isinstance(contrasts, (list, tuple)) else None
        status = [role for role in ("teacher", "student") if name in summary["failed"][role]]
        rows.append(
            [
                _site_label(name),
                MISSING if info.get("num_train") is None else str(info.get("num_train")),
                MISSING if info.get("num_val") is None else str(info.get("num_val")),
                MISSING if info.get("num_synthetic") is None else str(info.get("num_synthetic")),
                contrasts or MISSING,
                "ok" if not status else "no " + " / ".join(status) + " result",
            ]
        )
    if not rows:
        return ["## Sites", "", "No sites reported.", ""]
    header = ["population", "train cases", "val cases", "synthetic cases", "contrasts",
              "status"]
    return ["## Sites", "", _table(header, rows, ["l", "r", "r", "r", "l", "l"]),
            "Synthetic cases: those whose NIfTI headers carry fedbrats' synthetic-data mark "
            "(its phantoms); a site with data-kind 'real' refuses them.", ""]


def _scores_markdown(summary: Mapping, config: Mapping) -> list[str]:
    """The four teacher-vs-student sections (Dice, lesion-wise Dice, HD95, lesion-wise HD95),
    with a note on how the means treat missing values when some are missing."""
    sections = [
        ("## Dice: teacher vs student",
         "Mean over each site's validation cases; diff = student - teacher (higher is better)."
         + _tta_note(config), "dice", 3),
        ("## Lesion-wise Dice: teacher vs student",
         "BraTS 2023 lesion-wise Dice; diff = student - teacher (higher is better).",
         "lesion_dice", 3),
        ("## HD95 (mm): teacher vs student",
         "95th-percentile Hausdorff distance in mm, lower is better; diff = student - teacher.",
         "hd95", 2),
        ("## Lesion-wise HD95 (mm): teacher vs student",
         "Lower is better; diff = student - teacher.", "lesion_hd95", 2),
    ]
    out: list[str] = []
    for heading, text, metric, digits in sections:
        out += [heading, "", text, "", _metric_table(summary, metric, digits=digits), ""]
    return out + _unpaired_note(summary)


def _unpaired_note(summary: Mapping) -> list[str]:
    """Which results are missing and what the mean rows then are; nothing when none is."""
    unpaired = any(
        not (c["n_paired"] == c["n_teacher"] == c["n_student"])
        for region in summary["mean"].values()
        for c in region.values()
    )
    if not unpaired:
        return []
    failed = "; ".join(
        f"no {role} result: {', '.join(names)}"
        for role, names in summary["failed"].items()
        if names
    )
    return [
        f"Some values are missing ({failed or 'see the dashes above'}). In the mean "
        "rows, teacher and student are means over the sites that have them, and diff is "
        "the mean of the per-site differences (sites with both).",
        "",
    ]


def _ablation_markdown(summary: Mapping, config: Mapping) -> list[str]:
    """The "Student with one contrast removed" section; nothing without that ablation."""
    ablation = summary.get("missing_modality") or {}
    if not ablation:
        return []
    contrasts: list[str] = []
    for per in ablation.values():
        contrasts += [c for c in per if c not in contrasts]
    rows = []
    for name, per in ablation.items():
        full = " / ".join(
            _fmt(_get(summary, "populations", name, r, "dice", "student")) for r in _REGIONS
        )
        row = [_site_label(name), full]
        for c in contrasts:
            row.append(
                " / ".join(_fmt(_get(per, c, r, "dice")) for r in _REGIONS)
                if c in per
                else MISSING
            )
        rows.append(row)
    return [
        "## Student with one contrast removed",
        "",
        "Dice WT / TC / ET of the student with all contrasts, and with each contrast "
        "removed (filled as a missing contrast)." + _dropout_note(config),
        "",
        _table(["population", "all contrasts"] + [f"without {c}" for c in contrasts], rows),
        "",
    ]


def _training_markdown(rounds: list) -> list[str]:
    """The "Training loss per round" section."""
    out = ["## Training loss per round", ""]
    train_sites = _round_sites(rounds, "train")
    if not (rounds and train_sites):
        return out + ["No distillation rounds were recorded.", ""]
    rows = []
    for i, r in enumerate(rounds):
        train = r.get("train") if isinstance(r, Mapping) else None
        rows.append(
            [str(_round_number(r, i))] + [_fmt(_get(train, s, "loss"), 4) for s in train_sites]
        )
    return out + [
        "Mean local distillation loss of each site's student update.",
        "",
        _table(["round"] + train_sites, rows),
        "",
    ]


def _evaluation_markdown(rounds: list) -> list[str]:
    """The "Student WT Dice per round" section; nothing without a federated evaluation."""
    eval_sites = _round_sites(rounds, "evaluate")
    if not eval_sites:
        return []
    rows = []
    for i, r in enumerate(rounds):
        ev = r.get("evaluate") if isinstance(r, Mapping) else None
        if not ev:  # a round without evaluation (eval-every)
            continue
        rows.append(
            [str(_round_number(r, i))] + [_fmt(_get(ev, s, "WT", "dice")) for s in eval_sites]
        )
    return ["## Student WT Dice per round", "", _table(["round"] + eval_sites, rows), ""]


def _figures_markdown() -> list[str]:
    """Links to the two figures, and the figures themselves."""
    return [
        "## Figures",
        "",
        f"- [Dice per population, teacher vs student]({FILES['dice_png']})",
        f"- [Training curves]({FILES['curves_png']})",
        "",
        f"![Dice per population]({FILES['dice_png']})",
        "",
        f"![Training curves]({FILES['curves_png']})",
        "",
    ]


def _postprocess_markdown(sites: Mapping, summary: Mapping, config: Mapping) -> list[str]:
    """The thresholds the federation chose (run setting ``postprocess-tuning``), and per site
    the mean lesion-wise Dice of its validation cases at the defaults and at the thresholds it
    uses."""
    rows = []
    for name in summary.get("order", []):
        site = sites.get(name) if isinstance(sites.get(name), Mapping) else {}
        pp = site.get("postprocess")
        if not isinstance(pp, Mapping):
            continue
        t = pp.get("thresholds") if isinstance(pp.get("thresholds"), Mapping) else {}
        rows.append([_site_label(name), _fmt(t.get("min_component_mm3"), 0),
                     _fmt(t.get("et_min_mm3"), 0), _fmt(pp.get("default")),
                     _fmt(pp.get("tuned")), _fmt(pp.get("gain"), signed=True)])
    if not rows:
        return []
    header = ["population", "min component mm^3", "ET min mm^3", "lesion Dice, defaults",
              "lesion Dice, tuned", "gain"]
    return ["## Post-processing tuned by the federation", "",
            f"`postprocess-tuning = {config.get('postprocess_tuning', '?')}`: every site scored "
            "a grid of thresholds on its validation cases (mean lesion-wise Dice over WT, TC and "
            "ET) and returned only the scores; student.pt holds the thresholds below (defaults: "
            "50 and 100 mm^3). The gain is measured on the same cases the thresholds were "
            "chosen on, so it is optimistic; see docs/bench/postprocess-tuning.md for held-out "
            "cases.", "", _table(header, rows, ["l", "r", "r", "r", "r", "r"]), ""]


def _personal_markdown(sites: Mapping, summary: Mapping) -> list[str]:
    """Run setting ``personalise``: each site's fine-tuned student beside the federated one,
    both single-pass on the site's validation cases."""
    rows = []
    for name in summary.get("order", []):
        site = sites.get(name) if isinstance(sites.get(name), Mapping) else {}
        base, own = site.get("personal_base"), site.get("personal")
        if not isinstance(base, Mapping) or not isinstance(own, Mapping):
            continue
        row = [_site_label(name)]
        for region in _REGIONS:
            a = (base.get(region) or {}).get("dice")
            b = (own.get(region) or {}).get("dice")
            row += [_fmt(a), _fmt(b), _fmt(None if a is None or b is None else b - a,
                                           signed=True)]
        rows.append([*row, str(site.get("personal_steps", MISSING))])
    if not rows:
        return []
    header = ["population"] + [f"{r} {w}" for r in _REGIONS
                               for w in ("federated", "own", "diff")] + ["steps"]
    return ["## The sites' own models (`personalise`)", "",
            "Each site fine-tuned the final student on its own training cases (volume-"
            "stratified folds, early stopping on the held-out fold) and keeps it in its work "
            "folder (`personal-student.pt`); Dice on its validation cases, single pass.", "",
            _table(header, rows), ""]


def _markdown(run: Mapping, sites: Mapping, rounds: list, summary: Mapping) -> str:
    config = run.get("config") if isinstance(run.get("config"), Mapping) else {}
    out = _facts_markdown(run, config, rounds)
    out += _sites_markdown(sites, summary)
    out += _scores_markdown(summary, config)
    out += _baseline_markdown(summary)
    out += _postprocess_markdown(sites, summary, config)
    out += _personal_markdown(sites, summary)
    out += _ablation_markdown(summary, config)
    out += _training_markdown(rounds)
    out += _evaluation_markdown(rounds)
    out += _privacy_markdown(run.get("privacy"))
    out += _figures_markdown()
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_population_dice(summary: Mapping, path: Path) -> Path:
    """Grouped bars, teacher vs student Dice per population, one subplot per region."""
    plt = pyplot()
    order = list(summary.get("order", []))
    regions = list(summary.get("regions", _REGIONS))
    fig, axes = plt.subplots(1, len(regions), figsize=(12, 4), sharey=True, squeeze=False)
    baseline = summary.get("baseline") or {}
    bars = [("teacher", "#4c72b0"), ("student", "#dd8452")]
    if baseline:
        bars.insert(1, ("fedavg", "#55a868"))
    width = 0.76 / len(bars)
    try:
        for ax, region in zip(axes[0], regions):
            for k, (role, color) in enumerate(bars):
                offset = (k - (len(bars) - 1) / 2) * width
                xs, hs = [], []
                for i, name in enumerate(order):
                    if baseline:
                        v = _num(_get(baseline, name, region, role))
                    else:
                        v = _num(_get(summary, "populations", name, region, "dice", role))
                    if v is None:
                        ax.text(
                            i + offset,
                            0.02,
                            "n/a",
                            rotation=90,
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color="0.4",
                        )
                    else:
                        xs.append(i + offset)
                        hs.append(min(max(v, 0.0), 1.0))
                ax.bar(xs, hs, width=width, label=role, color=color)
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order)
            ax.set_xlim(-0.6, max(len(order), 1) - 0.4)
            ax.set_ylim(0.0, 1.0)
            ax.set_title(region)
            ax.set_xlabel("population")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("Dice (mean over validation cases)")
        axes[0][0].legend(loc="upper right", fontsize=8)
        fig.suptitle("Teacher, FedAvg baseline and distilled student, per population"
                     if baseline else "Teacher vs distilled student, per population")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def plot_training_curves(rounds: list, path: Path) -> Path:
    """Per-site training loss by round and, if recorded, the per-round student WT Dice."""
    plt = pyplot()
    train_sites = _round_sites(rounds, "train")
    eval_sites = _round_sites(rounds, "evaluate")
    ncols = 2 if eval_sites else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    xs = [_round_number(r, i) for i, r in enumerate(rounds)]
    xs = [x if _num(x) is not None else i + 1 for i, x in enumerate(xs)]
    nan = float("nan")
    from matplotlib.ticker import MaxNLocator

    all_sites = order_sites(set(train_sites) | set(eval_sites))
    colors = {s: f"C{i % 10}" for i, s in enumerate(all_sites)}  # one colour per site
    try:
        ax = axes[0][0]
        for s in train_sites:
            ys = [_num(_get(r, "train", s, "loss")) for r in rounds]
            ax.plot(xs, [nan if y is None else y for y in ys], marker="o", label=s, color=colors[s])
        if not train_sites:
            ax.text(
                0.5,
                0.5,
                "no rounds recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
        else:
            ax.legend(fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("training loss (student)")
        ax.set_title("Local distillation loss per site")
        ax.grid(alpha=0.3)
        if eval_sites:
            ax = axes[0][1]
            for s in eval_sites:  # only the evaluated rounds (eval-every), joined by lines
                pts = [(x, _num(_get(r, "evaluate", s, "WT", "dice"))) for x, r in zip(xs, rounds)]
                pts = [(x, y) for x, y in pts if y is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=s,
                        color=colors[s])
            ax.set_ylim(0.0, 1.0)
            ax.set_xlabel("round")
            ax.set_ylabel("student WT Dice")
            ax.set_title("Federated evaluation of the student")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        for ax in axes[0]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_report(run_dir: Path, run: dict, sites: dict, rounds: list) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``population_dice.png`` and ``training_curves.png``.

    Returns ``{"json": path, "markdown": path, "dice_png": path, "curves_png": path}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = to_jsonable(run) if isinstance(run, Mapping) else {}
    sites_in = to_jsonable(sites) if isinstance(sites, Mapping) else {}
    rounds = [r for r in to_jsonable(list(rounds or [])) if isinstance(r, Mapping)]
    summary = summarise(sites_in)
    ordered_sites = {name: sites_in[name] for name in summary["order"]}

    report = {
        "format": REPORT_FORMAT,
        "run": run,
        "populations": summary["order"],
        "summary": summary,
        "sites": ordered_sites,
        "rounds": rounds,
    }
    if isinstance(run.get("privacy"), Mapping):
        report["privacy"] = run["privacy"]
    paths = {key: run_dir / name for key, name in FILES.items()}
    paths["json"].write_text(
        json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(_markdown(run, ordered_sites, rounds, summary), encoding="utf-8")
    plot_population_dice(summary, paths["dice_png"])
    plot_training_curves(rounds, paths["curves_png"])
    return paths
