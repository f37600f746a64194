"""Five-population brain-tumour phantoms in the BraTS 2023 layout.

Anatomy comes from the MNI152 2009a template bundled with nilearn (T1 and grey/white-matter
probability maps, 1 mm). Each case:

1. deforms the template brain with a random affine (rotation, scaling, translation) and a smooth
   elastic field, both folded into one coordinate map for a single ``map_coordinates`` call;
2. grows tumours whose position, size, subregions, oedema and mass effect follow the population
   (one row per population in :data:`POPULATION_TABLE`);
3. synthesises T1n, T1c, T2w and FLAIR from tissue/lesion fractions with soft (partial-volume)
   lesion boundaries, then applies a smooth bias field, Rician noise and, where the population's
   scanners acquire thick slices, a slice profile along z; everything outside the brain is 0,
   as in skull-stripped BraTS data.

Labels follow :mod:`fedbrats.common.data.contract`: 1 NETC (necrosis, non-enhancing tumour, cysts),
2 SNFH
(oedema), 3 ET (enhancing tumour). Labels are hard; only the images see partial volume.

Everything is driven by ``numpy.random.default_rng((seed, population, index))``, so a case does
not depend on how many other cases are generated.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS, SEG_KEY, check_population
from fedbrats.common.data.provenance import mark_synthetic

__all__ = [
    "POPULATION_TABLE",
    "PhantomCase",
    "PopulationParams",
    "TemplateMissingError",
    "case_counts",
    "case_id",
    "default_spacing",
    "generate_case",
    "output_affine",
    "write_dataset",
]


# --------------------------------------------------------------------------------------------
# The population table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopulationParams:
    """How one BraTS population's cases look. Ranges are ``(low, high)``, drawn uniformly."""

    weight: float
    """Relative case count (BraTS 2023 training: GLI 1251, MEN 1000, MET 238, PED 99, SSA 60)."""
    brain_scale: tuple[float, float]
    """Linear brain size relative to an adult brain."""
    lesions: tuple[int, int]
    """Number of lesions per case."""
    radius_mm: tuple[float, float]
    """Radius of each tumour core (ET + NETC) in mm."""
    location: str
    """``deep_wm``, ``posterior_midline``, ``dural`` or ``grey_white``."""
    necrosis: tuple[float, float]
    """Radius of the necrotic centre as a fraction of the core radius (0: solid)."""
    enhancement: str
    """``rim`` (irregular ring), ``sparse`` (none or patchy), ``homogeneous`` or
    ``solid_or_rim`` (solid when small, ring when large)."""
    oedema: tuple[float, float]
    """How far oedema reaches beyond the core, in core radii (along white matter)."""
    cyst_prob: float
    """Chance of a fluid cyst (labelled NETC as in BraTS 2023)."""
    mass_effect: float
    """Fraction of the core volume that pushes tissue aside (1: pure displacement)."""
    irregularity: float
    """Log-amplitude of the low-frequency perturbation of the lesion radius."""
    noise: float
    """Noise sigma relative to grey-matter signal."""
    bias: float
    """Log-amplitude of the smooth multiplicative bias field."""
    slice_mm: float | None
    """Acquired slice thickness along z (None: isotropic acquisition)."""
    contrast: float
    """Tissue-contrast scale (1: a good 3 T scanner)."""


POPULATION_TABLE: dict[str, PopulationParams] = {
    # Adult glioma (mostly glioblastoma): one large deep white-matter mass, necrotic centre,
    # thick irregular enhancing rim, oedema fingering along white matter; good 3 T scanners.
    "GLI": PopulationParams(
        weight=1.00, brain_scale=(0.94, 1.06), lesions=(1, 1), radius_mm=(14.0, 24.0),
        location="deep_wm", necrosis=(0.55, 0.82), enhancement="rim", oedema=(0.35, 0.9),
        cyst_prob=0.10, mass_effect=0.45, irregularity=0.22,
        noise=0.025, bias=0.12, slice_mm=None, contrast=1.00,
    ),
    # Sub-Saharan Africa glioma: the same biology, presenting later (larger), acquired on
    # older low-field scanners: thick axial slices, strong noise and bias, less contrast.
    "SSA": PopulationParams(
        weight=0.05, brain_scale=(0.92, 1.06), lesions=(1, 1), radius_mm=(16.0, 26.0),
        location="deep_wm", necrosis=(0.55, 0.82), enhancement="rim", oedema=(0.45, 1.1),
        cyst_prob=0.10, mass_effect=0.45, irregularity=0.22,
        noise=0.070, bias=0.40, slice_mm=6.0, contrast=0.70,
    ),
    # Paediatric: smaller brains; pons, cerebellum or thalamus; mostly non-enhancing solid
    # tumour (NETC) with cysts, patchy enhancement in some, little oedema.
    "PED": PopulationParams(
        weight=0.08, brain_scale=(0.80, 0.90), lesions=(1, 1), radius_mm=(10.0, 19.0),
        location="posterior_midline", necrosis=(0.0, 0.25), enhancement="sparse",
        oedema=(0.05, 0.35), cyst_prob=0.55, mass_effect=0.70, irregularity=0.18,
        noise=0.030, bias=0.15, slice_mm=None, contrast=1.00,
    ),
    # Meningioma: extra-axial, dural-based, flat against the skull, pushes the brain aside;
    # avid homogeneous enhancement, little necrosis, variable oedema in the brain beneath.
    "MEN": PopulationParams(
        weight=0.80, brain_scale=(0.94, 1.06), lesions=(1, 1), radius_mm=(11.0, 24.0),
        location="dural", necrosis=(0.0, 0.15), enhancement="homogeneous", oedema=(0.0, 0.9),
        cyst_prob=0.03, mass_effect=1.00, irregularity=0.10,
        noise=0.030, bias=0.15, slice_mm=None, contrast=1.00,
    ),
    # Metastases: 1-10 small round lesions at the grey-white junction, solid when small and
    # ring-enhancing when larger, with oedema out of proportion to their size.
    "MET": PopulationParams(
        weight=0.19, brain_scale=(0.94, 1.06), lesions=(1, 10), radius_mm=(2.5, 11.0),
        location="grey_white", necrosis=(0.40, 0.70), enhancement="solid_or_rim",
        oedema=(1.0, 2.5), cyst_prob=0.00, mass_effect=0.30, irregularity=0.15,
        noise=0.030, bias=0.15, slice_mm=None, contrast=1.00,
    ),
}
"""One row per population; the single place where populations differ."""

