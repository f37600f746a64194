"""``fedbrats predict``: segment cases with a student file, on each input's own voxel grid.

For every case (one case folder, a site folder, or a manifest CSV, as
:func:`~fedbrats.common.data.cases.discover_cases` finds them):

1. read and check it as training does (:func:`~fedbrats.common.data.cases.load_case`); a contrast
the case lacks
   is a zero channel after normalisation, as in training;
2. preprocess it with the training pipeline (``fedbrats.common.data.transforms.preprocessing``: RAS,
crop to the
   brain, resample to the model's spacing, z-score);
3. MONAI ``sliding_window_inference`` at the model's patch size (Gaussian blending); with
   ``tta`` or ``uncertainty="tta"``, over the input and its 7 flipped copies (every combination
   of flips along the three axes), averaging the softmax
   (:mod:`fedbrats.common.inference.sliding_window`);
4. bring the class probabilities back onto the input's grid with MONAI's ``Invertd`` (the inverse
   of the resampling, crop and reorientation; trilinear), then take the argmax;
5. post-process (:func:`postprocess`, thresholds from the model file) and convert the labels to
   the convention asked for.

Outputs (:func:`write_outputs`), each on the input's grid with its affine and header:

==============================  =================================================================
``<case_id>.nii.gz``            the segmentation, uint8, in the chosen label convention
``<case_id>_entropy.nii.gz``    ``uncertainty="entropy"``: predictive entropy of the softmax
                                (nats, 0 to ln 4 = 1.386), float32
``<case_id>_tta_var.nii.gz``    ``uncertainty="tta"``: variance of the softmax over the 8 flips,
                                averaged over the four classes, float32
``<case_id>_confidence.nii.gz`` with an uncertainty map: the softmax probability of the predicted
                                class (before post-processing), float32, for calibration
``<case_id>_zones.nii.gz``      ``zone_edges``: infiltration risk zones around the whole tumour,
                                uint8 (:mod:`fedbrats.common.inference.infiltration`)
``<case_id>_overlay.png``       ``overlay=True``: T1c and FLAIR through the tumour centre, axial,
                                coronal, sagittal, with the segmentation
==============================  =================================================================

Heavy libraries (torch, MONAI, nibabel, scipy, matplotlib) are imported inside the functions so
that ``fedbrats --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedbrats.common.data.cases import Case, voxel_spacing
from fedbrats.common.data.contract import CONTRASTS, REGIONS, region_masks
from fedbrats.common.data.labels import DEFAULT_CONVENTION, add_labels_argument
from fedbrats.common.inference.modelfile import PostprocessThresholds, Student

if TYPE_CHECKING:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

__all__ = [
    "DEFAULT_OVERLAP",
    "UNCERTAINTY_KINDS",
    "PostprocessReport",
    "PredictError",
    "PredictResult",
    "PreparedCase",
    "class_probabilities",
    "output_paths",
    "postprocess",
    "predict_case",
    "predictive_entropy",
    "prepare_case",
    "region_volumes",
    "render_overlay",
    "resolve_device",
    "to_input_grid",
    "write_outputs",
]

log = logging.getLogger(__name__)

DEFAULT_OVERLAP = 0.5
"""Sliding-window overlap of ``fedbrats predict`` (the windows of training-time validation
overlap by the run setting sw-overlap, 0.25 by default)."""

UNCERTAINTY_KINDS = ("entropy", "tta")
DEVICES = ("auto", "cpu", "cuda")


class PredictError(RuntimeError):
    """Prediction cannot run as asked (e.g. no CUDA device, an input that is not there)."""


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostprocessReport:
    """What :func:`postprocess` changed."""

    removed_components: int = 0
    """Tumour components removed for being under ``min_component_mm3``."""
    removed_mm3: float = 0.0
    """Their total volume."""
    et_relabelled_mm3: float = 0.0
    """Volume of ET turned into NETC (0 when the ET rule did not apply)."""


def voxel_volume(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mm^3."""
    return float(np.prod([float(s) for s in spacing]))


