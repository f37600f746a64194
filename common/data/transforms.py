"""Preprocessing, augmentation and cached datasets, built from MONAI transforms.

The pipeline a case goes through, in order (``preprocessing`` then ``augmentation``):

1. :class:`LoadCased`: read and check the case (``fedbrats.common.data.cases.load_case``), labels converted to
   the internal convention, missing contrasts as zero channels. Produces ``image`` (``C, H, W, D``
   MetaTensor with the affine), ``label`` (``1, H, W, D``), ``present`` (``C`` bools), ``case_id``.
2. ``Orientationd``: reorient to RAS.
3. ``CropForegroundd``: crop to the brain (voxels non-zero in any contrast; BraTS images are
   skull-stripped with a zero background; ``load_case`` makes a pre-normalised image's constant
   background, or everything outside a manifest's brain mask, zero first).
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

import contextlib
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
    DeleteItemsd,
    DivisiblePadd,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    Randomizable,
    RandShiftIntensityd,
    SpatialCrop,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices

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


def nonzero(x):
    """The brain: voxels non-zero in any contrast (its background is zero after
    :class:`LoadCased`; a z-scored brain has negative values too)."""
    return x != 0


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
        CropForegroundd(keys=keys, source_key=IMAGE, select_fn=nonzero,
                        allow_missing_keys=True),
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


PREPROCESSING_VERSION = 2
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
    process, say) is preprocessed again rather than failing the round; and an item read back
    from its file has the same types as one just computed. (MONAI turns every tensor and array
    of an item it reads back into a ``MetaTensor``; a batch that mixed a case read back with a
    case computed in this process, as after a case is added or its file changes, then failed
    to collate: "'Tensor' object has no attribute 'meta'".)"""

    def _cachecheck(self, item_transformed):
        return _same_types(self._cached_or_computed(item_transformed))

    def _cached_or_computed(self, item_transformed):
        try:
            return super()._cachecheck(item_transformed)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
            path = Path(self.cache_dir) / f"{name}.pt"
            if not path.is_file():
                raise  # not the cache: a preprocessing error
            log.warning("%s: a torn cache file (%s); refused, computing it again", path,
                        str(e).split(".")[0])
            path.unlink()
            return super()._cachecheck(item_transformed)


_IMAGE_KEYS = (IMAGE, LABEL, INPUT_LABEL)


def _same_types(item):
    """Only the images (and labels) of a kept item are ``MetaTensor``s; its other tensors and
    arrays (``present``, the foreground box) are plain tensors, read back or not."""
    if not isinstance(item, dict):
        return item
    out = {}
    for key, value in item.items():
        if key not in _IMAGE_KEYS and isinstance(value, MetaTensor):
            value = value.as_tensor()
        elif key not in _IMAGE_KEYS and isinstance(value, np.ndarray):
            value = torch.as_tensor(value)
        out[key] = value
    return out


@contextlib.contextmanager
def _data_errors_surfaced():
    """MONAI wraps errors in "applying transform ..."; raise the DataError inside, if any."""
    try:
        yield
    except RuntimeError as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def _case_steps(spacing: Sequence[float] | None, convention: str, require_seg: bool,
                evaluation: bool) -> list:
    """:func:`preprocessing`; an evaluation dataset also copies :data:`INPUT_LABEL` first."""
    steps = preprocessing(spacing, convention, require_seg=require_seg)
    if evaluation:
        steps.insert(1, CopyItemsd(keys=LABEL, names=INPUT_LABEL, allow_missing_keys=True))
    return steps