# Mean signal of each tissue/lesion class in (t1n, t1c, t2w, t2f), scanner units.
INTENSITY: dict[str, tuple[float, float, float, float]] = {
    "csf": (180.0, 200.0, 1900.0, 120.0),  # dark T1, brightest T2, suppressed on FLAIR
    "gm": (520.0, 560.0, 960.0, 650.0),  # GM < WM on T1, GM > WM on T2 and FLAIR
    "wm": (780.0, 800.0, 640.0, 480.0),
    "oedema": (470.0, 490.0, 1550.0, 1150.0),  # slightly dark T1, bright T2 and FLAIR
    "et": (560.0, 1300.0, 1050.0, 820.0),  # bright only after gadolinium
    "necrosis": (300.0, 330.0, 1550.0, 620.0),  # dark T1, bright T2, medium FLAIR
    "cyst": (200.0, 215.0, 2000.0, 330.0),  # fluid: dark T1, very bright T2
    "solid": (440.0, 460.0, 1300.0, 930.0),  # non-enhancing solid tumour
    "men": (500.0, 1300.0, 1000.0, 700.0),  # meningioma: iso to GM, avid enhancement
}

# PED tumour sites (MNI mm boxes) and their weights: pons, cerebellum/vermis, thalamus.
_Range = tuple[float, float]
PED_SITES: dict[str, tuple[_Range, _Range, _Range, float]] = {
    "pons": ((-7.0, 7.0), (-34.0, -18.0), (-40.0, -20.0), 0.35),
    "cerebellum": ((-22.0, 22.0), (-72.0, -48.0), (-42.0, -22.0), 0.45),
    "thalamus": ((-18.0, 18.0), (-28.0, -6.0), (0.0, 14.0), 0.20),
}

FOV_MM = (160.0, 192.0, 155.0)
"""Field of view the head must fit into; grids never get finer than 1 mm."""
BRAIN_CENTRE_MNI = (0.0, -17.0, 5.0)
"""MNI point placed at the centre of every output grid."""
BASE_SCALE = 0.9
"""MNI152 brains are larger than native ones; this scale gives a ~1.4 l adult brain."""

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_LABEL_OF_RANK = np.array([0, 2, 1, 3], dtype=np.uint8)  # rank: 0 bg < SNFH < NETC < ET


class TemplateMissingError(FileNotFoundError):
    """The nilearn MNI152 template files cannot be found."""


# --------------------------------------------------------------------------------------------
# Grid helpers and the public small API
# --------------------------------------------------------------------------------------------


def _shape3(shape) -> tuple[int, int, int]:
    if isinstance(shape, int):
        shape = (shape, shape, shape)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        shape = shape * 3
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape}")
    return shape  # type: ignore[return-value]


def default_spacing(shape) -> tuple[float, float, float]:
    """Isotropic voxel size (mm) at which the head fits ``shape``; never finer than 1 mm.

    240x240x155 gives 1 mm (BraTS), 96^3 gives 2 mm, 128^3 1.5 mm, 64^3 3 mm.
    """
    shape = _shape3(shape)
    s = max(1.0, *(f / n for f, n in zip(FOV_MM, shape)))
    s = round(s, 4)
    return (s, s, s)


def output_affine(shape, spacing=None) -> np.ndarray:
    """RAS voxel-to-world affine of the output grid: ``spacing`` on the diagonal, the grid centre
    at :data:`BRAIN_CENTRE_MNI`."""
    shape = _shape3(shape)
    spacing = default_spacing(shape) if spacing is None else tuple(float(v) for v in spacing)
    aff = np.diag([*spacing, 1.0])
    centre = (np.array(shape, dtype=float) - 1) / 2
    aff[:3, 3] = np.array(BRAIN_CENTRE_MNI) - np.array(spacing) * centre
    return aff


def case_id(population: str, index: int) -> str:
    """BraTS 2023 case identifier, e.g. ``BraTS-GLI-00003-000``."""
    return f"BraTS-{check_population(population)}-{int(index):05d}-000"


def case_counts(n_largest: int, balanced: bool = False) -> dict[str, int]:
    """Cases per population: imbalanced like BraTS 2023 (GLI = ``n_largest``, SSA fewest),
    at least 2 each (or ``n_largest`` if that is smaller); ``balanced`` gives all the same."""
    n_largest = int(n_largest)
    if n_largest < 1:
        raise ValueError("n_largest must be at least 1")
    if balanced:
        return {p: n_largest for p in POPULATIONS}
    floor = min(2, n_largest)
    top = max(p.weight for p in POPULATION_TABLE.values())
    return {
        p: max(floor, int(round(n_largest * POPULATION_TABLE[p].weight / top)))
        for p in POPULATIONS
    }


