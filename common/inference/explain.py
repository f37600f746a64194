"""``fedbrats explain``: how much each MRI contrast contributes to a case's segmentation.

Contrast-level Shapley values, computed exactly. The players are the four contrasts
(t1n, t1c, t2w, t2f); a coalition ``S`` is the input with every contrast outside ``S`` zero-filled
after normalisation (the input the network sees for a missing contrast, and in training under
modality dropout). The value of a coalition, per region r (WT, TC, ET), is

* the predicted volume of r in mm^3, or
* with a ground truth, the Dice of r against it (both empty: 1),

of the segmentation ``fedbrats predict`` would write (on the input's grid, post-processed unless
asked not to). With n = 4 players all 2^4 = 16 coalitions are evaluated (16 network runs), and

    phi_i = sum over S not containing i of  |S|! (n - |S| - 1)! / n!  * (v(S + {i}) - v(S)).

Shapley values are efficient: sum_i phi_i = v(all) - v(empty), checked and written with the
values. A contrast the case lacks is in no coalition's input, so its value is exactly 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedbrats.common.data.cases import Case
from fedbrats.common.data.contract import CONTRASTS, REGIONS, region_masks
from fedbrats.common.data.labels import DEFAULT_CONVENTION, add_labels_argument
from fedbrats.common.utils.plotting import pyplot

if TYPE_CHECKING:
    from fedbrats.common.inference.modelfile import Student

__all__ = [
    "Explanation",
    "ShapleyResult",
    "coalition_name",
    "dice_per_region",
    "explain_case",
    "exact_shapley",
    "plot_explanation",
    "read_ground_truth",
    "shapley_weight",
    "write_explanation",
]

EFFICIENCY_TOLERANCE = 1e-6
"""Relative tolerance of the efficiency check (floating-point sums only)."""


def shapley_weight(size: int, n: int) -> float:
    """The Shapley weight ``|S|! (n - |S| - 1)! / n!`` of a coalition of ``size`` players."""
    if not 0 <= size < n:
        raise ValueError(f"coalition size must be in [0, {n - 1}] for {n} players, got {size}")
    return math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)


def coalition_name(coalition: frozenset[str], players: Sequence[str]) -> str:
    """``"t1c+t2f"`` (players in their given order); ``"none"`` for the empty coalition."""
    return "+".join(p for p in players if p in coalition) or "none"


@dataclass
class ShapleyResult:
    """Exact Shapley values of every player for several value functions (``keys``) at once."""

    players: tuple[str, ...]
    keys: tuple[str, ...]
    values: dict[str, dict[str, float]]
    """``values[player][key]``: the Shapley value."""
    coalitions: dict[frozenset[str], dict[str, float]]
    """``v(S)`` for every coalition ``S``."""

    @property
    def v_empty(self) -> dict[str, float]:
        return dict(self.coalitions[frozenset()])

    @property
    def v_all(self) -> dict[str, float]:
        return dict(self.coalitions[frozenset(self.players)])

    def efficiency(self) -> dict[str, dict[str, float | bool]]:
        """Per key: ``sum_phi``, ``v_all_minus_v_empty`` and whether they agree."""
        out: dict[str, dict[str, float | bool]] = {}
        for k in self.keys:
            total = math.fsum(self.values[p][k] for p in self.players)
            gap = self.v_all[k] - self.v_empty[k]
            scale = max(1.0, abs(gap), *(abs(self.values[p][k]) for p in self.players))
            out[k] = {
                "sum_phi": total,
                "v_all_minus_v_empty": gap,
                "ok": abs(total - gap) <= EFFICIENCY_TOLERANCE * scale,
            }
        return out


def exact_shapley(
    players: Sequence[str],
    value: Callable[[frozenset[str]], Mapping[str, float]],
) -> ShapleyResult:
    """Exact Shapley values over all ``2^n`` coalitions of ``players``.

    ``value(S)`` returns ``{key: v(S)}`` (the same keys for every coalition); it is called once
    per coalition, smallest coalitions first.
    """
    players = tuple(players)
    if len(set(players)) != len(players):
        raise ValueError(f"players must be distinct, got {players}")
    n = len(players)
    if n == 0:
        raise ValueError("need at least one player")
    coalitions: dict[frozenset[str], dict[str, float]] = {}
    for size in range(n + 1):
        for combo in itertools.combinations(players, size):
            coalitions[frozenset(combo)] = {k: float(v) for k, v in value(frozenset(combo)).items()}
    keys = tuple(coalitions[frozenset()])
    for s, v in coalitions.items():
        if tuple(v) != keys:
            raise ValueError(
                f"value({coalition_name(s, players)}) returned keys {tuple(v)}, expected {keys}"
            )
    values: dict[str, dict[str, float]] = {}
    for p in players:
        others = [q for q in players if q != p]
        acc = {k: [] for k in keys}
        for size in range(n):
            w = shapley_weight(size, n)
            for combo in itertools.combinations(others, size):
                s = frozenset(combo)
                with_p, without = coalitions[s | {p}], coalitions[s]
                for k in keys:
                    acc[k].append(w * (with_p[k] - without[k]))
        values[p] = {k: math.fsum(terms) for k, terms in acc.items()}
    return ShapleyResult(players, keys, values, coalitions)


# --------------------------------------------------------------------------------------------
# Value functions on a case
# --------------------------------------------------------------------------------------------


def dice_per_region(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice of WT, TC and ET between internal-convention label maps (both empty: 1, as in
    :mod:`fedbrats.common.metrics.brats`)."""
    out = {}
    for r in REGIONS:
        p, g = np.asarray(region_masks(pred, r)), np.asarray(region_masks(gt, r))
        denom = np.count_nonzero(p) + np.count_nonzero(g)
        out[r] = 1.0 if denom == 0 else 2.0 * np.count_nonzero(p & g) / denom
    return out