def kept_cases(cases: Sequence[Case], spacing: Sequence[float] | None, cache_dir: Path,
               convention: str = DEFAULT_CONVENTION, require_seg: bool = True,
               evaluation: bool = False) -> PersistentDataset:
    """``cases`` after :func:`preprocessing`, kept in ``cache_dir`` (MONAI ``PersistentDataset``,
    one file per case keyed by :func:`case_cache_key`; a torn file is preprocessed again). An
    evaluation dataset's items also carry :data:`INPUT_LABEL`."""
    steps = _case_steps(spacing, convention, require_seg, evaluation)
    settings = {"spacing": list(spacing) if spacing is not None else None,
                "convention": convention, "require_seg": require_seg, "evaluation": evaluation}
    return _KeptCases(data=[{"case": c} for c in cases], transform=Compose(steps),
                      cache_dir=cache_dir, hash_func=case_cache_key(settings), track_meta=True,
                      weights_only=False)  # the site's own files, MetaTensors


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
    with _data_errors_surfaced():
        if cache_dir is None:
            steps = _case_steps(spacing, convention, require_seg, patch_size is None)
            return CacheDataset(
                data=[{"case": c} for c in cases],
                transform=Compose(steps + (augmentation(patch_size) if patch_size else [])),
                cache_rate=1.0, num_workers=num_workers, progress=progress)
        kept = kept_cases(cases, spacing, cache_dir, convention, require_seg,
                          evaluation=patch_size is None)
        if patch_size is None:
            for i in range(len(kept)):  # preprocess (or check) every case now, as CacheDataset
                kept[i]  # does below for training (it reads each case once from the cache)
            return kept
        return training_dataset(kept, patch_size, num_workers, progress)


def training_dataset(kept: PersistentDataset, patch_size: Sequence[int], num_workers: int = 0,
                     progress: bool = False) -> CacheDataset:
    """Training crops (:func:`augmentation`) of the cases in ``kept`` (:func:`kept_cases`), each
    read once from the cache and held in memory."""
    with _data_errors_surfaced():
        return CacheDataset(data=kept, transform=Compose(augmentation(patch_size)),
                            cache_rate=1.0, num_workers=num_workers, progress=progress)


# --------------------------------------------------------------------------------------------
# The teacher's outputs, computed once per case (run setting teacher-cache)
# --------------------------------------------------------------------------------------------

TEACHER_LOGITS = "teacher_logits"
"""Key of the frozen teacher's logits (``C, H, W, D`` float16) on the case's padded grid."""
TEACHER_FEATURE = "teacher_feature:"
"""Prefix of the keys of the teacher's tapped features (``TEACHER_FEATURE + tap``), each
``C_tap, H / s, W / s, D / s`` float16 for the tap's stride ``s``."""


def teacher_padding(patch_size: Sequence[int], divisor: int) -> list:
    """Zero padding (the brain's mean after normalisation) of a case to at least the patch and a
    multiple of ``divisor`` per axis: the grid on which the teacher's outputs are kept."""
    keys = [IMAGE, LABEL]
    return [SpatialPadd(keys=keys, spatial_size=tuple(int(p) for p in patch_size)),
            DivisiblePadd(keys=keys, k=int(divisor))]


class TeacherOutputsd(MapTransform):
    """Run a frozen teacher (a ``TappedModel``) once over the whole case under ``image`` and keep
    its logits (:data:`TEACHER_LOGITS`) and tapped features (:data:`TEACHER_FEATURE` + tap),
    float16 on the CPU. The teacher sees windows of ``roi_size`` (the training crop, so that
    its normalisation layers see what they saw in training), blended by MONAI's
    ``sliding_window_inference`` (Gaussian weights; the features on their own coarser grids).
    The case must already be padded (:func:`teacher_padding`)."""

    def __init__(self, teacher: torch.nn.Module, device: torch.device, roi_size: Sequence[int],
                 overlap: float, amp: bool = False) -> None:
        super().__init__(keys=[IMAGE])
        self.teacher, self.device, self.amp = teacher, device, amp and device.type == "cuda"
        self.roi_size, self.overlap = tuple(int(r) for r in roi_size), float(overlap)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from monai.inferers import sliding_window_inference

        d = dict(data)
        image = d[IMAGE]
        x = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))
        taps = list(self.teacher.taps)

        def predictor(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits, feats = self.teacher(window)
            return (logits, *(feats[t] for t in taps))

        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=self.amp):
                outs = sliding_window_inference(
                    x.float()[None].to(self.device), roi_size=self.roi_size, sw_batch_size=2,
                    predictor=predictor, overlap=self.overlap, mode="gaussian")
        finally:
            self.teacher.train(was_training)
        d[TEACHER_LOGITS] = torch.as_tensor(outs[0])[0].detach().to("cpu", torch.float16)
        for tap, f in zip(taps, outs[1:]):
            d[TEACHER_FEATURE + tap] = torch.as_tensor(f)[0].detach().to("cpu", torch.float16)
        return d


