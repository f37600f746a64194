"""The frozen teacher's outputs at a site, computed once per training case (run setting
``teacher-cache``): distillation steps then read them instead of running the teacher."""

from __future__ import annotations

import hashlib
import math

import torch

from fedbrats.client.data import SiteError, load_site_data
from fedbrats.client.teacher import teacher_path
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.transforms import teacher_outputs_dataset
from fedbrats.common.networks.models import TappedModel, probe_tap_shapes, spatial_divisor

TEACHER_CACHE = "teacher-cache"
"""Folder in the site's work folder where the teacher's outputs are kept, one file per case."""

_KEPT: dict[str, tuple[tuple, object]] = {}
"""Per site (work folder): the key and dataset of the last teacher-output dataset built in
this process (a new teacher replaces it)."""


def teacher_digest(site: SiteConfig) -> str:
    """SHA-256 of the site's teacher file: the teacher-output cache's key to its teacher."""
    h = hashlib.sha256()
    with open(teacher_path(site), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def feature_strides(teacher: TappedModel, patch_size: int) -> dict[str, int]:
    """Each tap's stride: how many input voxels per feature voxel along every axis."""
    strides = {}
    for tap, shape in probe_tap_shapes(teacher.net, teacher.taps, patch_size).items():
        ratios = {patch_size / n for n in shape[1:]}
        ratio = ratios.pop()
        if ratios or not ratio.is_integer():
            raise SiteError(f"teacher tap {tap}: feature grid {shape[1:]} for a {patch_size}^3 "
                            "crop is not the crop divided by one integer stride; set "
                            "teacher-cache false")
        strides[tap] = int(ratio)
    return strides


def teacher_training_data(site: SiteConfig, run: RunConfig, teacher: TappedModel,
                          device: torch.device):
    """The site's training crops, each with its frozen teacher's logits and features
    (:func:`~fedbrats.common.data.transforms.teacher_outputs_dataset`), kept in
    ``work-dir/teacher-cache`` and built once per process and teacher."""
    if teacher.spec is None:
        raise SiteError("the teacher's network spec is unknown; set teacher-cache false")
    data = load_site_data(site, run)
    strides = feature_strides(teacher, run.patch_size)
    stride = max(strides.values(), default=1)
    if run.patch_size % stride or 2 * stride > run.patch_size:
        raise SiteError(
            f"run setting patch-size: {run.patch_size} must be a multiple of the teacher's "
            f"coarsest feature stride ({stride}) and at least twice it, so that the kept "
            "features can be cropped with the case; change patch-size or set teacher-cache false")
    digest = teacher_digest(site)
    key = (id(data), digest, run.patch_size, run.sw_overlap, str(device), run.amp)
    slot = str(site.work_dir.resolve())
    if slot not in _KEPT or _KEPT[slot][0] != key:
        divisor = math.lcm(spatial_divisor(teacher.spec), stride)
        _KEPT[slot] = key, teacher_outputs_dataset(
            data.kept_train, teacher, device, site.work_dir / TEACHER_CACHE, digest,
            (run.patch_size,) * 3, divisor, strides, overlap=run.sw_overlap, amp=run.amp)
    return _KEPT[slot][1]


def clear_teacher_outputs() -> None:
    """Forget the teacher-output datasets built in this process."""
    _KEPT.clear()
