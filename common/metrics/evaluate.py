"""``fedbrats evaluate``: score a folder of predicted segmentations against the ground truth.

Per case and per region (WT, TC, ET), in the BraTS 2023 way:

* ``dice``, ``hd95``: region-level ("legacy") Dice and HD95 (mm), from
  :func:`fedbrats.common.metrics.brats.evaluate_case`;
* ``lesion_dice``, ``lesion_hd95``, ``lesion_tp``, ``lesion_fn``, ``lesion_fp``: lesion-wise
  scores and lesion counts with the sub-challenge's dilation and volume threshold
  (:data:`fedbrats.common.metrics.brats.LESION_PARAMS`), from the same call;
* ``sensitivity``, ``specificity``: voxel-wise, as the official BraTS 2023 code computes them
  (``TP / (TP + FN)`` and ``TN / (TN + FP)`` over the whole volume; both masks empty: sensitivity
  1; ground truth empty but prediction not: sensitivity 0);
* ``gt_volume_mm3``, ``pred_volume_mm3``: the region's volume in each.

Pairing. Files are paired by case id, read from the file name (``.nii.gz`` or ``.nii``, in the
folder or any sub-folder, so the ground truth may be laid out as BraTS case folders):

* ground truth: ``BraTS-GLI-00001-000-seg.nii.gz`` (2023), ``BraTS2021_00001_seg.nii.gz`` (2021),
  or a bare ``<case_id>.nii.gz``;
* prediction: ``<case_id>.nii.gz`` (what ``fedbrats predict`` writes) or ``<case_id>-seg`` /
  ``<case_id>_seg``.

Files named like an input contrast (``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``_t1``, ``_t1ce``,
``_t2``, ``_flair``) and ``fedbrats predict``'s uncertainty maps (``_entropy``, ``_tta_var``) are
not segmentations and are skipped. Files that pair with nothing are listed on both sides (a
warning); it is an error only when nothing pairs.

Checks per pair, each failure naming both files, what was expected and what was found; a failed
case is reported and the others are still scored: readable 3-D NIfTI, same shape, same affine
(tolerance 0.001 mm, :data:`fedbrats.common.data.cases.AFFINE_TOLERANCE_MM`), finite values, label
values of the
declared conventions (``labels`` for the ground truth; ``pred_labels``, by default the same, for
the prediction), converted to the internal convention before scoring. Spacing is read from the
ground truth's affine.

Outputs (:func:`write_results`): ``per_case.csv`` (one row per case and region),
``summary.csv`` (per region and metric: number of cases, mean, median; and the total of the lesion
counts) and ``issues.csv`` (unpaired files and failed cases).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import re
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.common.data.labels import CONVENTIONS, DEFAULT_CONVENTION, add_labels_argument

__all__ = [
    "COUNT_METRICS",
    "PER_CASE_COLUMNS",
    "REGION_METRICS",
    "SUMMARY_COLUMNS",
    "CaseFailure",
    "CasePair",
    "EvaluationError",
    "EvaluationResult",
    "Pairing",
    "evaluate_folders",
    "evaluate_pair",
    "format_summary",
    "pair_cases",
    "seg_case_id",
    "sensitivity_specificity",
    "summarise",
    "write_results",
]

log = logging.getLogger(__name__)

REGION_METRICS: Final[tuple[str, ...]] = (
    "dice",
    "hd95",
    "lesion_dice",
    "lesion_hd95",
    "lesion_tp",
    "lesion_fn",
    "lesion_fp",
    "sensitivity",
    "specificity",
    "gt_volume_mm3",
    "pred_volume_mm3",
)
"""Per case and region, in column order."""

COUNT_METRICS: Final[frozenset[str]] = frozenset(
    {"lesion_tp", "lesion_fn", "lesion_fp", "brats2025_tp", "brats2025_fn", "brats2025_fp"}
)
"""Metrics that ``summary.csv`` also totals over cases."""

METRIC_SETS: Final[tuple[str, ...]] = ("brats2023", "brats2025")
"""``--metrics``: fedbrats' own BraTS 2023 metrics (always), and the official BraTS 2025 scorer."""