def read_ground_truth(
    case: Case, path: str | Path, convention: str = DEFAULT_CONVENTION
) -> np.ndarray:
    """Read ``path`` as ``case``'s segmentation, converted to the internal convention.

    It goes through the same checks as a training case's segmentation (readable, 3-D, the
    images' shape and affine, labels of ``convention``); a failure raises
    :class:`~fedbrats.common.data.cases.DataError` naming the file, what was expected and what was
    found.
    """
    from fedbrats.common.data.cases import load_case

    loaded = load_case(dataclasses.replace(case, seg=Path(path)), convention, require_seg=True)
    if loaded.seg is None:  # load_case raised already for a missing or unusable file
        raise RuntimeError(f"{path}: no segmentation read")
    return loaded.seg


@dataclass
class Explanation:
    """Shapley values of the contrasts for one case."""

    case_id: str
    measure: str
    """``"volume_mm3"`` or ``"dice"``."""
    shapley: ShapleyResult
    missing: tuple[str, ...]
    postprocess: bool
    model: str | None = None
    ground_truth: str | None = None

    def to_dict(self) -> dict:
        s = self.shapley
        return {
            "case_id": self.case_id,
            "measure": self.measure,
            "unit": "mm^3" if self.measure == "volume_mm3" else "Dice",
            "model": self.model,
            "ground_truth": self.ground_truth,
            "postprocess": self.postprocess,
            "contrasts": list(s.players),
            "missing_contrasts": list(self.missing),
            "regions": list(s.keys),
            "shapley": {p: dict(s.values[p]) for p in s.players},
            "v_empty": s.v_empty,
            "v_all": s.v_all,
            "efficiency": s.efficiency(),
            "coalitions": {coalition_name(c, s.players): v for c, v in s.coalitions.items()},
            "weights": {str(k): shapley_weight(k, len(s.players))
                        for k in range(len(s.players))},
        }


