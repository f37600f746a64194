"""Is the uncertainty right? ``fedbrats evaluate --uncertainty DIR``.

``fedbrats predict --uncertainty entropy|tta`` writes, per case, an uncertainty map
(``<case>_entropy.nii.gz`` or ``<case>_tta_var.nii.gz``) and the softmax probability of the
predicted class (``<case>_confidence.nii.gz``). Against the ground truth this module measures how
well they predict the segmentation's errors:

* **voxel Spearman**: the rank correlation, over a case's voxels, between the uncertainty and
  the error (1 where the predicted label differs from the true one, else 0). With a 0/1 error
  it is bounded even for a perfect ranking: ``sqrt(3 e (1 - e))`` for an error rate ``e``
  without ties (0.38 at 5 % errors), so read it beside the AURC and its optimum;
* **ECE**: the expected calibration error of the softmax, ``sum_b n_b / N * |acc_b - conf_b|``
  over 15 equal-width confidence bins (Guo et al. 2017), per case and pooled over all cases;
* **AURC**: the area under the risk-coverage curve: keep the voxels from the most certain up,
  and the error rate among those kept (lower is better); the AURC of a perfect ranking (every
  error less certain than every correct voxel) is reported beside it, and the curve pooled over
  the cases is drawn in ``risk_coverage.png`` with that of a perfect ranking;
* **case Spearman**: across cases, the rank correlation between a case's mean uncertainty over
  its predicted whole tumour and its WT error (1 - Dice): the case-level figure that the
  uncertainty-aware nnU-Net reports (0.750).

The voxels counted in a case are those the network scored: where the uncertainty map is not 0,
or either segmentation has tumour. Outside the brain's bounding box ``predict`` writes exactly 0
uncertainty (it never ran the network there), and including those millions of certain, correct
background voxels would make every figure look good.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ECE_BINS = 15
KINDS = {"entropy": "_entropy", "tta": "_tta_var"}
"""Uncertainty map kinds and their file name suffixes (as ``predict`` writes them)."""
_MAP = re.compile(r"^(?P<id>.+)_(?P<kind>entropy|tta_var|confidence)\.nii(?:\.gz)?$")
CASE_COLUMNS = ("case_id", "kind", "voxels", "error_rate", "spearman", "ece", "aurc",
                "aurc_optimal", "mean_confidence", "wt_dice", "wt_mean_uncertainty")


class UncertaintyError(ValueError):
    """A folder or map that cannot be used; the message names the file, what was expected and
    what was found."""


@dataclass
class UncertaintyFiles:
    maps: dict[str, Path] = field(default_factory=dict)
    """case id -> its uncertainty map."""
    confidence: dict[str, Path] = field(default_factory=dict)
    kind: str = ""


def find_maps(folder: str | Path) -> UncertaintyFiles:
    """The uncertainty maps (one kind for all cases) and confidence maps in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UncertaintyError(f"--uncertainty {folder}: no such folder (expected the --out of "
                               "`fedbrats predict --uncertainty entropy|tta`)")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.rglob("*.nii*")):
        if m := _MAP.match(path.name):
            found.setdefault(m.group("kind"), {})[m.group("id")] = path
    kinds = [k for k in ("entropy", "tta_var") if k in found]
    if not kinds:
        raise UncertaintyError(
            f"--uncertainty {folder}: no uncertainty map (expected <case>_entropy.nii.gz or "
            "<case>_tta_var.nii.gz, as `fedbrats predict --uncertainty entropy|tta` writes)")
    if len(kinds) > 1:
        raise UncertaintyError(f"--uncertainty {folder}: both entropy and tta_var maps; expected "
                               "one kind (predict with one --uncertainty per folder)")
    kind = "entropy" if kinds[0] == "entropy" else "tta"
    return UncertaintyFiles(found[kinds[0]], found.get("confidence", {}), kind)


def _read(path: Path, shape: tuple[int, ...], affine: np.ndarray, what: str) -> np.ndarray:
    import nibabel as nib

    from fedbrats.common.data.cases import AFFINE_TOLERANCE_MM

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many kinds for a torn or foreign file
        raise UncertaintyError(f"{what} {path}: unreadable NIfTI ({type(e).__name__}: {e})") \
            from None
    if data.shape != tuple(shape):
        raise UncertaintyError(f"{what} {path}: shape {data.shape}, expected the ground truth's "
                               f"{tuple(shape)}")
    if not np.allclose(img.affine, affine, atol=AFFINE_TOLERANCE_MM):
        raise UncertaintyError(f"{what} {path}: affine differs from the ground truth's (expected "
                               "the same grid)")
    if not np.isfinite(data).all():
        raise UncertaintyError(f"{what} {path}: contains NaN or inf")
    return data