PER_CASE_COLUMNS: Final[tuple[str, ...]] = ("case_id", "region", *REGION_METRICS)
SUMMARY_COLUMNS: Final[tuple[str, ...]] = ("region", "metric", "n", "mean", "median", "total")
ISSUE_COLUMNS: Final[tuple[str, ...]] = ("kind", "case_id", "pred_file", "gt_file", "message")

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEG_SUFFIX = re.compile(r"^(?P<id>.+?)(?:-seg|_seg)$")
_IMAGE_SUFFIX = re.compile(r"^.+(?:-(?:t1n|t1c|t2w|t2f)|_(?:t1|t1ce|t2|flair))$", re.IGNORECASE)
_AUX_SUFFIX = re.compile(r"^.+_(?:entropy|tta_var|confidence|zones|gradcam_(?:WT|TC|ET))$")


class EvaluationError(ValueError):
    """A case (or the folders) cannot be scored; the message names the files."""


@dataclass(frozen=True)
class CasePair:
    case_id: str
    pred: Path
    gt: Path


@dataclass(frozen=True)
class CaseFailure:
    case_id: str
    message: str
    pred: Path | None = None
    gt: Path | None = None


@dataclass
class Pairing:
    """What :func:`pair_cases` found."""

    pairs: list[CasePair] = field(default_factory=list)
    pred_only: list[tuple[str, Path]] = field(default_factory=list)
    """Predictions whose case id has no ground truth."""
    gt_only: list[tuple[str, Path]] = field(default_factory=list)
    """Ground truths whose case id has no prediction."""
    conflicts: list[CaseFailure] = field(default_factory=list)
    """Case ids with two files on one side (neither is scored)."""