def explain_case(
    student: Student,
    case: Case,
    ground_truth: str | Path | None = None,
    gt_convention: str = DEFAULT_CONVENTION,
    apply_postprocess: bool = True,
    overlap: float | None = None,
    progress: bool = False,
) -> Explanation:
    """Exact contrast Shapley values of ``student`` on ``case`` (module docstring): 16 runs."""
    from fedbrats.common.inference.predict import DEFAULT_OVERLAP, predict_case, prepare_case

    prepared = prepare_case(student, case)
    gt = None
    if ground_truth is not None:
        gt = read_ground_truth(case, ground_truth, gt_convention)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=2 ** len(CONTRASTS), desc=f"explain {case.case_id}", unit="subset",
                   file=sys.stderr)

    def value(coalition: frozenset[str]) -> dict[str, float]:
        drop = tuple(c for c in CONTRASTS if c not in coalition)
        result = predict_case(student, case, apply_postprocess=apply_postprocess,
                              overlap=DEFAULT_OVERLAP if overlap is None else overlap,
                              drop=drop, prepared=prepared)
        if bar is not None:
            bar.update(1)
        if gt is None:
            return result.volumes_mm3
        return dice_per_region(result.labels, gt)

    try:
        shapley = exact_shapley(CONTRASTS, value)
    finally:
        if bar is not None:
            bar.close()
    return Explanation(
        case_id=case.case_id,
        measure="volume_mm3" if gt is None else "dice",
        shapley=shapley,
        missing=prepared.missing,
        postprocess=apply_postprocess,
        model=str(student.path) if student.path is not None else None,
        ground_truth=str(ground_truth) if ground_truth is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def plot_explanation(expl: Explanation, out_png: str | Path) -> Path:
    """Grouped bar chart: one group per contrast, one bar per region."""
    plt = pyplot()
    s = expl.shapley
    colours = {"WT": "#2ca02c", "TC": "#d62728", "ET": "#e6b800"}
    scale, unit = (1000.0, "ml") if expl.measure == "volume_mm3" else (1.0, "Dice")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.arange(len(s.players))
    width = 0.8 / max(1, len(s.keys))
    for j, key in enumerate(s.keys):
        heights = [s.values[p][key] / scale for p in s.players]
        ax.bar(x + (j - (len(s.keys) - 1) / 2) * width, heights, width, label=key,
               color=colours.get(key))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{p}{' (missing)' if p in expl.missing else ''}" for p in s.players])
    ax.set_ylabel(f"Shapley value ({unit})")
    suffix = " ml" if expl.measure == "volume_mm3" else ""
    summary = ", ".join(
        f"{k}: {s.v_empty[k] / scale:.3g} -> {s.v_all[k] / scale:.3g}{suffix}" for k in s.keys
    )
    what = "predicted volume" if expl.measure == "volume_mm3" else "Dice"
    ax.set_title(f"{expl.case_id}: contrast contributions to the {what}\n"
                 f"v(none) -> v(all) {summary}", fontsize=9)
    ax.legend(title="region", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_explanation(expl: Explanation, out_dir: str | Path) -> dict[str, Path]:
    """``<case_id>_shapley.json`` and ``<case_id>_shapley.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{expl.case_id}_shapley.json"
    json_path.write_text(json.dumps(expl.to_dict(), indent=2) + "\n")
    png_path = plot_explanation(expl, out / f"{expl.case_id}_shapley.png")
    return {"json": json_path, "png": png_path}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

EXPLAIN_DESCRIPTION = """\
Contrast-level Shapley values of a student on one case: how much each of t1n, t1c, t2w and t2f
adds to the predicted tumour volume (mm^3) of WT, TC and ET, or, with --gt, to their Dice. Exact:
the network runs on all 16 subsets of the contrasts (absent ones zero-filled after
normalisation, as for a missing contrast) and the Shapley weights |S|!(n-|S|-1)!/n! are applied.

Writes to --out: <case_id>_shapley.json (values per contrast and region, v(empty), v(all), the
efficiency check sum(phi) = v(all) - v(empty), and the value of every subset) and
<case_id>_shapley.png (bar chart).

With --gradcam, also a Grad-CAM (MONAI's GradCAM, or GradCAMpp with --gradcam-method gradcampp)
of each region the student predicts (or of --region alone): the mean log-odds of the region over
the voxels the student assigns to it, explained at --layer (default: the student's late decoder
stage): <case_id>_gradcam_<region>.nii.gz (float32 in [0, 1], on the case's grid and header)
and <case_id>_gradcam_<region>.png (T1c and FLAIR with the map and the segmentation).
"""


def register_explain(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain",
        help="contrast-level Shapley values of a student's segmentation of one case",
        description=EXPLAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="STUDENT", required=True,
                   help="student file written by a run (RUN_DIR/student.pt)")
    p.add_argument("--input", metavar="CASE_DIR", required=True,
                   help="one case folder (or a manifest .csv listing one case)")
    p.add_argument("--gt", metavar="SEG", default=None,
                   help="ground-truth segmentation on the case's grid: values become Dice "
                   "per region instead of volumes")
    add_labels_argument(p, of="--gt")
    p.add_argument("--out", metavar="DIR", default=".",
                   help="folder for the JSON and PNG (default: the current folder)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="value the raw argmax instead of the post-processed segmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the network runs: auto (CUDA when available, default), cpu, cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--gradcam", action="store_true",
                   help="also write Grad-CAM maps (NIfTI on the case's grid, and a PNG) of the "
                        "regions the student predicts")
    p.add_argument("--region", choices=tuple(REGIONS), default=None,
                   help="with --gradcam: only this region (default: every region predicted)")
    p.add_argument("--layer", metavar="NAME", default=None,
                   help="with --gradcam: the module to explain, a name of the student's "
                        "named_modules() (default: its late decoder stage; --list-layers)")
    p.add_argument("--gradcam-method", choices=("gradcam", "gradcampp"), default="gradcam",
                   help="with --gradcam: MONAI GradCAM (default) or GradCAMpp")
    p.add_argument("--list-layers", action="store_true",
                   help="print the student's module names (for --layer) and exit")
    from fedbrats.common.inference.predict import add_population_argument

    add_population_argument(p)
    p.set_defaults(func=run_explain)
    return p


def run_explain(args: argparse.Namespace) -> int:
    from fedbrats.common.data.cases import DataError, discover_cases
    from fedbrats.common.inference.gradcam import GradCamError
    from fedbrats.common.inference.modelfile import ModelFileError, load_student
    from fedbrats.common.inference.predict import PredictError, resolve_device

    source = Path(args.input)
    if not source.exists():
        print(f"error: {source}: case folder not found", file=sys.stderr)
        return 2
    try:
        cases = discover_cases(source)
        if len(cases) != 1:
            raise DataError(f"{source}: expected one case, found {len(cases)} "
                            f"({', '.join(c.case_id for c in cases[:5])}"
                            f"{', ...' if len(cases) > 5 else ''}); pass one case folder")
        student = load_student(args.model, device=resolve_device(args.device),
                               population=args.population)
        if args.list_layers:
            from fedbrats.common.inference.gradcam import default_layer, layer_names

            print("\n".join(layer_names(student)))
            print(f"(default for --gradcam: {default_layer(student)})")
            return 0
        expl = explain_case(student, cases[0], args.gt, args.labels,
                            apply_postprocess=args.postprocess, progress=args.progress)
        cams = _gradcams(args, student, cases[0]) if args.gradcam else []
    except (DataError, ModelFileError, PredictError, GradCamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_explanation(expl, args.out)
    s = expl.shapley
    unit = "mm^3" if expl.measure == "volume_mm3" else "Dice"
    print(f"{expl.case_id}: Shapley values ({unit})"
          + (f"; missing {', '.join(expl.missing)}" if expl.missing else ""))
    print(f"{'contrast':<10}" + "".join(f"{k:>12}" for k in s.keys))
    for p in s.players:
        print(f"{p:<10}" + "".join(f"{s.values[p][k]:>12.4g}" for k in s.keys))
    print(f"{'v(empty)':<10}" + "".join(f"{s.v_empty[k]:>12.4g}" for k in s.keys))
    print(f"{'v(all)':<10}" + "".join(f"{s.v_all[k]:>12.4g}" for k in s.keys))
    eff = s.efficiency()
    print("efficiency sum(phi) = v(all) - v(empty): "
          + ("ok" if all(e["ok"] for e in eff.values()) else "FAILED"))
    print(f"wrote {paths['json']} and {paths['png']}")
    for result, written in cams:
        print(f"Grad-CAM of {result.region} ({result.method}, layer {result.layer}, over the "
              f"{result.voxels} voxels the student assigns to it): wrote {written['nifti']} and "
              f"{written['png']}")
    return 0


def _gradcams(args: argparse.Namespace, student: Student, case: Case) -> list:
    """The Grad-CAM maps ``--gradcam`` asks for, written; ``[(GradCamResult, paths)]``."""
    from fedbrats.common.inference.gradcam import GradCamError, region_gradcam, write_gradcam
    from fedbrats.common.inference.predict import predict_case, prepare_case

    prepared = prepare_case(student, case)
    labels = predict_case(student, case, apply_postprocess=args.postprocess,
                          prepared=prepared).labels
    if args.region:
        regions = [args.region]
    else:  # every region the student predicts in the case (on the model grid)
        regions = [r for r in REGIONS if region_masks(labels, r).any()]
        if not regions:
            raise GradCamError(f"case {case.case_id}: the student predicts no tumour, so there "
                               "is no region to explain")
    results = region_gradcam(student, case, regions, args.layer, args.gradcam_method, prepared)
    return [(r, write_gradcam(r, prepared, labels, args.out)) for r in results]