class RandAlignedCropd(Randomizable, MapTransform):
    """A random crop centred on tumour with probability ``pos`` (else on brain), as MONAI's
    ``RandCropByPosNegLabeld`` draws it, applied also to keys on coarser grids
    (``coarse_keys``: key -> its stride, which divides ``stride``): the teacher's features.

    ``keys`` (on the label's grid) are cut exactly. A coarse key of stride ``f`` is cut at the
    same place: where the crop starts between two of its cells (``start`` not a multiple of
    ``f``), each of its cells is the linear interpolation of the two cells it overlaps, per axis
    (the value at the crop's own cell centres), so the crop may start anywhere, as in training
    without kept outputs. The label's grid must be a multiple of ``stride`` and at least
    ``spatial_size``, which must be a multiple of ``stride``."""

    def __init__(self, keys: Sequence[str], label_key: str, image_key: str,
                 spatial_size: Sequence[int], stride: int, pos: float,
                 coarse_keys: Mapping[str, int] | None = None) -> None:
        MapTransform.__init__(self, keys)
        self.label_key, self.image_key = label_key, image_key
        self.size = tuple(int(v) for v in spatial_size)
        self.stride, self.pos = int(stride), float(pos)
        self.coarse = dict(coarse_keys or {})
        if any(v % self.stride for v in self.size):
            raise ValueError(f"crop {self.size} must be a multiple of the stride {self.stride} "
                             "on every axis")
        if any(self.stride % f for f in self.coarse.values()):
            raise ValueError(f"coarse strides {self.coarse} must divide {self.stride}")

    @staticmethod
    def _coarse_crop(x, start: Sequence[int], size: Sequence[int], f: int):
        """``x`` (``C, *grid / f``) at the cells of the fine crop ``start`` + ``size``."""
        x = torch.as_tensor(x)
        region = x.float()
        for axis, (a, p) in enumerate(zip(start, size)):
            cell, w, m = a // f, (a % f) / f, p // f
            lo = region.narrow(axis + 1, cell, m)
            if w:  # between two cells: the grid is a multiple of f, so cell + m exists
                lo = (1 - w) * lo + w * region.narrow(axis + 1, cell + 1, m)
            region = lo
        return region.to(x.dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        label = d[self.label_key]
        shape = tuple(int(v) for v in label.shape[1:])
        if any(n % self.stride or n < p for n, p in zip(shape, self.size)):
            raise ValueError(f"{d.get('case_id', 'a case')}: grid {shape} is not a multiple of "
                             f"{self.stride} of at least {self.size}; pad it first")
        fg, bg = map_binary_to_indices(label, d[self.image_key], 0.0)
        centre = generate_pos_neg_label_crop_centers(self.size, 1, self.pos, shape, fg, bg,
                                                     self.R)[0]
        start = [min(max(0, int(c) - p // 2), n - p)
                 for c, p, n in zip(centre, self.size, shape)]
        end = [a + p for a, p in zip(start, self.size)]
        for key in self.key_iterator(d):
            d[key] = SpatialCrop(roi_start=start, roi_end=end)(d[key])
        for key, f in self.coarse.items():
            d[key] = self._coarse_crop(d[key], start, self.size, f)
        return d


def teacher_augmentation(patch_size: Sequence[int], stride: int,
                         feature_strides: Mapping[str, int],
                         pos_fraction: float = 2 / 3) -> list:
    """:func:`augmentation` for cases that carry the teacher's outputs: the crop cut from the
    features too (:class:`RandAlignedCropd`), the flips applied to the teacher's logits and
    features too, the intensity changes to the image only (the teacher saw the case
    without them)."""
    coarse = {TEACHER_FEATURE + tap: int(f) for tap, f in feature_strides.items()}
    fine = [IMAGE, LABEL, TEACHER_LOGITS]
    every = fine + list(coarse)
    return [
        RandAlignedCropd(fine, LABEL, IMAGE, patch_size, stride, pos_fraction, coarse),
        *[RandFlipd(keys=every, prob=0.5, spatial_axis=a) for a in range(3)],
        RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
    ]


class _Mapped(torch.utils.data.Dataset):
    """``dataset`` with a deterministic ``transform`` applied to each item when it is read."""

    def __init__(self, dataset, transform: Compose) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset[i])


class _WithTeacherOutputs(torch.utils.data.Dataset):
    """A padded case joined with its kept teacher outputs."""

    def __init__(self, cases: _Mapped, outputs: PersistentDataset, cache_dir: Path) -> None:
        self.cases, self.outputs, self.cache_dir = cases, outputs, cache_dir

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        item, out = self.cases[i], self.outputs[i]
        grid = tuple(item[LABEL].shape[1:])
        if out.get("case_id") != item["case_id"] or tuple(out[TEACHER_LOGITS].shape[1:]) != grid:
            raise DataError(f"{self.cache_dir}: the teacher outputs kept for "
                            f"{item['case_id']} do not fit it (case {out.get('case_id')!r}, grid "
                            f"{tuple(out[TEACHER_LOGITS].shape[1:])}, expected {grid}); delete "
                            "the folder to compute them again")
        return {**item, **{k: v for k, v in out.items()
                           if k == TEACHER_LOGITS or str(k).startswith(TEACHER_FEATURE)}}


TEACHER_OUTPUTS_VERSION = 1
"""Bumped whenever :class:`TeacherOutputsd` or :func:`teacher_padding` change what is kept."""


def teacher_outputs_dataset(kept: PersistentDataset, teacher: torch.nn.Module,
                            device: torch.device, cache_dir: Path, teacher_digest: str,
                            patch_size: Sequence[int], divisor: int,
                            feature_strides: Mapping[str, int], overlap: float = 0.25,
                            amp: bool = False):
    """Training crops of the cases in ``kept`` (:func:`kept_cases`) with the frozen teacher's
    outputs (:class:`TeacherOutputsd`), computed once per case and kept in ``cache_dir``
    (a ``PersistentDataset`` keyed by the case's own key, ``teacher_digest`` and the padding:
    a changed case, teacher or setting computes them again; a torn file is refused and computed
    again), held in memory (``CacheDataset``) and cropped and flipped with the case
    (:func:`teacher_augmentation`, aligned to the coarsest feature stride)."""
    import hashlib
    import json

    patch = tuple(int(p) for p in patch_size)
    stride = max([1, *feature_strides.values()])
    settings = {"teacher": teacher_digest, "patch_size": list(patch), "divisor": int(divisor),
                "overlap": float(overlap), "version": TEACHER_OUTPUTS_VERSION}
    case_keys = {}
    for item in kept.data:
        case = item["case"]
        case_keys[case.case_id] = kept.hash_func(item).decode()

    def key(item: Mapping[str, object]) -> bytes:
        text = json.dumps({"case": case_keys[str(item["case_id"])], **settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32].encode()

    pad = Compose(teacher_padding(patch, divisor))
    padded = _Mapped(kept, pad)
    outputs = _KeptCases(
        data=padded, transform=Compose([TeacherOutputsd(teacher, device, patch, overlap, amp),
                                        DeleteItemsd(keys=[IMAGE, LABEL, "present"])]),
        cache_dir=cache_dir, hash_func=key, weights_only=False)
    with _data_errors_surfaced():
        return CacheDataset(
            data=_WithTeacherOutputs(padded, outputs, cache_dir),
            transform=Compose(teacher_augmentation(patch, stride, feature_strides)),
            cache_rate=1.0, num_workers=0, progress=False)


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
