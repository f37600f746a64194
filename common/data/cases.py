"""Finding a site's cases, checking them against the data contract, and reading them.

Three layouts are discovered (see the README's "Data contract"):

* BraTS 2023/2024: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
* BraTS 2020/2021: ``{id}_{t1,t1ce,t2,flair,seg}.nii.gz`` (in a folder per case, or flat)
* a manifest CSV for any other layout: ``case_id, t1n, t1c, t2w, t2f, seg[, population][, brain_mask]``, paths
  relative to the manifest's folder, an empty cell for a contrast the case lacks.

Every check names the case, the file, what was expected and what was found. ``check_case`` collects
all problems of a case; ``load_case`` raises :class:`DataError` with all of them.
"""

from __future__ import annotations

import csv
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS, SEG_KEY
from fedbrats.common.data.labels import DEFAULT_CONVENTION, LabelError, to_internal
from fedbrats.common.data.provenance import header_mark

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# File-name suffix -> internal key, per naming scheme.
BRATS2023_KEYS = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": SEG_KEY}
BRATS2021_KEYS = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": SEG_KEY}
# Column names accepted in a manifest (lower-cased) -> internal key.
MANIFEST_COLUMNS = {
    **BRATS2023_KEYS,
    **BRATS2021_KEYS,
    "t1c_gd": "t1c",
    "t2_flair": "t2f",
    "label": SEG_KEY,
    "mask": SEG_KEY,
}
MANIFEST_ID_COLUMNS = ("case_id", "case", "id", "subject")
BRAIN_MASK_KEY = "brain_mask"
"""Manifest column (and :meth:`Case.files` key) of an optional brain mask."""
BACKGROUND_SHARE = 0.95
"""Share of a volume's border voxels that must hold one value for it to be the background."""

_RE_2023 = re.compile(r"^(?P<id>.+)-(?P<key>t1n|t1c|t2w|t2f|seg)$")
_RE_2021 = re.compile(r"^(?P<id>.+)_(?P<key>t1|t1ce|t2|flair|seg)$")
_RE_POPULATION = re.compile(r"BraTS-(?P<pop>GLI|SSA|PED|MEN|MET)\b", re.IGNORECASE)

AFFINE_TOLERANCE_MM = 1e-3


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis of a 4x4 voxel-to-world affine (array or tensor)."""
    a = np.asarray(affine, dtype=np.float64)
    x, y, z = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    return float(x), float(y), float(z)


class DataError(ValueError):
    """A case or a site folder does not meet the data contract."""


@dataclass(frozen=True)
class Case:
    """One case's files. ``images[c]`` is None for a contrast the case lacks."""

    case_id: str
    images: dict[str, Path | None]
    seg: Path | None = None
    population: str | None = None
    brain_mask: Path | None = None
    """A brain mask on the images' grid (manifest column ``brain_mask``): the background is
    every voxel outside it, instead of the detected one (:func:`background_of`)."""

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(c for c in CONTRASTS if self.images.get(c) is None)

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(c for c in CONTRASTS if self.images.get(c) is not None)

    def files(self) -> list[tuple[str, Path]]:
        out = [(c, p) for c in CONTRASTS if (p := self.images.get(c)) is not None]
        if self.seg is not None:
            out.append((SEG_KEY, self.seg))
        if self.brain_mask is not None:
            out.append((BRAIN_MASK_KEY, self.brain_mask))
        return out