def postprocess(
    labels: np.ndarray,
    spacing: Sequence[float],
    thresholds: PostprocessThresholds = PostprocessThresholds(),  # noqa: B008 (frozen)
) -> tuple[np.ndarray, PostprocessReport]:
    """Clean an internal-convention label map ``H, W, D`` (values 0-3) in two steps.

    1. Remove every 26-connected component of the tumour (WT: labels 1-3) whose volume is under
       ``thresholds.min_component_mm3``.
    2. Then, if the remaining enhancing tumour (label 3) is under ``thresholds.et_min_mm3`` in
       total, relabel it NETC (1).

    Volumes are voxel counts times the voxel volume from ``spacing`` (mm). A threshold of 0 skips
    its step. Returns a new array (uint8) and what was changed; ``labels`` is left untouched.
    """
    from fedbrats.common.inference.postprocessing import clean_labels

    out, removed, removed_mm3, relabelled_mm3 = clean_labels(
        labels, spacing, thresholds.min_component_mm3, thresholds.et_min_mm3
    )
    return out, PostprocessReport(removed, removed_mm3, relabelled_mm3)


def region_volumes(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Volume (mm^3) of each region (WT, TC, ET) of an internal-convention label map."""
    vox = voxel_volume(spacing)
    return {r: float(np.count_nonzero(region_masks(labels, r))) * vox for r in REGIONS}


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> str:
    """``auto``: CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name not in DEVICES:
        raise PredictError(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError(
            "device 'cuda' asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device auto or --device cpu"
        )
    return name


@dataclass
class PreparedCase:
    """A case read from disk and preprocessed for the network, with the way back."""

    case: Case
    image: MetaTensor
    """``C, h, w, d`` network input on the model grid, carrying MONAI's record of the
    preprocessing (``applied_operations``) that :func:`to_input_grid` inverts."""
    transform: Compose
    raw: np.ndarray
    """``C, H, W, D`` float32 intensities as read from the files (zeros for missing contrasts)."""
    affine: np.ndarray
    """The input's voxel-to-world affine (4x4, float64)."""
    reference: Path
    """The input file whose header the outputs copy (the first contrast present)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.raw.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    @property
    def missing(self) -> tuple[str, ...]:
        return self.case.missing


def prepare_case(student: Student, case: Case) -> PreparedCase:
    """Read and check ``case`` (its segmentation, if any, is ignored) and run the training
    preprocessing at the student's spacing. Raises
    :class:`~fedbrats.common.data.cases.DataError`."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from fedbrats.common.data.cases import load_case
    from fedbrats.common.data.transforms import IMAGE, LoadCased, preprocessing

    images_only = dataclasses.replace(case, seg=None)
    loaded = load_case(images_only)
    steps = [t for t in preprocessing(student.spacing, require_seg=False)
             if not isinstance(t, LoadCased)]
    transform = Compose(steps)
    affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
    data = transform({IMAGE: MetaTensor(torch.from_numpy(loaded.image.copy()), affine=affine)})
    return PreparedCase(
        case=case,
        image=data[IMAGE],
        transform=transform,
        raw=loaded.image,
        affine=np.asarray(loaded.affine, dtype=np.float64),
        reference=next(p for c in CONTRASTS if (p := case.images.get(c)) is not None),
    )


def class_probabilities(
    student: Student,
    image: torch.Tensor,
    overlap: float = DEFAULT_OVERLAP,
    drop: Sequence[str] = (),
    tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax ``4, h, w, d`` (on the CPU) of the student on a ``4, h, w, d`` model-grid image.

    ``drop`` zeroes those contrasts first (the zero-filling of a missing contrast). With ``tta``
    the softmax is averaged over the 8 flip combinations, and their variance, averaged over the
    classes (``h, w, d``), comes back too; otherwise the second value is None
    (:func:`fedbrats.common.inference.sliding_window.sliding_window_softmax`).
    """
    import torch

    from fedbrats.common.inference.sliding_window import sliding_window_softmax

    if not 0 <= overlap < 1:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    unknown = [c for c in drop if c not in CONTRASTS]
    if unknown:
        raise ValueError(f"unknown contrasts {unknown}; expected some of {', '.join(CONTRASTS)}")
    device = torch.device(student.device)
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    x = x.detach().clone().float()
    for c in drop:
        x[CONTRASTS.index(c)] = 0
    with torch.no_grad():
        return sliding_window_softmax(student.network, x[None].to(device), student.patch_size,
                                      overlap, tta=tta, stitch_device=torch.device("cpu"))


def to_input_grid(prepared: PreparedCase, volume: torch.Tensor) -> np.ndarray:
    """Resample ``K, h, w, d`` model-grid channels onto the input's grid: ``K, H, W, D`` float32.

    MONAI's ``Invertd`` undoes the preprocessing in reverse order (resampling back trilinearly,
    padding the crop with zeros, reorienting to the file's axes); see
    :func:`fedbrats.common.data.transforms.to_input_grid`.
    """
    from fedbrats.common.data.transforms import to_input_grid as invert

    arr = invert(volume, prepared.image, prepared.transform)
    if tuple(arr.shape[1:]) != prepared.shape:
        raise RuntimeError(
            f"case {prepared.case.case_id}: resampled back to shape {tuple(arr.shape[1:])}, "
            f"expected the input's {prepared.shape}"
        )
    return arr


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``-sum_c p_c log p_c`` over axis 0 (nats), float32."""
    p = np.clip(probs, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (-terms.sum(axis=0)).astype(np.float32)


@dataclass
class PredictResult:
    """One case's prediction on the input's grid (labels in the internal convention)."""

    case_id: str
    labels: np.ndarray
    """``H, W, D`` uint8, internal convention (0 background, 1 NETC, 2 SNFH, 3 ET)."""
    affine: np.ndarray
    spacing: tuple[float, float, float]
    reference: Path
    missing: tuple[str, ...]
    volumes_mm3: dict[str, float]
    postprocessed: PostprocessReport | None
    """None when post-processing was off."""
    uncertainty: np.ndarray | None = None
    """``H, W, D`` float32 (entropy or TTA variance), or None."""
    uncertainty_kind: str | None = None
    confidence: np.ndarray | None = None
    """``H, W, D`` float32: the softmax probability of the predicted class (before
    post-processing), written beside an uncertainty map for calibration checks
    (``fedbrats evaluate --uncertainty``); None without one."""
    image: np.ndarray | None = None
    """``C, H, W, D`` input intensities (for the overlay)."""
    zones: np.ndarray | None = None
    """``H, W, D`` uint8 infiltration risk zones (:mod:`~fedbrats.common.inference.infiltration`),
    or None when not asked for."""
    zone_volumes_mm3: dict[str, float] | None = None


def predict_case(
    student: Student,
    case: Case,
    *,
    apply_postprocess: bool = True,
    uncertainty: str | None = None,
    overlap: float = DEFAULT_OVERLAP,
    drop: Sequence[str] = (),
    prepared: PreparedCase | None = None,
    tta: bool = False,
    zone_edges: Sequence[float] | None = None,
) -> PredictResult:
    """Segment one case on its own voxel grid (see the module docstring for the steps).

    ``uncertainty``: None, ``"entropy"`` or ``"tta"``. ``drop`` removes contrasts on top of
    those the case lacks (zero-filled). ``prepared`` reuses a :func:`prepare_case` result.
    ``tta`` (implied by ``uncertainty="tta"``) segments with the softmax averaged over the 8 flips.
    ``zone_edges`` ``(inner, first, second)`` mm: also the infiltration risk zones around the
    (post-processed) segmentation, in the case's brain.
    Raises :class:`~fedbrats.common.data.cases.DataError` for a case that fails the data checks.
    """
    if uncertainty is not None and uncertainty not in UNCERTAINTY_KINDS:
        raise ValueError(
            f"uncertainty {uncertainty!r}: expected None or one of {', '.join(UNCERTAINTY_KINDS)}"
        )
    import torch

    from fedbrats.common.data.transforms import normalise_probabilities

    prep = prepared if prepared is not None else prepare_case(student, case)
    if prep.missing:
        log.debug("case %s: no %s; zero-filled after normalisation", case.case_id,
                 ", ".join(prep.missing))
    probs, var = class_probabilities(student, prep.image, overlap, drop,
                                     tta=tta or uncertainty == "tta")
    if uncertainty != "tta":
        var = None
    stacked = probs if var is None else torch.cat([probs, var[None]], dim=0)
    back = to_input_grid(prep, stacked)
    probs_in = normalise_probabilities(back[: probs.shape[0]])
    labels = probs_in.argmax(axis=0).astype(np.uint8)
    confidence = probs_in.max(axis=0).astype(np.float32) if uncertainty is not None else None
    report = None
    if apply_postprocess:
        labels, report = postprocess(labels, prep.spacing, student.postprocess)
    unc = None
    if uncertainty == "entropy":
        unc = predictive_entropy(probs_in)
    elif uncertainty == "tta":
        unc = np.clip(back[probs.shape[0]], 0.0, None).astype(np.float32)
    zones = zone_mm3 = None
    if zone_edges is not None:
        from fedbrats.common.inference.infiltration import (
            brain_of,
            infiltration_zones,
            zone_volumes,
        )

        zones = infiltration_zones(labels, brain_of(prep.raw), prep.spacing, zone_edges)
        zone_mm3 = zone_volumes(zones, prep.spacing)
    return PredictResult(
        case_id=case.case_id,
        labels=labels,
        affine=prep.affine,
        spacing=prep.spacing,
        reference=prep.reference,
        missing=prep.missing,
        volumes_mm3=region_volumes(labels, prep.spacing),
        postprocessed=report,
        uncertainty=unc,
        uncertainty_kind=uncertainty,
        confidence=confidence,
        image=prep.raw,
        zones=zones,
        zone_volumes_mm3=zone_mm3,
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def output_paths(case_id: str, out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`write_outputs` puts each file of a case."""
    out = Path(out_dir)
    return {
        "seg": out / f"{case_id}.nii.gz",
        "entropy": out / f"{case_id}_entropy.nii.gz",
        "tta": out / f"{case_id}_tta_var.nii.gz",
        "zones": out / f"{case_id}_zones.nii.gz",
        "confidence": out / f"{case_id}_confidence.nii.gz",
        "overlay": out / f"{case_id}_overlay.png",
    }


def save_like(reference: Path, data: np.ndarray, path: Path) -> Path:
    """Write ``data`` as NIfTI with ``reference``'s affine and header (its dtype, no scaling)."""
    import nibabel as nib

    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def write_outputs(
    result: PredictResult,
    out_dir: str | Path,
    convention: str = DEFAULT_CONVENTION,
    overlay: bool = False,
) -> dict[str, Path]:
    """Write a case's files (module docstring); returns ``{"seg": path, ...}`` for those written."""
    from fedbrats.common.data.labels import from_internal

    paths = output_paths(result.case_id, out_dir)
    written = {"seg": save_like(result.reference, from_internal(result.labels, convention),
                                paths["seg"])}
    if result.uncertainty is not None:
        key = "entropy" if result.uncertainty_kind == "entropy" else "tta"
        written[key] = save_like(result.reference, result.uncertainty.astype(np.float32),
                                 paths[key])
    if result.confidence is not None:
        written["confidence"] = save_like(result.reference, result.confidence, paths["confidence"])
    if result.zones is not None:
        written["zones"] = save_like(result.reference, result.zones.astype(np.uint8),
                                     paths["zones"])
    if overlay:
        if result.image is None:
            raise ValueError("overlay needs the input image; predict_case keeps it in .image")
        written["overlay"] = render_overlay(
            result.image, result.labels, result.affine, paths["overlay"],
            title=_overlay_title(result),
        )
    return written


def _overlay_title(result: PredictResult) -> str:
    vols = ", ".join(f"{r} {v / 1000:.1f} ml" for r, v in result.volumes_mm3.items())
    miss = f" (no {', '.join(result.missing)})" if result.missing else ""
    return f"{result.case_id}{miss}: {vols}"


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    out_png: str | Path,
    title: str = "",
) -> Path:
    """A 2x3 PNG: T1c and FLAIR (rows), axial, coronal and sagittal slices through the tumour
    centre (columns), the internal-convention ``labels`` outlined (NETC red, SNFH green, ET
    yellow), in radiological orientation whatever the file's axes. A missing contrast is a
    black panel saying so."""
    import nibabel as nib

    from fedbrats.common.inference.render import render_views

    def canonical(vol: np.ndarray):
        img = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))
        return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])

    seg, zooms = canonical(np.asarray(labels, dtype=np.uint8))
    volumes = {name: canonical(np.asarray(image[CONTRASTS.index(key)], dtype=np.float32))[0]
               for key, name in (("t1c", "T1c"), ("t2f", "FLAIR"))}
    return render_views(volumes, seg, zooms, out_png, title)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

PREDICT_DESCRIPTION = """\
Segment one case folder, or every case of a site folder or manifest CSV, with a fedbrats student
file (the run folder's student.pt). Each case goes through the training preprocessing (RAS, crop
to the brain, the model's spacing, z-score; missing contrasts zero-filled), MONAI sliding-window
inference at the model's patch size, and back onto the input's own voxel grid, affine and header.

Writes to OUT_DIR, per case:
  <case_id>.nii.gz            segmentation, uint8, labels in --labels (default brats2023:
                              1 NETC, 2 SNFH, 3 ET)
  <case_id>_entropy.nii.gz    --uncertainty entropy: predictive entropy (nats), float32
  <case_id>_tta_var.nii.gz    --uncertainty tta: softmax variance over 8 flips, float32
  <case_id>_confidence.nii.gz with --uncertainty: softmax probability of the predicted class
  <case_id>_zones.nii.gz      --infiltration-zones: infiltration risk zones, uint8 (1 the
                              oedema's front, 2 the first margin, 3 the second)
  <case_id>_overlay.png       --overlay: T1c and FLAIR with the segmentation

Post-processing (on unless --no-postprocess) uses the thresholds stored in the model file
(defaults: tumour components under 50 mm^3 removed; ET relabelled NETC when all ET is under
100 mm^3). Exit status: 0 all cases written, 1 some case failed, 2 nothing could run.
"""


def register_predict(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="segment cases with a student model file",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="STUDENT", required=True,
                   help="student file written by a run (RUN_DIR/student.pt)")
    p.add_argument("--input", metavar="PATH", required=True,
                   help="a case folder, a site folder of cases (BraTS 2023/2024 or 2020/2021 "
                   "names), or a manifest .csv")
    p.add_argument("--out", metavar="OUT_DIR", required=True,
                   help="folder for the output files (created if needed)")
    add_labels_argument(p, of="the written segmentations")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="write the raw argmax, without removing small components or "
                   "relabelling small ET")
    p.add_argument("--uncertainty", choices=UNCERTAINTY_KINDS, default=None,
                   help="also write an uncertainty map: 'entropy' (predictive entropy of the "
                   "softmax) or 'tta' (variance over 8 flipped copies; 8x slower, and the "
                   "segmentation is then the flip-averaged one)")
    p.add_argument("--infiltration-zones", metavar="INNER,FIRST,SECOND", default=None,
                   help="also write <case_id>_zones.nii.gz: infiltration risk zones around the "
                        "predicted whole tumour, in the brain: 1 the oedema within INNER mm of "
                        "the tumour's edge, 2 up to FIRST mm outside it, 3 from FIRST to SECOND "
                        "mm (Euclidean, in mm on the input's grid; for example 5,10,20)")
    p.add_argument("--tta", action="store_true",
                   help="segment with the softmax averaged over the input and its 7 flipped "
                   "copies (8x slower; what a run's final evaluation does with final-tta on)")
    p.add_argument("--overlay", action="store_true",
                   help="also write <case_id>_overlay.png (T1c and FLAIR with the segmentation)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the network runs: auto (CUDA when available, default), cpu, cuda")
    p.add_argument("--sw-overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                   help="overlap of the sliding windows, in [0, 1) (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--public-key", metavar="PUB", default=None,
                   help="the consortium's public key (consortium.pub from fedbrats keys): "
                   "refuse the model unless its STUDENT.sig verifies (the file is unchanged since "
                   "the server signed it)")
    add_population_argument(p)
    p.set_defaults(func=run_predict)
    return p


def add_population_argument(p: argparse.ArgumentParser) -> None:
    """``--population``: which head of a student with one per population segments."""
    from fedbrats.common.data.contract import POPULATIONS

    p.add_argument("--population", choices=POPULATIONS, default=None,
                   help="the cases' population, for a student trained with a last block per "
                   "population (student-heads = \"population\"): its block segments; without it "
                   "the mean of all the blocks does. Ignored by a student with one last block")


def _fmt_ml(mm3: float) -> str:
    return f"{mm3 / 1000:.2f}"


def _untrained(student: Student, missing: Sequence[str]) -> str:
    """What the student's training says about segmenting without ``missing``."""
    if student.trained_without is None:
        return ""
    never = [c for c in missing if c not in student.trained_without]
    if not never:
        return ", as modality dropout did in training"
    return (f"; the student was never trained without {', '.join(never)} "
            "(run setting dropout-contrasts): expect it to do worse")


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedbrats.common.data.cases import DataError, discover_cases
    from fedbrats.common.data.labels import LabelError
    from fedbrats.common.inference.modelfile import ModelFileError, load_student

    zone_edges = None
    if args.infiltration_zones is not None:
        from fedbrats.common.inference.infiltration import parse_zone_edges

        try:
            zone_edges = parse_zone_edges(args.infiltration_zones)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not 0 <= args.sw_overlap < 1:
        print(f"error: --sw-overlap {args.sw_overlap}: expected a value in [0, 1)",
              file=sys.stderr)
        return 2
    source = Path(args.input)
    if not source.exists():
        print(f"error: {source}: input not found; expected a case folder, a site folder or a "
              "manifest .csv", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device)
        if args.public_key:
            from fedbrats.common.security.signing import SignatureError, verify_file

            try:
                verify_file(args.model, args.public_key)
            except SignatureError as e:
                print(f"error: refusing the model: {e}", file=sys.stderr)
                return 2
            print(f"model {args.model}: signature verified with {args.public_key}")
        student = load_student(args.model, device=device, population=args.population)
        cases = discover_cases(source)
    except (ModelFileError, DataError, PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {args.model}: {student.spec.arch}, {'x'.join(f'{s:g}' for s in student.spacing)}"
          f" mm, patch {'x'.join(map(str, student.patch_size))}, round {student.round}; "
          f"{len(cases)} case(s) on {device}")
    if student.heads:
        print(f"model {args.model}: {student.describe_heads()}")
    out_dir = Path(args.out)
    rows, failures = [], []
    bar = tqdm(cases, desc="predict", unit="case", disable=not args.progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        if case.missing:
            tqdm.write(f"{case.case_id}: missing {', '.join(case.missing)} "
                       f"(zero-filled after normalisation{_untrained(student, case.missing)})",
                       file=sys.stdout)
        try:
            result = predict_case(student, case, apply_postprocess=args.postprocess,
                                  uncertainty=args.uncertainty, overlap=args.sw_overlap,
                                  tta=args.tta, zone_edges=zone_edges)
            written = write_outputs(result, out_dir, args.labels, overlay=args.overlay)
        except (DataError, LabelError) as e:
            failures.append(str(e))
            tqdm.write(f"{case.case_id}: FAILED: {e}", file=sys.stdout)
            continue
        rows.append((result, written))
    bar.close()
    if rows:
        print(f"{'case':<24} {'WT ml':>7} {'TC ml':>7} {'ET ml':>7}  seg file")
        for result, written in rows:
            v = result.volumes_mm3
            print(f"{result.case_id:<24} {_fmt_ml(v['WT']):>7} {_fmt_ml(v['TC']):>7} "
                  f"{_fmt_ml(v['ET']):>7}  {written['seg']}")
        if zone_edges is not None:
            from fedbrats.common.inference.infiltration import ZONE_NAMES

            inner, first, second = zone_edges
            print(f"infiltration zones (ml): 1 {ZONE_NAMES[0]} (oedema within {inner:g} mm of "
                  f"the edge), 2 {ZONE_NAMES[1]} (0-{first:g} mm outside), 3 {ZONE_NAMES[2]} "
                  f"({first:g}-{second:g} mm)")
            print(f"{'case':<24} {'zone 1':>7} {'zone 2':>7} {'zone 3':>7}  zones file")
            for result, written in rows:
                z = [(result.zone_volumes_mm3 or {}).get(n, 0.0) for n in ZONE_NAMES]
                print(f"{result.case_id:<24} {_fmt_ml(z[0]):>7} {_fmt_ml(z[1]):>7} "
                      f"{_fmt_ml(z[2]):>7}  {written['zones']}")
    print(f"{len(rows)} of {len(cases)} case(s) written to {out_dir} (labels {args.labels})")
    if failures:
        print(f"{len(failures)} case(s) failed", file=sys.stderr)
        return 1
    return 0