@dataclass
class PhantomCase:
    """One synthetic case on the output grid."""

    images: dict[str, np.ndarray]
    """int16 volumes keyed ``t1n``, ``t1c``, ``t2w``, ``t2f``."""
    seg: np.ndarray
    """uint8 labels in {0, 1, 2, 3}."""
    affine: np.ndarray
    """4x4 RAS voxel-to-world affine."""
    population: str
    case_id: str
    brain_mask: np.ndarray
    """bool, the skull-stripped foreground (brain plus any extra-axial tumour)."""
    tissue: dict[str, np.ndarray] | None = None
    """float32 GM, WM and CSF fractions of the deformed brain (ignoring tumour), for checks."""
    info: dict = field(default_factory=dict)
    """Drawn parameters (scale, lesion centres and radii in mm, ...), for inspection."""

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


# --------------------------------------------------------------------------------------------
# Template and reference grids (cached per process)
# --------------------------------------------------------------------------------------------


def template_dir() -> Path:
    """Folder holding nilearn's bundled MNI152 2009a template (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateMissingError(
            "nilearn is not installed: the phantoms need its bundled MNI152 template "
            "(pip install nilearn==0.13.1)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray]:
    """``(channels, affine)``: channels (4, 197, 233, 189) float32 = GM, WM, CSF, brain mask."""
    import nibabel as nib

    folder = template_dir()
    arrays = {}
    affine = None
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise TemplateMissingError(
                f"MNI152 template file {name} not found in nilearn's data folder {folder}; "
                "reinstall nilearn (0.13.1 bundles it)"
            )
        img = nib.load(str(path))
        arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        affine = img.affine
    t1, gm, wm = arrays["t1"], arrays["gm"], arrays["wm"]
    mask = ndimage.binary_fill_holes(t1 > 0.02)
    # What GM and WM leave over is CSF where T1 is dark (ventricles, sulci) and white matter
    # where it is bright (brainstem, cerebellar peduncles, which the WM map under-counts).
    rest = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask
    dark = np.clip((0.62 - t1) / 0.30, 0.0, 1.0)
    csf = rest * dark
    wm = wm + rest * (1.0 - dark)
    channels = np.stack([gm, wm, csf, mask.astype(np.float32)]).astype(np.float32)
    return channels, np.asarray(affine, dtype=float)


@dataclass
class _Reference:
    """The template resampled onto one output grid (undeformed), plus placement helpers."""

    shape: tuple[int, int, int]
    spacing: float
    affine: np.ndarray
    tissue: np.ndarray  # (4, X, Y, Z) float32: GM, WM, CSF, mask
    wm_smooth: np.ndarray  # WM probability blurred over ~4 mm: where oedema spreads
    depth_mm: np.ndarray  # distance to the outside of the brain, mm
    axes_mni: tuple[np.ndarray, np.ndarray, np.ndarray]  # MNI coordinate of each index
    _candidates: dict = field(default_factory=dict)

    def candidates(self, rule: str) -> np.ndarray:
        """Flat indices of voxels where a lesion of ``rule`` may be centred."""
        if rule in self._candidates:
            return self._candidates[rule]
        gm, wm, csf, mask = self.tissue
        x, y, z = np.meshgrid(*self.axes_mni, indexing="ij", sparse=True)
        inside = mask > 0.5
        if rule == "deep_wm":
            sel = inside & (wm > 0.6) & (z > -12) & (np.abs(x) > 10) & (self.depth_mm > 12)
        elif rule == "grey_white":
            stem = (np.abs(x) < 14) & (y > -45) & (y < -5) & (z < -8)
            sel = inside & (gm > 0.3) & (gm < 0.75) & (wm > 0.2) & (self.depth_mm > 4) & ~stem
        elif rule == "dural":
            shell = self.depth_mm <= 1.5 * self.spacing
            sel = inside & shell & (z > -5) & (y > -85) & (y < 55)
        elif rule.startswith("ped:"):
            (x0, x1), (y0, y1), (z0, z1), _ = PED_SITES[rule[4:]]
            box = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)
            sel = inside & box & (gm + wm > 0.5)
        else:
            raise ValueError(f"unknown location rule {rule!r}")
        idx = np.flatnonzero(sel)
        if idx.size == 0:  # tiny grids: fall back to any brain voxel
            idx = np.flatnonzero(inside & (self.depth_mm > 2 * self.spacing))
        self._candidates[rule] = idx
        return idx


@lru_cache(maxsize=4)
def _reference(shape: tuple[int, int, int], spacing: float) -> _Reference:
    channels, t_aff = _template()
    aff = output_affine(shape, (spacing,) * 3)
    m = np.linalg.solve(t_aff, aff)  # output voxel -> template voxel (diagonal for RAS grids)
    tissue = np.empty((4, *shape), dtype=np.float32)
    for c in range(4):
        ndimage.affine_transform(
            channels[c],
            np.diag(m[:3, :3]),
            offset=m[:3, 3],
            output_shape=shape,
            output=tissue[c],
            order=1,
            mode="constant",
            cval=0.0,
        )
    inside = tissue[3] > 0.5
    depth = ndimage.distance_transform_edt(inside, sampling=spacing).astype(np.float32)
    axes = tuple(aff[a, a] * np.arange(shape[a]) + aff[a, 3] for a in range(3))
    wm_smooth = ndimage.gaussian_filter(tissue[1], 4.0 / spacing, truncate=2.5)
    return _Reference(tuple(shape), float(spacing), aff, tissue, wm_smooth, depth, axes)  # type: ignore


# --------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------


def _cosine_field(rng, shape, n_basis: int, count: int = 1) -> np.ndarray:
    """``count`` smooth random fields of unit-ish std on ``shape``: random low-order cosine
    (DCT-II) coefficients, evaluated separably, so no full-resolution filtering is needed."""
    bases = []
    for n in shape:
        t = (np.arange(n, dtype=np.float32) + 0.5) / n
        k = np.arange(n_basis, dtype=np.float32)
        bases.append(np.cos(np.pi * t[:, None] * k[None, :]).astype(np.float32))
    k = np.arange(n_basis)
    decay = 1.0 / (1.0 + (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    decay[0, 0, 0] = 0.0
    out = np.empty((count, *shape), dtype=np.float32)
    for c in range(count):
        coef = (rng.standard_normal((n_basis,) * 3) * decay).astype(np.float32)
        coef /= max(float(np.sqrt((coef**2).sum() / 8.0)), 1e-6)
        out[c] = np.einsum("ijk,xi,yj,zk->xyz", coef, *bases, optimize=True)
    return out


class _Waves:
    """Band-limited noise from a sum of random plane waves; unit variance, cheap on subsets."""

    def __init__(self, rng, wavelength: float, n: int = 8):
        dirs = rng.standard_normal((n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4, n))
        self.w = (dirs * k[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        self.norm = np.float32(np.sqrt(2.0 / n))

    def __call__(self, rel: np.ndarray, centred: bool = False) -> np.ndarray:
        out = np.sin(rel @ self.w.T + self.phase).sum(axis=1) * self.norm
        if centred:  # zero at the lesion centre, so the mean size is not shifted at random
            out -= np.sin(self.phase).sum() * self.norm
        return out


class _Speckle:
    """Fine random texture (tumour heterogeneity): smoothed white noise on a coarse lattice
    around the lesion, sampled with linear interpolation at arbitrary points."""

    def __init__(self, rng, half_width: float, cell: float):
        self.cell = float(cell)
        n = int(np.ceil(2 * half_width / self.cell)) + 4
        noise = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 0.6, mode="wrap")
        self.grid = (noise / max(float(noise.std()), 1e-6)).astype(np.float32)
        self.origin = -half_width - 2 * self.cell

    def __call__(self, rel: np.ndarray) -> np.ndarray:
        coords = ((rel - self.origin) / self.cell).T
        return ndimage.map_coordinates(self.grid, coords, order=1, mode="nearest")


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    centre: np.ndarray  # reference voxel coordinates
    radius: float  # reference voxels
    necrosis: float  # relative radius of the necrotic centre
    oedema: float  # reach beyond the core, in core radii
    enhancement: str
    irregularity: float
    mass: float
    rng_waves: tuple
    cyst: tuple[np.ndarray, float] | None = None
    normal: np.ndarray | None = None  # meningioma: outward normal of the brain surface
    dura: float = 0.0  # meningioma: dural plane offset from the centre along the normal
    patchy: float | None = None  # PED: threshold of patchy enhancement (None: none)
    solid_label: str = "et"
    min_rim: float = 1.5  # thinnest enhancing rim, reference voxels

    def reach(self) -> float:
        core = self.radius * np.exp(2.5 * self.irregularity)
        if self.cyst is not None:
            core = max(core, np.linalg.norm(self.cyst[0] - self.centre) + self.cyst[1] + 1)
        return core * (1.0 + self.oedema * 1.6) + 3.0


def _draw_lesions(rng, pop: str, p: PopulationParams, ref: _Reference, scale: float):
    """Place the case's lesions in reference-voxel space."""
    s = ref.spacing
    n = int(rng.integers(p.lesions[0], p.lesions[1] + 1))
    shape = ref.shape
    lesions: list[_Lesion] = []
    tries = 0
    while len(lesions) < n and tries < 200:
        tries += 1
        r_mm = float(rng.uniform(*p.radius_mm))
        if p.location == "grey_white":  # metastases: many small, few large
            r_mm = float(p.radius_mm[0] + (p.radius_mm[1] - p.radius_mm[0]) * rng.random() ** 2)
        r = max(r_mm / (s * scale), 1.05 / scale)
        if p.location == "posterior_midline":
            sites = list(PED_SITES)
            w = np.array([PED_SITES[k][3] for k in sites])
            rule = "ped:" + sites[int(rng.choice(len(sites), p=w / w.sum()))]
        else:
            rule = p.location
        cand = ref.candidates(rule)
        if p.location == "deep_wm":
            ok = cand[ref.depth_mm.ravel()[cand] > min(0.9 * r * s + 6, 32)]
            cand = ok if ok.size else cand
        centre = np.array(np.unravel_index(int(rng.choice(cand)), shape), dtype=np.float32)
        centre += rng.uniform(-0.5, 0.5, 3).astype(np.float32)
        if any(np.linalg.norm(centre - o.centre) < 1.3 * (r + o.radius) + 2 for o in lesions):
            continue
        irr = p.irregularity * (0.6 if r < 3 else 1.0)
        waves = (
            _Waves(rng, 2.2 * r + 2),
            _Waves(rng, 1.2 * r + 2),
            _Waves(rng, 1.5 * r + 4),
            None,  # texture, set below once the lesion's reach is known
        )
        nec = float(rng.uniform(*p.necrosis))
        enh = p.enhancement
        if enh == "solid_or_rim":
            nec = nec if r_mm > 5.0 and rng.random() < 0.75 else 0.0
        les = _Lesion(
            centre=centre,
            radius=float(r),
            necrosis=nec,
            oedema=float(rng.uniform(*p.oedema)),
            enhancement=enh,
            irregularity=irr,
            mass=p.mass_effect,
            rng_waves=waves,
            min_rim=max(2.0, 3.0 / (s * scale)),
        )
        if enh == "sparse":
            les.solid_label = "solid"
            les.patchy = float(rng.uniform(0.6, 1.4)) if rng.random() < 0.45 else None
        if enh == "homogeneous":
            les.solid_label = "men"
        if rng.random() < p.cyst_prob:
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            rc = r * rng.uniform(0.45, 0.85)
            offset = r * rng.uniform(0.3, 0.7)
            les.cyst = ((centre + direction * offset).astype(np.float32), float(rc))
        if p.location == "dural":
            normal = _surface_normal(ref, centre)
            les.normal = normal
            les.centre = (centre + normal * r * rng.uniform(-0.1, 0.05)).astype(np.float32)
            les.dura = float(r * rng.uniform(0.0, 0.05) + 1.0 / s)
        cell = max(1.2, 2.0 / (s * scale))
        les.rng_waves = (*waves[:3], _Speckle(rng, les.reach(), cell))
        lesions.append(les)
    return lesions