@dataclass
class EvaluationResult:
    challenge: str
    per_case: dict[str, dict[str, dict[str, float | int]]] = field(default_factory=dict)
    """``{case_id: {region: {metric: value}}}`` for every scored case, in case-id order."""
    failed: list[CaseFailure] = field(default_factory=list)
    pred_only: list[tuple[str, Path]] = field(default_factory=list)
    gt_only: list[tuple[str, Path]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    official_versions: dict[str, str] = field(default_factory=dict)
    """The official scorer's package versions, when ``brats2025`` was asked for."""

    @property
    def n_paired(self) -> int:
        return len(self.per_case) + len(self.failed)


# --------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------


def seg_case_id(filename: str) -> str | None:
    """The case id a segmentation file's name gives, or None for a file that is not one.

    ``BraTS-GLI-00001-000-seg.nii.gz``, ``BraTS-GLI-00001-000.nii.gz`` -> ``BraTS-GLI-00001-000``;
    ``BraTS2021_00001_seg.nii.gz`` -> ``BraTS2021_00001``. None for a non-NIfTI file, an input
    contrast (``...-t1c.nii.gz``, ``..._flair.nii.gz``), an uncertainty map
    (``..._entropy.nii.gz``, ``..._tta_var.nii.gz``), a hidden or temporary file.
    """
    if filename.startswith("."):
        return None
    stem = next((filename[: -len(s)] for s in _NIFTI_SUFFIXES if filename.endswith(s)), None)
    if not stem or stem.endswith(".tmp") or ".nii" in stem:
        return None
    m = _SEG_SUFFIX.match(stem)
    if m:
        return m.group("id")
    if _IMAGE_SUFFIX.match(stem) or _AUX_SUFFIX.match(stem):
        return None
    return stem


def _segmentation_files(folder: Path, side: str) -> dict[str, list[Path]]:
    if not folder.exists():
        raise EvaluationError(f"{side} folder {folder} not found")
    if not folder.is_dir():
        raise EvaluationError(f"{side} path {folder} is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (case_id := seg_case_id(path.name)) is not None:
            found.setdefault(case_id, []).append(path)
    return found


def _manifest_segmentations(manifest: Path) -> dict[str, list[Path]]:
    """The ground truth of a manifest CSV (its ``seg`` column; cases without one are left
    out), as ``predict`` and the sites read it."""
    from fedbrats.common.data.cases import DataError, read_manifest

    try:
        cases = read_manifest(manifest)
    except DataError as e:
        raise EvaluationError(f"ground-truth manifest: {e}") from None
    found = {c.case_id: [c.seg] for c in cases if c.seg is not None}
    if not found:
        raise EvaluationError(f"ground-truth manifest {manifest}: no case has a seg file "
                              "(expected a seg column with a file per case)")
    return found


def pair_cases(pred_dir: str | Path, gt_dir: str | Path) -> Pairing:
    """Pair prediction and ground-truth files by case id (see the module docstring);
    ``gt_dir`` may be a manifest CSV (its seg column, paired by its case ids).

    Raises :class:`EvaluationError` only when a folder is missing; unpaired files and case ids
    with two files on one side are returned, not raised.
    """
    preds = _segmentation_files(Path(pred_dir), "prediction")
    gt_path = Path(gt_dir)
    gts = (_manifest_segmentations(gt_path) if gt_path.suffix.lower() == ".csv"
           else _segmentation_files(gt_path, "ground-truth"))
    out = Pairing()
    for case_id in sorted(set(preds) | set(gts)):
        p, g = preds.get(case_id, []), gts.get(case_id, [])
        if len(p) > 1 or len(g) > 1:
            side, files = ("prediction", p) if len(p) > 1 else ("ground-truth", g)
            out.conflicts.append(
                CaseFailure(
                    case_id,
                    f"case {case_id}: {len(files)} {side} files for one case "
                    f"({', '.join(map(str, files))}); expected one",
                    pred=p[0] if p else None,
                    gt=g[0] if g else None,
                )
            )
        elif p and g:
            out.pairs.append(CasePair(case_id, p[0], g[0]))
        elif p:
            out.pred_only.append((case_id, p[0]))
        else:
            out.gt_only.append((case_id, g[0]))
    return out


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def sensitivity_specificity(pred_mask: Any, gt_mask: Any) -> tuple[float, float]:
    """Voxel-wise sensitivity and specificity of two boolean masks (official BraTS 2023 rules).

    ``TP / (TP + FN)`` and ``TN / (TN + FP)`` over every voxel; both masks empty: sensitivity 1;
    ground truth empty but prediction not: sensitivity 0 (as the official code's epsilon gives);
    a ground truth without background voxels: specificity 1.
    """
    import numpy as np

    p = np.asarray(pred_mask, dtype=bool)
    g = np.asarray(gt_mask, dtype=bool)
    tp = int(np.count_nonzero(p & g))
    fn = int(np.count_nonzero(g)) - tp
    fp = int(np.count_nonzero(p)) - tp
    tn = p.size - tp - fn - fp
    if tp + fn == 0:
        sensitivity = 1.0 if fp == 0 else 0.0
    else:
        sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp) if tn + fp else 1.0
    return float(sensitivity), float(specificity)


def _read(path: Path, what: str, case_id: str):
    import zlib

    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise EvaluationError(
            f"case {case_id}: {what} {path} is not a readable NIfTI file ({type(e).__name__}: {e})"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(
            f"case {case_id}: {what} {path} has shape {tuple(data.shape)}; expected a 3-D label map"
        )
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise EvaluationError(f"case {case_id}: {what} {path} contains NaN or inf")
    return data, np.asarray(img.affine, dtype=np.float64)


def evaluate_pair(
    pair: CasePair,
    challenge: str,
    labels: str = DEFAULT_CONVENTION,
    pred_labels: str | None = None,
) -> dict[str, dict[str, float | int]]:
    """Every metric of one case, ``{region: {metric: value}}`` (:data:`REGION_METRICS`).

    Raises :class:`EvaluationError` naming both files when the pair cannot be scored (unreadable,
    not 3-D, shapes or affines differ, non-finite or unknown label values).
    """
    return _score_pair(pair, challenge, labels, pred_labels)[0]


def load_pair(pair: CasePair, labels: str = DEFAULT_CONVENTION, pred_labels: str | None = None):
    """Both label maps of a pair, checked and in the internal convention, and the ground
    truth's affine: ``(pred, gt, affine)``. Raises :class:`EvaluationError` (see
    :func:`evaluate_pair`)."""
    import numpy as np

    from fedbrats.common.data.cases import AFFINE_TOLERANCE_MM
    from fedbrats.common.data.labels import LabelError, to_internal

    cid = pair.case_id
    gt_raw, gt_affine = _read(pair.gt, "ground truth", cid)
    pred_raw, pred_affine = _read(pair.pred, "prediction", cid)
    if pred_raw.shape != gt_raw.shape:
        raise EvaluationError(
            f"case {cid}: shape mismatch: ground truth {pair.gt} has shape {tuple(gt_raw.shape)}, "
            f"prediction {pair.pred} has shape {tuple(pred_raw.shape)}; expected the prediction "
            "on the ground truth's grid"
        )
    if not np.allclose(pred_affine, gt_affine, atol=AFFINE_TOLERANCE_MM):
        diff = float(np.abs(pred_affine - gt_affine).max())
        raise EvaluationError(
            f"case {cid}: affine mismatch: prediction {pair.pred} differs from ground truth "
            f"{pair.gt} by up to {diff:.4g} mm (expected the same grid, tolerance "
            f"{AFFINE_TOLERANCE_MM} mm); ground truth affine {gt_affine[:3].round(3).tolist()}, "
            f"prediction affine {pred_affine[:3].round(3).tolist()}"
        )
    try:
        gt = to_internal(gt_raw, labels, source=f"case {cid}: ground truth {pair.gt}")
    except LabelError as e:
        raise EvaluationError(str(e)) from None
    try:
        pred = to_internal(
            pred_raw, pred_labels or labels, source=f"case {cid}: prediction {pair.pred}"
        )
    except LabelError as e:
        raise EvaluationError(str(e).replace("(pass --labels ", "(pass --pred-labels ")) from None

    return pred, gt, gt_affine


def _score_pair(pair: CasePair, challenge: str, labels: str, pred_labels: str | None):
    import numpy as np

    from fedbrats.common.data.cases import voxel_spacing
    from fedbrats.common.data.contract import region_masks
    from fedbrats.common.metrics.brats import evaluate_case

    pred, gt, gt_affine = load_pair(pair, labels, pred_labels)
    spacing = voxel_spacing(gt_affine)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    scores = evaluate_case(pred, gt, spacing, challenge)
    out: dict[str, dict[str, float | int]] = {}
    for region in REGIONS:
        s = scores[region]
        p_mask, g_mask = region_masks(pred, region), region_masks(gt, region)
        sens, spec = sensitivity_specificity(p_mask, g_mask)
        out[region] = {
            "dice": s["dice"],
            "hd95": s["hd95"],
            "lesion_dice": s["lesion_dice"],
            "lesion_hd95": s["lesion_hd95"],
            "lesion_tp": s["tp"],
            "lesion_fn": s["fn"],
            "lesion_fp": s["fp"],
            "sensitivity": sens,
            "specificity": spec,
            "gt_volume_mm3": float(np.count_nonzero(g_mask)) * voxel_mm3,
            "pred_volume_mm3": float(np.count_nonzero(p_mask)) * voxel_mm3,
        }
    return out, pred, gt, gt_affine


# --------------------------------------------------------------------------------------------
# A folder
# --------------------------------------------------------------------------------------------


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    challenge: str,
    labels: str = DEFAULT_CONVENTION,
    pred_labels: str | None = None,
    progress: bool = False,
    metrics: Sequence[str] = ("brats2023",),
    scorer_python: str | Path | None = None,
) -> EvaluationResult:
    """Pair the folders' files and score every pair; never stops at a bad case.

    ``challenge`` (GLI, SSA, PED, MEN, MET) selects the lesion-wise parameters; ``labels`` is the
    ground truth's label convention and ``pred_labels`` the prediction's (default: the same).
    ``progress`` shows a progress bar (tqdm, on stderr). Warnings (unpaired files, case ids of
    another population) and failed cases are returned in the result, not logged.

    ``metrics``: ``brats2023`` (fedbrats' own, always computed) and ``brats2025``, which adds the
    official BraTS 2025 scorer's columns
    (:data:`~fedbrats.common.metrics.brats2025.BRATS2025_METRICS`) for every case that passed
    the checks, run with ``scorer_python`` (see
    :func:`~fedbrats.common.metrics.brats2025.find_scorer_python`, which raises
    :class:`~fedbrats.common.metrics.brats2025.ScorerUnavailable` before anything is read).

    Raises :class:`EvaluationError` when a folder is missing or no file pairs (naming what each
    side holds), and ``ValueError`` for an unknown challenge or convention.
    """
    from tqdm import tqdm

    from fedbrats.common.data.cases import population_from_id
    from fedbrats.common.data.labels import get_convention
    from fedbrats.common.metrics.brats import resolve_challenge

    code = resolve_challenge(challenge)
    unknown = sorted(set(metrics) - set(METRIC_SETS))
    if unknown:
        raise ValueError(f"unknown metrics {', '.join(unknown)}; expected {', '.join(METRIC_SETS)}")
    official_python = None
    if "brats2025" in metrics:
        from fedbrats.common.metrics.brats2025 import find_scorer_python

        official_python = find_scorer_python(scorer_python)
    labels = get_convention(labels).name
    pred_labels = get_convention(pred_labels).name if pred_labels else labels
    pairing = pair_cases(pred_dir, gt_dir)
    if not pairing.pairs and not pairing.conflicts:
        raise EvaluationError(_nothing_paired(pred_dir, gt_dir, pairing))

    result = EvaluationResult(challenge=code, pred_only=pairing.pred_only, gt_only=pairing.gt_only)
    result.failed.extend(pairing.conflicts)
    if pairing.pred_only:
        result.warnings.append(
            f"{len(pairing.pred_only)} prediction file(s) have no ground truth: "
            + _few(p.name for _, p in pairing.pred_only)
        )
    if pairing.gt_only:
        result.warnings.append(
            f"{len(pairing.gt_only)} ground-truth file(s) have no prediction: "
            + _few(p.name for _, p in pairing.gt_only)
        )
    others = sorted(
        {
            pop
            for pair in pairing.pairs
            if (pop := population_from_id(pair.case_id)) not in (None, code)
        }
    )
    if others:
        result.warnings.append(
            f"case ids name {', '.join(others)} but the challenge is {code}: the lesion-wise "
            f"scores use {code}'s dilation and volume threshold"
        )

    with contextlib.ExitStack() as stack:
        job = None
        if official_python is not None:
            from fedbrats.common.metrics.brats2025 import OfficialJob

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedbrats-brats2025-"))
            job = OfficialJob(code, Path(tmp))
        for pair in tqdm(
            pairing.pairs, desc="evaluate", unit="case", disable=not progress, file=sys.stderr
        ):
            try:
                scores, pred, gt, affine = _score_pair(pair, code, labels, pred_labels)
            except EvaluationError as e:
                result.failed.append(CaseFailure(pair.case_id, str(e), pred=pair.pred, gt=pair.gt))
                log.debug("%s", e)
                continue
            result.per_case[pair.case_id] = scores
            if job is not None:
                job.add(pair.case_id, pred, gt, affine)
            log.debug("case %s scored", pair.case_id)
        if job is not None:
            if progress:
                print(f"scoring {len(job.pairs)} case(s) with the official BraTS 2025 scorer",
                      file=sys.stderr)
            official, errors, versions = job.run(official_python)
            result.official_versions = versions
            for case_id, regions in official.items():
                for region, values in regions.items():
                    result.per_case[case_id][region].update(values)
            for case_id, message in sorted(errors.items()):
                result.warnings.append(
                    f"case {case_id}: the official BraTS 2025 scorer failed ({message}); "
                    "its brats2025 columns are empty"
                )
    result.failed.sort(key=lambda f: f.case_id)
    return result


def _few(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _nothing_paired(pred_dir: str | Path, gt_dir: str | Path, pairing: Pairing) -> str:
    def side(items: list[tuple[str, Path]]) -> str:
        return f"{len(items)} ({_few([p.name for _, p in items], 3)})" if items else "none"

    return (
        f"no prediction in {pred_dir} pairs with a ground truth in {gt_dir}. Segmentation files "
        f"found: predictions {side(pairing.pred_only)}; ground truths {side(pairing.gt_only)}. "
        "Files pair by case id: ground truth <id>-seg.nii.gz, <id>_seg.nii.gz or <id>.nii.gz; "
        "prediction <id>.nii.gz or <id>-seg.nii.gz"
    )


# --------------------------------------------------------------------------------------------
# Summary and files
# --------------------------------------------------------------------------------------------


def summarise(
    per_case: Mapping[str, Mapping[str, Mapping[str, float | int]]],
) -> list[dict[str, Any]]:
    """One row per region and metric: ``n`` (cases with a finite value), ``mean``, ``median``,
    and ``total`` for the lesion counts (None for the other metrics)."""
    rows = []
    for region in REGIONS:
        for metric in _metrics_of(per_case):
            values = [
                float(v)
                for case in per_case.values()
                if (v := case.get(region, {}).get(metric)) is not None and math.isfinite(v)
            ]
            rows.append(
                {
                    "region": region,
                    "metric": metric,
                    "n": len(values),
                    "mean": statistics.fmean(values) if values else math.nan,
                    "median": statistics.median(values) if values else math.nan,
                    "total": int(sum(values)) if metric in COUNT_METRICS else None,
                }
            )
    return rows


def _metrics_of(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[str, ...]:
    """:data:`REGION_METRICS`, and the official scorer's columns when any case has them."""
    from fedbrats.common.metrics.brats2025 import BRATS2025_METRICS

    official = any(
        m in scores for case in per_case.values() for scores in case.values()
        for m in BRATS2025_METRICS
    )  # fmt: skip
    return REGION_METRICS + (tuple(BRATS2025_METRICS) if official else ())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".6g")
    return value


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})
    tmp.replace(path)


