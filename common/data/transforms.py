"""Preprocessing, augmentation and cached datasets, built from MONAI transforms.

The pipeline a case goes through, in order (``preprocessing`` then ``augmentation``):

1. :class:`LoadCased`: read and check the case (``fedbrats.common.data.cases.load_case``), labels converted to
   the internal convention, missing contrasts as zero channels. Produces ``image`` (``C, H, W, D``
   MetaTensor with the affine), ``label`` (``1, H, W, D``), ``present`` (``C`` bools), ``case_id``.
2. ``Orientationd``: reorient to RAS.
3. ``CropForegroundd``: crop to the brain (voxels non-zero in any contrast; BraTS images are
   skull-stripped with a zero background).
4. ``Spacingd``: resample to the configured spacing (images trilinear, labels nearest).
5. ``NormalizeIntensityd``: z-score each contrast inside the brain (its non-zero voxels); a missing
   contrast stays all zero, i.e. the brain's mean.

Training adds, after the cache: ``SpatialPadd`` to the patch size, ``RandCropByPosNegLabeld``
(patches centred on tumour twice as often as on background), flips along each axis, and random
intensity scaling and shifts.

``CacheDataset`` keeps the output of steps 1-5 in memory, so epochs after the first do not read
NIfTI files again. An evaluation dataset (no patch size) also keeps ``label_input``
(:data:`INPUT_LABEL`): the label on the case's own grid, copied before step 2, against which
predictions brought back to that grid (:func:`to_input_grid`) are scored.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from fedbrats.common.data.cases import Case, DataError, load_case
from fedbrats.common.data.labels import DEFAULT_CONVENTION

log = logging.getLogger(__name__)

IMAGE, LABEL = "image", "label"
INPUT_LABEL = "label_input"
"""Key of the label on the case's own grid (evaluation datasets only)."""


class LoadCased(MapTransform):
    """Read the :class:`~fedbrats.common.data.cases.Case` under ``case_key`` into ``image``/``label`` tensors."""

    def __init__(
        self,
        convention: str = DEFAULT_CONVENTION,
        case_key: str = "case",
        require_seg: bool = True,
    ) -> None:
        super().__init__(keys=[case_key])
        self.case_key = case_key
        self.convention = convention
        self.require_seg = require_seg

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        case = d.pop(self.case_key)
        if not isinstance(case, Case):
            raise TypeError(f"LoadCased expects a Case under {self.case_key!r}, got {type(case)}")
        loaded = load_case(case, self.convention, require_seg=self.require_seg)
        affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
        d[IMAGE] = MetaTensor(torch.from_numpy(loaded.image), affine=affine)
        if loaded.seg is not None:
            d[LABEL] = MetaTensor(torch.from_numpy(loaded.seg[None].copy()), affine=affine.clone())
        d["present"] = torch.tensor(loaded.present, dtype=torch.bool)
        d["case_id"] = loaded.case_id
        return d


def preprocessing(
    spacing: Sequence[float] | None,
    convention: str = DEFAULT_CONVENTION,
    require_seg: bool = True,
) -> list:
    """Deterministic steps 1-5 (see the module docstring). ``spacing=None`` keeps the grid."""
    keys = [IMAGE, LABEL]
    steps: list = [
        LoadCased(convention, require_seg=require_seg),
        Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        CropForegroundd(keys=keys, source_key=IMAGE, allow_missing_keys=True),
    ]
    if spacing is not None:
        steps.append(
            Spacingd(
                keys=keys,
                pixdim=tuple(float(s) for s in spacing),
                mode=("bilinear", "nearest"),
                allow_missing_keys=True,
            )
        )
    steps.append(NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True))
    return steps


def augmentation(patch_size: Sequence[int], pos_fraction: float = 2 / 3) -> list:
    """Random training steps: tumour-biased crops, flips, intensity scaling and shifts."""
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    keys = [IMAGE, LABEL]
    patch = tuple(int(p) for p in patch_size)
    return [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=pos_fraction,
            neg=1.0 - pos_fraction,
            num_samples=1,
            image_key=IMAGE,
            image_threshold=0.0,
            allow_smaller=True,
        ),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
    ]


PREPROCESSING_VERSION = 1
"""Bumped whenever :func:`preprocessing` changes what it produces: cases kept on disk by an
older version (:func:`build_dataset` with a ``cache_dir``) are then preprocessed again."""