def _surface_normal(ref: _Reference, point: np.ndarray) -> np.ndarray:
    """Outward normal of the brain surface near ``point``: away from the local centre of mass."""
    rad = max(3, int(round(12.0 / ref.spacing)))
    lo = np.maximum(np.round(point).astype(int) - rad, 0)
    hi = np.minimum(np.round(point).astype(int) + rad + 1, ref.shape)
    block = ref.tissue[3][lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    com = np.array(ndimage.center_of_mass(block)) + lo
    normal = point - com
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm < 1e-3:
        normal = point - (np.array(ref.shape) - 1) / 2
        norm = np.linalg.norm(normal)
    return (normal / norm).astype(np.float32)


def _push(q: np.ndarray, les: _Lesion) -> None:
    """Mass effect, in place on (M, 3) points: tissue at distance d from the centre comes from
    ``cbrt(d^3 - m r^3)``, i.e. an incompressible expansion of a cavity of ``m`` core volumes."""
    rel = q - les.centre
    d = np.sqrt((rel * rel).sum(axis=1))
    r3 = les.mass * les.radius**3
    src = np.cbrt(np.maximum(d**3 - r3, 0.0))
    factor = np.where(d > 1e-6, src / np.maximum(d, 1e-6), 0.0).astype(np.float32)
    q[:] = les.centre + rel * factor[:, None]


def _evaluate(les: _Lesion, q: np.ndarray, gm, wm, mask, wm_smooth, w_edge: float):
    """Labels (as ranks) and class fractions of one lesion at (M, 3) reference points."""
    sw, iw, ow, tw = les.rng_waves
    rel = q - les.centre
    d = np.sqrt((rel * rel).sum(axis=1))
    rr = les.radius * np.exp(les.irregularity * np.clip(sw(rel, True), -2.5, 2.5))
    tex = tw(rel)
    core_soft = _sigmoid((rr - d) / w_edge)
    core = d < rr
    if les.normal is not None:  # meningioma: cut flat at the dura
        h = rel @ les.normal
        core &= h < les.dura
        core_soft = core_soft * _sigmoid((les.dura - h) / w_edge)
    else:
        core &= mask > 0.5
        core_soft = core_soft * np.clip(mask * 1.5, 0, 1)
    fr: dict[str, np.ndarray] = {}
    rank = np.zeros(len(q), dtype=np.uint8)
    inner = None
    if les.necrosis > 0:
        wobble = 0.35 * iw(rel, True) + 0.07 * tex  # nodular, uneven rim
        rn = np.minimum(les.necrosis * rr * np.exp(wobble), rr - les.min_rim)
        inner = d < rn
        inner_soft = _sigmoid((rn - d) / w_edge)
        fr["necrosis"] = core_soft * inner_soft
        outer_soft = core_soft * (1 - inner_soft)
    else:
        outer_soft = core_soft
    if les.enhancement == "sparse":
        fr["solid"] = outer_soft
        rank[core] = 2
        if les.patchy is not None:
            patch = iw(rel) * 0.8 + tex * 0.2 > les.patchy
            fr["et"] = outer_soft * patch
            fr["solid"] = outer_soft * ~patch
            rank[core & patch] = 3
    else:
        fr[les.solid_label] = outer_soft
        rank[core] = 3
    if inner is not None:
        rank[core & inner] = 2
    if les.cyst is not None:
        cc, rc = les.cyst
        dc = np.sqrt(((q - cc) ** 2).sum(axis=1))
        cyst = (dc < rc) & (mask > 0.5)
        cyst_soft = _sigmoid((rc - dc) / w_edge) * np.clip(mask * 1.5, 0, 1)
        for k in fr:
            fr[k] = fr[k] * (1 - cyst_soft)
        fr["cyst"] = cyst_soft
        rank[cyst] = 2
        core_soft = np.maximum(core_soft, cyst_soft)
        core = core | cyst
    # Oedema: reaches furthest along white matter, spares cortex and CSF.
    if les.oedema > 0:
        tissue = gm + wm
        along = np.clip(wm_smooth / 0.75, 0, 1)
        reach = rr * (1 + les.oedema * (0.15 + 0.85 * along) * np.exp(0.3 * ow(rel)))
        # intra-axial tumours infiltrate the tissue right around them; meningiomas do not
        near = (d < rr + 2.5) if les.normal is None else np.zeros(d.shape, dtype=bool)
        spare = np.maximum(np.clip((wm - 0.12) / 0.25, 0, 1), near)  # spares the cortex
        oed_soft = _sigmoid((reach - d) / (2.5 * w_edge)) * np.clip((tissue - 0.2) * 2, 0, 1)
        grade = np.clip((reach - d) / np.maximum(reach - rr, 1.0), 0, 1)  # fades outwards
        oed_soft *= spare * (0.7 + 0.3 * grade)
        oed = (d < reach) & (tissue > 0.45) & (mask > 0.5) & ~core & ((wm > 0.25) | near)
        rank[oed & (rank == 0)] = 1
        fr["oedema"] = oed_soft * (1 - core_soft)
    return rank, fr, core_soft, tex


# --------------------------------------------------------------------------------------------
# Case generation
# --------------------------------------------------------------------------------------------


def _rotation(rng, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _thick_slices(img: np.ndarray, k: int, offset: int) -> np.ndarray:
    """Acquire slices ``k`` voxels thick along z (box slice profile), then interpolate back."""
    if k < 2:
        return img
    nz = img.shape[2]
    prof = ndimage.uniform_filter1d(img, size=k, axis=2, mode="nearest")
    zs = np.arange(offset % k, nz, k)
    acquired = prof[:, :, zs]
    pos = np.clip((np.arange(nz) - zs[0]) / k, 0, len(zs) - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, len(zs) - 1)
    t = (pos - i0).astype(np.float32)
    return acquired[:, :, i0] * (1 - t) + acquired[:, :, i1] * t


def _coordinate_map(rng, shape: tuple[int, int, int], spacing: float, scale: float) -> np.ndarray:
    """Step 1: for every output voxel, the reference voxel it shows (``3, n_vox`` float32): a
    random scaling, rotation, shift and smooth displacement of the reference head."""
    aniso = rng.uniform(0.97, 1.03, 3)
    rot = _rotation(rng, 7.0)
    lin_inv = np.linalg.inv(rot @ np.diag(scale * aniso))  # output offset -> reference offset
    shift = rng.uniform(-4.0, 4.0, 3) / spacing
    centre = (np.array(shape, dtype=float) - 1) / 2
    axes = [np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(shape, centre)]
    disp = _cosine_field(rng, shape, 5, 3) * np.float32(rng.uniform(2.0, 4.0) / spacing / 2)
    q = np.empty((3, *shape), dtype=np.float32)
    for a in range(3):
        q[a] = disp[a] + np.float32(centre[a] - lin_inv[a] @ shift)
        q[a] += np.float32(lin_inv[a, 0]) * axes[0][:, None, None]
        q[a] += np.float32(lin_inv[a, 1]) * axes[1][None, :, None]
        q[a] += np.float32(lin_inv[a, 2]) * axes[2][None, None, :]
    del disp
    return q.reshape(3, -1)


def _lesion_subsets(q_flat: np.ndarray, lesions: list[_Lesion]) -> list[np.ndarray]:
    """The output voxels (flat indices) within reach of each lesion."""
    subsets = []
    for les in lesions:
        reach = les.reach()
        lo = les.centre - reach
        hi = les.centre + reach
        near = np.ones(q_flat.shape[1], dtype=bool)
        for a in range(3):
            near &= (q_flat[a] > lo[a]) & (q_flat[a] < hi[a])
        subsets.append(np.flatnonzero(near))
    return subsets


def _mass_effect(q_flat: np.ndarray, lesions: list[_Lesion]) -> np.ndarray:
    """Where tissue is sampled: the coordinate map with the tissue pushed aside by the lesions."""
    tq = q_flat.copy()
    for les in lesions:
        if les.mass <= 0:
            continue
        reach = 4.0 * les.radius + 4
        near = np.ones(tq.shape[1], dtype=bool)
        for a in range(3):
            near &= np.abs(tq[a] - les.centre[a]) < reach
        idx = np.flatnonzero(near)
        pts = np.ascontiguousarray(tq[:, idx].T)
        _push(pts, les)
        tq[:, idx] = pts.T
    return tq


@dataclass
class _Tissue:
    """Tissue fractions on the output grid (flat), and what the lesions need of them."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    union: np.ndarray
    """Sorted flat indices of the voxels within reach of any lesion."""
    wm_smooth: np.ndarray
    """Smoothed white matter on ``union``."""


def _sample_tissue(ref: _Reference, tq: np.ndarray, subsets: list[np.ndarray]) -> _Tissue:
    """Step 2: the reference's tissue fractions at ``tq`` (after the mass effect)."""
    n_vox = tq.shape[1]
    tissue = np.empty((4, n_vox), dtype=np.float32)
    for c in range(4):
        ndimage.map_coordinates(
            ref.tissue[c], tq, output=tissue[c], order=1, mode="constant", cval=0.0
        )
    in_union = np.zeros(n_vox, dtype=bool)
    for idx in subsets:
        in_union[idx] = True
    union = np.flatnonzero(in_union)
    del in_union
    wm_smooth = ndimage.map_coordinates(ref.wm_smooth, tq[:, union], order=1, cval=0.0)
    np.clip(tissue, 0.0, 1.0, out=tissue)
    gm, wm, csf, mask = tissue
    return _Tissue(gm=gm, wm=wm, csf=csf, mask=mask, union=union, wm_smooth=wm_smooth)


@dataclass
class _Labels:
    """The segmentation and the lesion class fractions of a case (flat arrays)."""

    seg: np.ndarray
    brain: np.ndarray
    frac: dict[str, np.ndarray]
    """Fraction of each tumour class (not oedema) on ``_Tissue.union``, summing to at most 1."""
    core_total: np.ndarray
    oedema: np.ndarray | None
    """Oedema fraction on ``_Tissue.union`` (None when no lesion has oedema)."""
    texture: np.ndarray
    """Texture of the lesion dominating each voxel of ``_Tissue.union``."""


def _evaluate_lesions(
    lesions: list[_Lesion], subsets: list[np.ndarray], q_flat: np.ndarray, t: _Tissue
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Every lesion on its voxels, combined: label rank (max over lesions), the skull beyond a
    meningioma's dural plane, class fractions (max over lesions) and texture, on ``t.union``."""
    n_vox = q_flat.shape[1]
    rank = np.zeros(n_vox, dtype=np.uint8)
    w_edge = 0.6
    skull = np.zeros(n_vox, dtype=bool)
    frac: dict[str, np.ndarray] = {}  # class fractions on ``union``, max over lesions
    best = np.zeros(t.union.size, dtype=np.float32)
    texture = np.zeros(t.union.size, dtype=np.float32)
    for les, idx in zip(lesions, subsets):
        if idx.size == 0:
            continue
        pos = np.searchsorted(t.union, idx)
        pts = np.ascontiguousarray(q_flat[:, idx].T)
        rk, fr, core_soft, tex = _evaluate(
            les, pts, t.gm[idx], t.wm[idx], t.mask[idx], t.wm_smooth[pos], w_edge
        )
        rank[idx] = np.maximum(rank[idx], rk)
        for cls, f in fr.items():
            acc = frac.setdefault(cls, np.zeros(t.union.size, dtype=np.float32))
            acc[pos] = np.maximum(acc[pos], f)
        take = core_soft >= best[pos]
        texture[pos[take]] = tex[take]
        best[pos] = np.maximum(best[pos], core_soft)
        if les.normal is not None:  # the skull: nothing beyond the dural plane
            rel = pts - les.centre
            h = rel @ les.normal
            lateral = np.linalg.norm(rel - h[:, None] * les.normal, axis=1)
            skull[idx[(h >= les.dura) & (lateral < 1.6 * les.radius)]] = True
    return rank, skull, frac, texture


def _label_lesions(
    lesions: list[_Lesion], subsets: list[np.ndarray], q_flat: np.ndarray, t: _Tissue,
    shape: tuple[int, int, int],
) -> _Labels:
    """Step 3: labels and lesion fractions; oedema detached from every tumour core is dropped."""
    rank, skull, frac, texture = _evaluate_lesions(lesions, subsets, q_flat, t)
    oedema = frac.pop("oedema", None)
    core_total = sum(frac.values()) if frac else np.zeros(t.union.size, dtype=np.float32)
    over = np.maximum(core_total, 1.0)
    frac = {k: v / over for k, v in frac.items()}
    core_total = np.minimum(core_total, 1.0)
    seg = _LABEL_OF_RANK[rank]
    seg[skull & (seg == 2)] = 0
    brain = ((t.mask > 0.5) & ~skull) | (seg > 0)
    seg[~brain] = 0
    if oedema is not None:  # oedema is contiguous with its tumour: drop detached islands
        lab, n = ndimage.label(seg.reshape(shape) > 0, structure=np.ones((3, 3, 3)))
        lab = lab.ravel()
        has_core = np.zeros(n + 1, dtype=bool)
        has_core[lab[(seg == 1) | (seg == 3)]] = True
        has_core[0] = True
        island = ~has_core[lab]
        seg[island] = 0
        oedema = oedema * ~island[t.union]
    return _Labels(seg=seg, brain=brain, frac=frac, core_total=core_total, oedema=oedema,
                   texture=texture)


def _contrast_levels(rng, p: PopulationParams) -> dict[str, np.ndarray]:
    """Intensity of each tissue class in each contrast, with this case's gains and contrast."""
    gains = rng.uniform(0.8, 1.25, 4)
    levels = {
        k: np.array(v) * rng.uniform(0.95, 1.05, 4) * gains for k, v in INTENSITY.items()
    }
    mid = (levels["gm"] + levels["wm"]) / 2
    return {k: mid + p.contrast * (v - mid) for k, v in levels.items()}


def _noise_free_image(
    lv: dict[str, np.float32], t: _Tissue, labels: _Labels, tissue_img: np.ndarray
) -> np.ndarray:
    """One contrast without bias, noise or slices (flat): the tissue mixture, swollen by oedema
    and replaced by the lesion classes. ``tissue_img`` is scratch space of the image's size."""
    np.multiply(t.gm, lv["gm"], out=tissue_img)
    tissue_img += t.wm * lv["wm"]
    tissue_img += t.csf * lv["csf"]
    img = tissue_img.copy()
    if t.union.size:
        g, w_ = t.gm[t.union], t.wm[t.union]
        base = tissue_img[t.union]
        if labels.oedema is not None:
            swell = (g + w_) * lv["oedema"] - (g * lv["gm"] + w_ * lv["wm"])
            base = base + labels.oedema * swell * (1 + 0.12 * labels.texture)
        val = np.zeros(t.union.size, dtype=np.float32)
        for cls, f in labels.frac.items():
            val += f * lv[cls]
        img[t.union] = (1 - labels.core_total) * base + val * (1 + 0.09 * labels.texture)
    return img


def _bias_field(rng, coords: list[np.ndarray], bias: float) -> np.ndarray:
    """A smooth multiplicative bias field (quadratic polynomial) on the grid of ``coords``."""
    a = rng.standard_normal(9).astype(np.float32) * np.float32(bias / 1.6)
    x, y, z = coords
    logb = (
        a[0] * x[:, None, None] + a[1] * y[None, :, None] + a[2] * z[None, None, :]
        + a[3] * (x**2 - 0.33)[:, None, None] + a[4] * (y**2 - 0.33)[None, :, None]
        + a[5] * (z**2 - 0.33)[None, None, :] + a[6] * (x[:, None] * y[None, :])[:, :, None]
        + a[7] * (x[:, None] * z[None, :])[:, None, :]
        + a[8] * (y[:, None] * z[None, :])[None, :, :]
    )
    return np.exp(logb)


def _rician_noise(rng, vol: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The magnitude of ``vol`` plus complex Gaussian noise of ``sigma`` (``vol`` is changed)."""
    shape = vol.shape
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n1 *= sigma
    vol += n1
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n1 *= sigma
    return np.sqrt(vol * vol + n1 * n1)  # Rician magnitude


def _render_images(
    rng, p: PopulationParams, shape: tuple[int, int, int], slice_k: int, t: _Tissue,
    labels: _Labels,
) -> dict[str, np.ndarray]:
    """Step 4: the four contrasts (int16), each with its bias field, Rician noise and (for thick
    slices) through-plane blur, zero outside the brain."""
    levels = _contrast_levels(rng, p)
    coords = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    slice_offset = int(rng.integers(0, 8))
    images: dict[str, np.ndarray] = {}
    tissue_img = np.empty(labels.seg.size, dtype=np.float32)
    for ci, key in enumerate(CONTRASTS):
        lv = {k: np.float32(v[ci]) for k, v in levels.items()}
        vol = _noise_free_image(lv, t, labels, tissue_img).reshape(shape)
        vol *= _bias_field(rng, coords, p.bias)
        vol = _rician_noise(rng, vol, np.float32(p.noise * lv["gm"]))
        vol = _thick_slices(vol, slice_k, slice_offset)
        vol[~labels.brain.reshape(shape)] = 0
        images[key] = np.clip(np.rint(vol), 0, 32767).astype(np.int16)
    return images


def _case_info(
    ref: _Reference, lesions: list[_Lesion], scale: float, spacing: float, slice_k: int
) -> dict:
    """The generation facts kept with a case (``PhantomCase.info``)."""
    return {
        "scale": scale,
        "spacing_mm": spacing,
        "slice_voxels": slice_k,
        "lesions": [
            {
                "centre_mni": [float(v) for v in (ref.affine @ np.r_[les.centre, 1.0])[:3]],
                "radius_mm": les.radius * spacing * scale,
                "necrosis": les.necrosis,
                "oedema": les.oedema,
                "cyst": les.cyst is not None,
            }
            for les in lesions
        ],
    }


def generate_case(population: str, index: int, shape=(96, 96, 96), seed: int = 0) -> PhantomCase:
    """Generate one synthetic case of ``population`` on a grid of ``shape`` (see module doc)."""
    pop = check_population(population)
    shape = _shape3(shape)
    p = POPULATION_TABLE[pop]
    rng = np.random.default_rng([int(seed), POPULATIONS.index(pop), int(index)])
    spacing = default_spacing(shape)[0]
    ref = _reference(shape, spacing)

    scale = BASE_SCALE * float(rng.uniform(*p.brain_scale))
    q_flat = _coordinate_map(rng, shape, spacing, scale)
    lesions = _draw_lesions(rng, pop, p, ref, scale)
    subsets = _lesion_subsets(q_flat, lesions)
    tissue = _sample_tissue(ref, _mass_effect(q_flat, lesions), subsets)
    labels = _label_lesions(lesions, subsets, q_flat, tissue, shape)
    slice_k = 1 if p.slice_mm is None else max(2, int(round(p.slice_mm / spacing)))
    images = _render_images(rng, p, shape, slice_k, tissue, labels)
    return PhantomCase(
        images=images,
        seg=labels.seg.reshape(shape),
        affine=output_affine(shape, (spacing,) * 3),
        population=pop,
        case_id=case_id(pop, index),
        brain_mask=labels.brain.reshape(shape),
        tissue={"gm": tissue.gm.reshape(shape), "wm": tissue.wm.reshape(shape),
                "csf": tissue.csf.reshape(shape)},
        info={"seed": int(seed), **_case_info(ref, lesions, scale, spacing, slice_k)},
    )


# --------------------------------------------------------------------------------------------
# Writing a data set
# --------------------------------------------------------------------------------------------


def _save(path: Path, data: np.ndarray, affine: np.ndarray, what: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    mark_synthetic(img, what)  # the provenance mark: a site with data-kind 'real' refuses it
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_zooms(tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0))))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_case(case: PhantomCase, out_dir: Path) -> Path:
    """Write one case as ``out_dir/<POP>/<case_id>/<case_id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``."""
    case_dir = Path(out_dir) / case.population / case.case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    what = f"phantom {case.case_id} seed={case.info.get('seed', '?')}"
    for key in CONTRASTS:
        _save(case_dir / f"{case.case_id}-{key}.nii.gz", case.images[key], case.affine, what)
    _save(case_dir / f"{case.case_id}-{SEG_KEY}.nii.gz", case.seg.astype(np.uint8),
          case.affine, what)
    return case_dir


def write_dataset(
    out_dir, counts: dict[str, int], shape=(96, 96, 96), seed: int = 0, progress: bool = True
) -> list[Path]:
    """Generate and write ``counts[pop]`` cases per population in the BraTS 2023 layout.

    Returns the case directories, populations in :data:`fedbrats.common.data.contract.POPULATIONS`
    order.
    """
    out_dir = Path(out_dir)
    shape = _shape3(shape)
    todo = [(check_population(k), int(v)) for k, v in counts.items() if int(v) > 0]
    todo.sort(key=lambda kv: POPULATIONS.index(kv[0]))
    total = sum(n for _, n in todo)
    dirs: list[Path] = []
    for pop, n in todo:
        for i in range(n):
            case = generate_case(pop, i, shape=shape, seed=seed)
            dirs.append(write_case(case, out_dir))
            if progress:
                print(f"[{len(dirs)}/{total}] {case.case_id}", file=sys.stderr, flush=True)
    return dirs