def write_results(result: EvaluationResult, out: str | Path) -> dict[str, Path]:
    """Write ``per_case.csv``, ``summary.csv`` and ``issues.csv`` to ``out`` (created)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.csv" for name in ("per_case", "summary", "issues")}
    _write_csv(
        paths["per_case"],
        ("case_id", "region", *_metrics_of(result.per_case)),
        (
            {"case_id": case_id, "region": region, **scores[region]}
            for case_id, scores in result.per_case.items()
            for region in REGIONS
        ),
    )
    _write_csv(paths["summary"], SUMMARY_COLUMNS, summarise(result.per_case))
    issues = [
        {"kind": "pred_unpaired", "case_id": cid, "pred_file": p, "message": "no ground truth"}
        for cid, p in result.pred_only
    ]
    issues += [
        {"kind": "gt_unpaired", "case_id": cid, "gt_file": g, "message": "no prediction"}
        for cid, g in result.gt_only
    ]
    issues += [
        {"kind": "failed", "case_id": f.case_id, "pred_file": f.pred, "gt_file": f.gt,
         "message": f.message}
        for f in result.failed
    ]  # fmt: skip
    _write_csv(paths["issues"], ISSUE_COLUMNS, issues)
    return paths


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_summary(result: EvaluationResult) -> str:
    """The summary as a plain-text table (mean and median per region), with the problems."""
    by_key = {(r["region"], r["metric"]): r for r in summarise(result.per_case)}

    def mm(region: str, metric: str, digits: int) -> str:
        row = by_key[(region, metric)]
        if not row["n"]:
            return "-"
        return f"{row['mean']:.{digits}f} ({row['median']:.{digits}f})"

    header = (
        "region",
        "Dice",
        "HD95 mm",
        "lesion Dice",
        "lesion HD95 mm",
        "sensitivity",
        "specificity",
        "lesions TP/FN/FP",
    )
    rows = [header]
    for region in REGIONS:
        counts = "/".join(
            str(by_key[(region, m)]["total"]) for m in ("lesion_tp", "lesion_fn", "lesion_fp")
        )
        rows.append(
            (
                region,
                mm(region, "dice", 3),
                mm(region, "hd95", 2),
                mm(region, "lesion_dice", 3),
                mm(region, "lesion_hd95", 2),
                mm(region, "sensitivity", 3),
                mm(region, "specificity", 4),
                counts,
            )
        )
    lines = [
        f"{result.challenge}: {len(result.per_case)} of {result.n_paired} paired cases scored; "
        "mean (median) over the scored cases, lesion counts summed"
    ]
    lines += _table(rows)
    if ("WT", "brats2025_dice") in by_key:
        versions = ", ".join(f"{k} {v}" for k, v in result.official_versions.items())
        lines.append(f"official BraTS 2025 scorer ({versions}); lesion-wise means over matched "
                     "lesions, HD95 of a missed or spurious region 373 mm")
        official = [("region", "Dice", "NSD", "HD95 mm", "lesion Dice", "lesion NSD",
                     "lesion HD95 mm", "lesions TP/FN/FP")]
        for region in REGIONS:
            counts = "/".join(
                str(by_key[(region, m)]["total"])
                for m in ("brats2025_tp", "brats2025_fn", "brats2025_fp")
            )
            official.append(
                (region, *(mm(region, f"brats2025_{m}", d) for m, d in (
                    ("dice", 3), ("nsd", 3), ("hd95", 2), ("lesion_dice", 3),
                    ("lesion_nsd", 3), ("lesion_hd95", 2))), counts)
            )
        lines += _table(official)
    for w in result.warnings:
        lines.append(f"warning: {w}")
    if result.failed:
        lines.append(f"{len(result.failed)} case(s) could not be scored:")
        lines.extend(f"  - {f.message}" for f in result.failed)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from fedbrats.common.metrics.brats2025 import ScorerUnavailable

    try:
        result = evaluate_folders(
            args.pred, args.gt, args.challenge, args.labels, args.pred_labels, args.progress,
            metrics=args.metrics, scorer_python=args.scorer_python,
        )
    except (EvaluationError, ScorerUnavailable) as e:
        print(f"error: {e}")
        return 2
    paths = write_results(result, args.out)
    print(format_summary(result))
    failed = bool(result.failed)
    if args.uncertainty:
        from fedbrats.common.metrics.uncertainty import (
            UncertaintyError,
            evaluate_uncertainty,
            format_uncertainty,
            write_uncertainty,
        )

        scored = [p for p in pair_cases(args.pred, args.gt).pairs if p.case_id in result.per_case]
        try:
            calibration = evaluate_uncertainty(scored, args.uncertainty, args.labels,
                                               args.pred_labels)
        except UncertaintyError as e:
            print(f"error: {e}")
            return 2
        paths.update({f"uncertainty_{k}": v for k, v in
                      write_uncertainty(calibration, args.out).items()})
        print(format_uncertainty(calibration))
        failed = failed or bool(calibration.failed)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 1 if failed else 0


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score predicted segmentations against the ground truth (BraTS 2023 metrics; "
        "the official BraTS 2025 scorer with --metrics brats2025)",
        description=(
            "Pair the segmentation files of --pred and --gt by case id (BraTS 2023 names such "
            "as BraTS-GLI-00001-000-seg.nii.gz or BraTS-GLI-00001-000.nii.gz, BraTS 2021 names "
            "such as BraTS2021_00001_seg.nii.gz; the ground truth may be in case folders), check "
            "that each pair has the same shape, affine and known label values, and compute per "
            "case and region (WT, TC, ET): Dice, HD95, lesion-wise Dice and HD95 with the "
            "challenge's dilation and volume threshold, lesion counts (TP, FN, FP), voxel-wise "
            "sensitivity and specificity. Writes OUT/per_case.csv, OUT/summary.csv (mean and "
            "median per region) and OUT/issues.csv (unpaired files, failed cases) and prints the "
            "summary. Unpaired files are a warning. Exits 1 when a paired case could not be "
            "scored, 2 when nothing pairs or a folder is missing."
        ),
    )
    p.add_argument("--pred", metavar="DIR", required=True, help="folder of predicted segmentations")
    p.add_argument(
        "--gt", metavar="DIR|CSV", required=True,
        help="folder of ground-truth segmentations, or a manifest CSV (case_id, ..., seg) as "
        "predict and the sites read it",
    )
    p.add_argument(
        "--challenge",
        metavar="CHALLENGE",
        required=True,
        type=str.upper,
        choices=POPULATIONS,
        help="BraTS 2023 sub-challenge whose lesion-wise parameters apply: "
        f"{', '.join(POPULATIONS)} (GLI/SSA/PED: dilation 3, 50 mm^3; MEN: 1, 50 mm^3; "
        "MET: 1, 2 mm^3)",
    )
    add_labels_argument(p, of="the ground truth")
    p.add_argument(
        "--pred-labels",
        metavar="CONVENTION",
        default=None,
        choices=sorted(CONVENTIONS),
        help="label convention of the predictions (default: the same as --labels)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="evaluation",
        help="folder for per_case.csv, summary.csv and issues.csv (default ./evaluation)",
    )
    p.add_argument(
        "--metrics",
        metavar="SET",
        type=_metric_sets,
        default=("brats2023",),
        help="brats2023 (default: fedbrats' own BraTS 2023 metrics) or brats2025 (the same and, "
        "beside them, the official BraTS 2025 scorer's: global Dice, NSD and HD95, matched-"
        "lesion Dice, NSD and HD95 and instance counts; it runs in its own environment, see "
        "--scorer-python); a comma-separated list is accepted",
    )
    p.add_argument(
        "--scorer-python",
        metavar="PYTHON",
        default=None,
        help="the Python of the official scorer's environment (default: "
        "$FEDBRATS_BRATS2025_PYTHON, else .venv-brats2025/bin/python beside this checkout, "
        "made by `make brats2025`)",
    )
    p.add_argument(
        "--uncertainty",
        metavar="DIR",
        default=None,
        help="the folder of `fedbrats predict --uncertainty entropy|tta`: also measure how well "
        "its uncertainty maps predict the errors (voxel Spearman correlation, the softmax's "
        "expected calibration error from its _confidence maps, the risk-coverage curve and its "
        "area, and across cases the correlation of mean WT uncertainty with 1 - WT Dice); "
        "writes uncertainty_per_case.csv, uncertainty_summary.csv and risk_coverage.png",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run)


def _metric_sets(text: str) -> tuple[str, ...]:
    sets = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [t for t in sets if t not in METRIC_SETS]
    if bad or not sets:
        raise argparse.ArgumentTypeError(
            f"unknown metrics {', '.join(bad) or repr(text)}; expected {' or '.join(METRIC_SETS)}"
        )
    return tuple(dict.fromkeys(("brats2023", *sets)))