def ece_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Per bin ``(count, sum of confidence, sum of correct)``: ``bins x 3``, to add over cases."""
    index = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    out = np.zeros((bins, 3), dtype=np.float64)
    out[:, 0] = np.bincount(index, minlength=bins)
    out[:, 1] = np.bincount(index, weights=confidence, minlength=bins)
    out[:, 2] = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    return out


def ece_of(table: np.ndarray) -> float:
    """The expected calibration error of :func:`ece_bins` counts."""
    n = table[:, 0].sum()
    if n == 0:
        return math.nan
    used = table[:, 0] > 0
    gap = np.abs(table[used, 2] - table[used, 1]) / table[used, 0]
    return float((table[used, 0] / n * gap).sum())


def risk_coverage(uncertainty: np.ndarray, error: np.ndarray,
                  points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, risk)`` at ``points`` coverages: voxels kept from the most certain up (ties
    broken by a stable sort), and the error rate among them."""
    order = np.argsort(uncertainty, kind="stable")
    cum = np.cumsum(error[order].astype(np.float64))
    n = len(order)
    kept = np.unique(np.linspace(1, n, num=min(points, n)).astype(np.int64))
    return kept / n, cum[kept - 1] / kept


def aurc(coverage: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk-coverage curve (trapezoids)."""
    if len(coverage) < 2:
        return float(risk[0]) if len(risk) else math.nan
    return float(np.trapezoid(risk, coverage))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get mean ranks); NaN when either is constant."""
    from scipy import stats

    if a.size < 3 or np.all(a == a.flat[0]) or np.all(b == b.flat[0]):
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def case_figures(pred: np.ndarray, gt: np.ndarray, unc: np.ndarray,
                 confidence: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One case's figures (``CASE_COLUMNS`` but the id and kind) and what pooling needs."""
    roi = (unc != 0) | (pred > 0) | (gt > 0)
    error = (pred != gt)[roi]
    u = unc[roi]
    cov, risk = risk_coverage(u, error)
    e = float(error.mean()) if error.size else math.nan
    ideal_cov, ideal_risk = risk_coverage(error.astype(np.float32), error)
    wt_pred = pred > 0
    figures: dict[str, Any] = {
        "voxels": int(roi.sum()), "error_rate": e, "spearman": spearman(u, error),
        "aurc": aurc(cov, risk), "aurc_optimal": aurc(ideal_cov, ideal_risk),
        "ece": math.nan, "mean_confidence": math.nan,
        "wt_dice": _dice(wt_pred, gt > 0),
        "wt_mean_uncertainty": float(unc[wt_pred].mean()) if wt_pred.any() else math.nan,
    }
    pooled = {"error": error, "uncertainty": u}
    if confidence is not None:
        c = confidence[roi]
        table = ece_bins(c, ~error)
        figures["ece"] = ece_of(table)
        figures["mean_confidence"] = float(c.mean()) if c.size else math.nan
        pooled["ece_table"] = table
    return figures, pooled


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass
class UncertaintyResult:
    kind: str
    per_case: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """Scored cases without an uncertainty map."""
    failed: list[str] = field(default_factory=list)
    pooled_ece: float = math.nan
    case_spearman: float = math.nan
    curve: tuple[np.ndarray, np.ndarray] | None = None
    ideal: tuple[np.ndarray, np.ndarray] | None = None


def evaluate_uncertainty(pairs: Sequence[Any], folder: str | Path, labels: str,
                         pred_labels: str | None = None,
                         sample: int = 2_000_000, seed: int = 0) -> UncertaintyResult:
    """The figures of the module docstring for every pair (``CasePair`` of
    :func:`~fedbrats.common.metrics.evaluate.pair_cases`) that has a map in ``folder``. The
    pooled risk-coverage curve uses at most ``sample`` voxels (a seeded random subset)."""
    from fedbrats.common.metrics.evaluate import EvaluationError, load_pair

    files = find_maps(folder)
    result = UncertaintyResult(files.kind)
    tables, errors, uncs = [], [], []
    for pair in pairs:
        path = files.maps.get(pair.case_id)
        if path is None:
            result.missing.append(pair.case_id)
            continue
        try:
            pred, gt, affine = load_pair(pair, labels, pred_labels)
            unc = _read(path, gt.shape, affine, f"case {pair.case_id}: uncertainty map")
            conf_path = files.confidence.get(pair.case_id)
            conf = (_read(conf_path, gt.shape, affine, f"case {pair.case_id}: confidence map")
                    if conf_path else None)
        except (EvaluationError, UncertaintyError) as e:
            result.failed.append(str(e))
            continue
        figures, pooled = case_figures(pred, gt, unc, conf)
        result.per_case[pair.case_id] = {"case_id": pair.case_id, "kind": files.kind, **figures}
        if "ece_table" in pooled:
            tables.append(pooled["ece_table"])
        errors.append(pooled["error"])
        uncs.append(pooled["uncertainty"])
    if tables:
        result.pooled_ece = ece_of(np.sum(tables, axis=0))
    if errors:
        error, unc = np.concatenate(errors), np.concatenate(uncs)
        if error.size > sample:
            keep = np.random.default_rng(seed).choice(error.size, sample, replace=False)
            error, unc = error[keep], unc[keep]
        result.curve = risk_coverage(unc, error)
        result.ideal = risk_coverage(error.astype(np.float32), error)
    rows = [r for r in result.per_case.values() if not math.isnan(r["wt_mean_uncertainty"])]
    if len(rows) >= 3:
        result.case_spearman = spearman(np.array([r["wt_mean_uncertainty"] for r in rows]),
                                        np.array([1 - r["wt_dice"] for r in rows]))
    return result


def summary_rows(result: UncertaintyResult) -> list[dict[str, Any]]:
    """Mean, sd and n over the cases of each figure, then the pooled ones."""
    rows = []
    for name in ("spearman", "ece", "aurc", "aurc_optimal", "error_rate", "mean_confidence"):
        values = np.array([r[name] for r in result.per_case.values()], dtype=np.float64)
        values = values[~np.isnan(values)]
        rows.append({"figure": name, "n": int(values.size),
                     "mean": float(values.mean()) if values.size else math.nan,
                     "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan})
    rows.append({"figure": "pooled_ece", "n": len(result.per_case), "mean": result.pooled_ece,
                 "sd": math.nan})
    rows.append({"figure": "case_spearman", "n": len(result.per_case),
                 "mean": result.case_spearman, "sd": math.nan})
    return rows


def plot_risk_coverage(result: UncertaintyResult, out_png: str | Path) -> Path | None:
    """The pooled risk-coverage curve beside a perfect ranking's; None without cases."""
    if result.curve is None:
        return None
    from fedbrats.common.utils.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    cov, risk = result.curve
    ax.plot(cov, risk, label=f"{result.kind} (AURC {aurc(cov, risk):.4f})", color="#1f77b4")
    icov, irisk = result.ideal
    ax.plot(icov, irisk, label=f"perfect ranking (AURC {aurc(icov, irisk):.4f})",
            color="grey", linestyle="--")
    ax.set_xlabel("coverage (voxels kept, most certain first)")
    ax.set_ylabel("risk (error rate of the kept voxels)")
    ax.set_title(f"risk-coverage over {len(result.per_case)} case(s)", fontsize=10)
    ax.legend(fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_uncertainty(result: UncertaintyResult, out: str | Path) -> dict[str, Path]:
    """``uncertainty_per_case.csv``, ``uncertainty_summary.csv`` and ``risk_coverage.png``."""
    import csv

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"per_case": folder / "uncertainty_per_case.csv",
             "summary": folder / "uncertainty_summary.csv"}
    for key, columns, rows in (("per_case", CASE_COLUMNS, result.per_case.values()),
                               ("summary", ("figure", "n", "mean", "sd"), summary_rows(result))):
        with paths[key].open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(row.get(k)) for k in columns})
    png = plot_risk_coverage(result, folder / "risk_coverage.png")
    if png is not None:
        paths["png"] = png
    return paths


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def format_uncertainty(result: UncertaintyResult) -> str:
    by = {r["figure"]: r for r in summary_rows(result)}

    def ms(name: str) -> str:
        r = by[name]
        if not r["n"] or math.isnan(r["mean"]):
            return "-"
        return f"{r['mean']:.3f}" + (f" +/- {r['sd']:.3f}" if not math.isnan(r["sd"]) else "")

    lines = [f"uncertainty ({result.kind}) on {len(result.per_case)} case(s): "
             f"voxel Spearman(uncertainty, error) {ms('spearman')}; ECE {ms('ece')} "
             f"(pooled {_fmt(result.pooled_ece)}); AURC {ms('aurc')} (a perfect ranking "
             f"{ms('aurc_optimal')}); case Spearman(mean WT uncertainty, 1 - WT Dice) "
             f"{_fmt(result.case_spearman)}"]
    if result.missing:
        lines.append(f"warning: {len(result.missing)} scored case(s) have no uncertainty map: "
                     + ", ".join(result.missing[:5]) + (" ..." if len(result.missing) > 5 else ""))
    if not any(not math.isnan(r["ece"]) for r in result.per_case.values()):
        lines.append("warning: no <case>_confidence.nii.gz maps: no ECE (predict writes them "
                     "with --uncertainty)")
    lines.extend(f"  - {f}" for f in result.failed)
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


__all__ = ["UncertaintyError", "UncertaintyResult", "aurc", "case_figures", "ece_bins",
           "ece_of", "evaluate_uncertainty", "find_maps", "format_uncertainty",
           "risk_coverage", "spearman", "write_uncertainty"]