def case_cache_key(settings: Mapping[str, object]):
    """The ``hash_func`` of a site's persistent case cache: a case's key covers its id, every
    file's path, size and modification time, the preprocessing settings and
    :data:`PREPROCESSING_VERSION`, so that a changed file or setting is preprocessed again."""
    import hashlib
    import json

    def key(item: Mapping[str, object]) -> bytes:
        case = item["case"]
        if not isinstance(case, Case):
            raise TypeError(f"expected a Case under 'case', got {type(case).__name__}")
        files = []
        for name, path in case.files():
            st = path.stat()
            files.append([name, str(path.resolve()), st.st_size, st.st_mtime_ns])
        text = json.dumps({"case": case.case_id, "files": files, "settings": settings,
                           "version": PREPROCESSING_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32].encode()

    return key


class _KeptCases(PersistentDataset):
    """MONAI's ``PersistentDataset``, but a cache file that cannot be read (torn by a killed
    process, say) is preprocessed again rather than failing the round."""

    def _cachecheck(self, item_transformed):
        try:
            return super()._cachecheck(item_transformed)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
            path = Path(self.cache_dir) / f"{name}.pt"
            if not path.is_file():
                raise  # not the cache: a preprocessing error
            log.warning("%s: a torn cache file (%s); preprocessing the case again", path,
                        str(e).split(".")[0])
            path.unlink()
            return super()._cachecheck(item_transformed)


def _surface_data_error(e: RuntimeError) -> BaseException:
    """MONAI wraps errors in "applying transform ..."; the DataError inside, if any."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    return cause if cause is not None else e


def build_dataset(
    cases: Sequence[Case],
    spacing: Sequence[float] | None,
    patch_size: Sequence[int] | None = None,
    convention: str = DEFAULT_CONVENTION,
    num_workers: int = 0,
    progress: bool = False,
    require_seg: bool = True,
    cache_dir: Path | None = None,
):
    """A cached MONAI dataset over ``cases``; training crops when ``patch_size`` is given.

    Every case is read, checked and preprocessed once, when the dataset is built; a case that
    fails a check raises :class:`~fedbrats.common.data.cases.DataError` naming it. Without ``patch_size`` (an
    evaluation dataset) each item also carries :data:`INPUT_LABEL`.

    With ``cache_dir`` the preprocessed cases are also kept there (MONAI ``PersistentDataset``,
    one file per case, keyed by :func:`case_cache_key`), so that a new process (a deployment
    round) reads them instead of preprocessing every case again; a torn cache file is
    preprocessed again. Training then keeps them in memory too (``CacheDataset`` over the
    persistent one); an evaluation dataset reads each case from the cache when it is scored.
    """
    steps = preprocessing(spacing, convention, require_seg=require_seg)
    if patch_size is None:
        steps.insert(1, CopyItemsd(keys=LABEL, names=INPUT_LABEL, allow_missing_keys=True))
    data = [{"case": c} for c in cases]
    try:
        if cache_dir is None:
            return CacheDataset(
                data=data,
                transform=Compose(steps + (augmentation(patch_size) if patch_size else [])),
                cache_rate=1.0, num_workers=num_workers, progress=progress)
        settings = {"spacing": list(spacing) if spacing is not None else None,
                    "convention": convention, "require_seg": require_seg,
                    "evaluation": patch_size is None}
        kept = _KeptCases(data=data, transform=Compose(steps), cache_dir=cache_dir,
                          hash_func=case_cache_key(settings), track_meta=True,
                          weights_only=False)  # the site's own files, MetaTensors
        if patch_size is None:
            for i in range(len(kept)):  # preprocess (or check) every case now, as CacheDataset
                kept[i]  # does below for training (it reads each case once from the cache)
            return kept
        return CacheDataset(data=kept, transform=Compose(augmentation(patch_size)),
                            cache_rate=1.0, num_workers=num_workers, progress=progress)
    except RuntimeError as e:
        cause = _surface_data_error(e)
        if cause is e:
            raise
        raise cause from None


def to_input_grid(volume: torch.Tensor, image: MetaTensor, transform: Compose) -> np.ndarray:
    """Bring ``K, h, w, d`` channels on the model grid back to the grid of the case's files.

    ``image`` is the preprocessed image, whose record of the steps (``applied_operations``)
    MONAI's ``Invertd`` undoes in reverse order with ``transform``'s invertible steps: the
    resampling (trilinear), the crop (zero padding), the reorientation. Returns ``K, H, W, D``
    float32.
    """
    invert = Invertd(keys="pred", transform=transform, orig_keys=IMAGE, nearest_interp=False)
    # a MetaTensor, so that Invertd takes the record of the preprocessing from the image
    pred = MetaTensor(torch.as_tensor(volume).detach().float().cpu())
    out = invert({IMAGE: image, "pred": pred})["pred"]
    return np.asarray(torch.as_tensor(out).numpy(), dtype=np.float32)


def normalise_probabilities(probs: np.ndarray) -> np.ndarray:
    """Probabilities summing to 1 per voxel; voxels outside the brain crop (all zero after the
    inverse crop) become certain background."""
    total = probs.sum(axis=0)
    outside = total <= 1e-6
    probs = probs / np.where(outside, 1.0, total)[None]
    probs[0][outside] = 1.0
    return probs


def first_sample(item) -> dict:
    """RandCropByPosNegLabeld returns a list of samples; unwrap the single one."""
    if isinstance(item, list):
        return item[0]
    return item


def as_numpy_labels(label: torch.Tensor) -> np.ndarray:
    """``1, H, W, D`` label tensor -> ``H, W, D`` uint8 array."""
    return label.detach().cpu().numpy()[0].astype(np.uint8)