@dataclass
class LoadedCase:
    """A case read into memory, labels in the internal convention.

    ``image`` is ``C, H, W, D`` float32 in contract channel order, zeros for missing contrasts
    (``present`` says which channels are real); ``seg`` is ``H, W, D`` uint8 or None.
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray
    present: tuple[bool, ...]
    population: str | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return voxel_spacing(self.affine)


@dataclass
class CaseReport:
    """What ``check_case`` found: facts for a table, and every problem."""

    case_id: str
    contrasts: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    label_values: tuple[int, ...] | None = None
    background: str | None = None
    """What was taken for the background outside the brain: ``zero``, ``constant V`` (a
    pre-normalised image's fill value, per contrast where they differ), ``brain mask`` or
    ``none found``."""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Usable, but worth a look (no background found)."""
    synthetic: str | None = None
    """The synthetic-data mark one of its files carries (``fedbrats.common.data.provenance``),
    or None: no file has it."""

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def population_from_id(case_id: str) -> str | None:
    """The population a BraTS 2023/2024 case id names (``BraTS-MEN-00012-000`` -> MEN)."""
    m = _RE_POPULATION.search(case_id)
    return m.group("pop").upper() if m else None


def discover_cases(site_dir: str | Path, manifest: str | Path | None = None) -> list[Case]:
    """All cases in ``site_dir`` (or listed in ``manifest``), sorted by case id.

    ``site_dir`` may itself be a manifest ``.csv``. Raises :class:`DataError` when the folder
    does not exist, or holds no case in a known layout.
    """
    site = Path(site_dir)
    if manifest is None and site.suffix.lower() == ".csv":
        manifest, site = site, site.parent
    if manifest is not None:
        return read_manifest(manifest)
    if not site.exists():
        raise DataError(f"{site}: site folder not found")
    if not site.is_dir():
        raise DataError(f"{site}: expected a folder of cases or a manifest .csv, found a file")

    groups: dict[str, dict[str, Path]] = {}
    unrecognised: list[Path] = []
    for path in sorted(site.rglob("*")):
        if not path.is_file():
            continue
        stem = _strip_nifti(path.name)
        if stem is None:
            continue
        m = _RE_2023.match(stem)
        keys = BRATS2023_KEYS
        if m is None:
            m = _RE_2021.match(stem)
            keys = BRATS2021_KEYS
        if m is None:
            unrecognised.append(path)
            continue
        case_key = str(path.parent / m.group("id"))
        files = groups.setdefault(case_key, {})
        key = keys[m.group("key")]
        if key in files:
            raise DataError(
                f"case {m.group('id')}: two files for {key}: {files[key]} and {path}"
            )
        files[key] = path

    if not groups:
        example = f" (for example {unrecognised[0].name})" if unrecognised else ""
        raise DataError(
            f"{site}: no cases found. Expected BraTS 2023 names "
            "(BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz ...) or BraTS 2021 names "
            f"(<id>_t1.nii.gz, _t1ce, _t2, _flair, _seg); found {len(unrecognised)} other NIfTI "
            f"files{example}. For any other layout pass a manifest CSV (--manifest)."
        )

    cases = []
    for case_key, files in groups.items():
        case_id = Path(case_key).name
        cases.append(
            Case(
                case_id=case_id,
                images={c: files.get(c) for c in CONTRASTS},
                seg=files.get(SEG_KEY),
                population=population_from_id(case_id),
            )
        )
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{site}: case ids found in more than one folder: {', '.join(dupes)}")
    return sorted(cases, key=lambda c: c.case_id)


def read_manifest(manifest: str | Path) -> list[Case]:
    """Cases from a manifest CSV (see the module docstring)."""
    path = Path(manifest)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        id_col = next((h for h in MANIFEST_ID_COLUMNS if h in header), None)
        if id_col is None:
            raise DataError(
                f"{path}: expected a case id column ({' or '.join(MANIFEST_ID_COLUMNS)}), "
                f"found columns {header}"
            )
        columns = {h: MANIFEST_COLUMNS[h] for h in header if h in MANIFEST_COLUMNS}
        if not any(k in CONTRASTS for k in columns.values()):
            raise DataError(
                f"{path}: expected at least one contrast column ({', '.join(CONTRASTS)}), "
                f"found columns {header}"
            )
        unknown = [h for h in header
                   if h not in columns and h not in (id_col, "population", BRAIN_MASK_KEY)]
        if unknown:
            raise DataError(
                f"{path}: unknown columns {unknown}; expected {id_col}, "
                f"{', '.join(CONTRASTS)}, seg and optionally population, {BRAIN_MASK_KEY}"
            )
        cases, seen = [], set()
        for lineno, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            case_id = row.get(id_col, "")
            if not case_id:
                raise DataError(f"{path}, line {lineno}: empty case id")
            if case_id in seen:
                raise DataError(f"{path}, line {lineno}: case id {case_id!r} appears twice")
            seen.add(case_id)
            images: dict[str, Path | None] = dict.fromkeys(CONTRASTS)
            seg = None
            for col, key in columns.items():
                cell = row.get(col, "")
                if not cell:
                    continue
                file = Path(cell) if Path(cell).is_absolute() else path.parent / cell
                if key == SEG_KEY:
                    seg = file
                else:
                    images[key] = file
            mask_cell = row.get(BRAIN_MASK_KEY, "")
            brain_mask = None
            if mask_cell:
                brain_mask = (Path(mask_cell) if Path(mask_cell).is_absolute()
                              else path.parent / mask_cell)
            pop = row.get("population") or population_from_id(case_id)
            if pop and pop.upper() not in POPULATIONS:
                raise DataError(
                    f"{path}, line {lineno}: population {pop!r}; expected one of "
                    f"{', '.join(POPULATIONS)}"
                )
            cases.append(Case(case_id, images, seg, pop.upper() if pop else None, brain_mask))
    if not cases:
        raise DataError(f"{path}: the manifest lists no cases")
    return cases


# --------------------------------------------------------------------------------------------
# Checks and loading
# --------------------------------------------------------------------------------------------


def _read_volume(case_id: str, key: str, path: Path, problems: list[str]):
    """Read one NIfTI volume; on failure append a problem and return None."""
    import nibabel as nib

    where = f"case {case_id}, {key} file {path}"
    if not path.is_file():
        problems.append(f"{where}: file not found")
        return None
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        problems.append(f"{where}: unreadable or truncated NIfTI ({type(e).__name__}: {e})")
        return None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        problems.append(f"{where}: expected a 3-D image, found shape {tuple(data.shape)}")
        return None
    return data, np.asarray(img.affine, dtype=np.float64), header_mark(img.header)


def _read_case(case: Case, convention: str) -> tuple[CaseReport, LoadedCase | None]:
    report = CaseReport(case.case_id, contrasts=case.present, missing=case.missing)
    problems = report.problems
    if not case.present:
        problems.append(
            f"case {case.case_id}: no image file; expected at least one of {', '.join(CONTRASTS)}"
        )
        return report, None

    ref_key: str | None = None
    ref_shape: tuple[int, ...] | None = None
    ref_affine: np.ndarray | None = None
    image: np.ndarray | None = None
    seg = mask = None
    for key, path in case.files():
        read = _read_volume(case.case_id, key, path, problems)
        if read is None:
            continue
        data, affine, mark = read
        report.synthetic = report.synthetic or mark
        where = f"case {case.case_id}, {key} file {path}"
        if ref_shape is None:
            ref_key, ref_shape, ref_affine = key, tuple(data.shape), affine
            image = np.zeros((len(CONTRASTS), *ref_shape), dtype=np.float32)
            report.shape = ref_shape
            report.spacing = tuple(round(s, 4) for s in voxel_spacing(affine))
        elif tuple(data.shape) != ref_shape:
            problems.append(
                f"{where}: shape {tuple(data.shape)} differs from {ref_key}'s {ref_shape}"
            )
            continue
        elif not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
            diff = float(np.abs(affine - ref_affine).max())
            problems.append(
                f"{where}: affine differs from {ref_key}'s by up to {diff:.4g} mm "
                f"(expected identical grids, tolerance {AFFINE_TOLERANCE_MM} mm)"
            )
            continue

        if key == BRAIN_MASK_KEY:
            mask = np.asarray(data) > 0
            if not mask.any():
                problems.append(f"{where}: the brain mask is empty (expected non-zero voxels "
                                "on the brain)")
            continue
        if key == SEG_KEY:
            if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
                problems.append(f"{where}: segmentation contains NaN or inf")
                continue
            try:
                seg = to_internal(data, convention, source=f"case {case.case_id}, seg file {path}")
            except LabelError as e:
                problems.append(str(e))
                continue
            report.label_values = tuple(int(v) for v in np.unique(data))
            continue

        arr = np.asarray(data, dtype=np.float32)
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            problems.append(f"{where}: {n_bad} voxels are NaN or inf (expected finite values)")
            continue
        lo, hi = float(arr.min()), float(arr.max())
        if lo == hi:
            problems.append(
                f"{where}: empty image (every voxel is {lo:g}; expected a brain scan)"
            )
            continue
        image[CONTRASTS.index(key)] = arr

    if problems or image is None:
        return report, None
    report.background = _zero_background(image, case, mask, report.warnings)
    loaded = LoadedCase(
        case_id=case.case_id,
        image=image,
        seg=seg,
        affine=ref_affine,
        present=tuple(c in case.present for c in CONTRASTS),
        population=case.population,
    )
    return report, loaded


def background_of(volume: np.ndarray) -> float | None:
    """The value that fills ``volume``'s background: the one held by at least
    :data:`BACKGROUND_SHARE` of its border voxels (its six faces), or None when there is none
    (an image that is not skull-stripped, or noise at the border)."""
    faces = [volume[i].ravel() for i in (0, -1)] + [volume[:, i].ravel() for i in (0, -1)]
    faces += [volume[:, :, i].ravel() for i in (0, -1)]
    border = np.concatenate(faces)
    values, counts = np.unique(border, return_counts=True)
    top = int(counts.argmax())
    return float(values[top]) if counts[top] >= BACKGROUND_SHARE * border.size else None


def _zero_background(image: np.ndarray, case: Case, mask: np.ndarray | None,
                     warnings: list[str]) -> str:
    """Make each present contrast's background exactly zero, in place, so that the crop to
    the brain, its z-score and the zero-filling of missing contrasts see what a BraTS image
    gives them: with a brain mask, every voxel outside it; else a constant fill value found at
    the border (:func:`background_of`; a pre-normalised image's, e.g. -3.6) is subtracted (the
    z-score is unchanged by the shift). Returns what was used (``CaseReport.background``)."""
    if mask is not None:
        for i, c in enumerate(CONTRASTS):
            if case.images.get(c) is not None:
                image[i][~mask] = 0.0
        return "brain mask"
    used: dict[str, str] = {}
    for i, c in enumerate(CONTRASTS):
        if case.images.get(c) is None:
            continue
        value = background_of(image[i])
        if value is None:
            used[c] = "none found"
        elif value == 0.0:
            used[c] = "zero"
        else:
            image[i] -= np.float32(value)
            used[c] = f"constant {value:.4g}"
    lacking = [c for c, v in used.items() if v == "none found"]
    if lacking:
        warnings.append(
            f"case {case.case_id}: {', '.join(lacking)}: no zero or constant background at the "
            f"volume's border ({BACKGROUND_SHARE:.0%} of its voxels one value); the crop keeps "
            "the whole volume and the z-score includes whatever surrounds the brain. "
            f"Skull-strip it, or give a {BRAIN_MASK_KEY} column in a manifest")
    kinds = set(used.values())
    if len(kinds) == 1:
        return kinds.pop()
    return ", ".join(f"{c} {v}" for c, v in used.items())


def check_case(case: Case, convention: str = DEFAULT_CONVENTION) -> CaseReport:
    """Run every data-contract check on ``case``; never raises for bad data."""
    report, _ = _read_case(case, convention)
    return report


def load_case(
    case: Case, convention: str = DEFAULT_CONVENTION, require_seg: bool = False
) -> LoadedCase:
    """Read and check ``case``; raise :class:`DataError` listing every problem found."""
    report, loaded = _read_case(case, convention)
    if require_seg and case.seg is None:
        report.problems.append(
            f"case {case.case_id}: no segmentation file; expected {case.case_id}-seg.nii.gz "
            "(or a seg column in the manifest)"
        )
    if report.problems or loaded is None:
        raise DataError("\n".join(report.problems))
    return loaded


def check_site(
    cases: Iterable[Case], convention: str = DEFAULT_CONVENTION
) -> list[CaseReport]:
    """``check_case`` over many cases; never stops at the first bad one."""
    return [check_case(c, convention) for c in cases]
