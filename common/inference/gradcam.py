"""Grad-CAM of the 3-D student for a tumour region, on the input's own grid.

MONAI's :class:`monai.visualize.GradCAM` and :class:`~monai.visualize.GradCAMpp` explain a
classifier's class score. For segmentation the score of a region is made a scalar first
(Seg-Grad-CAM, Vinogradova et al. 2020): :class:`RegionScore` wraps the network so that it
returns, per region r (WT, TC, ET), the mean over the voxels the student itself assigns to r of
the region's log-odds ``logsumexp(logits of r's classes) - logsumexp(logits of the others)``.
MONAI then backpropagates that score to the chosen layer (by default the student's late decoder
stage, the distillation tap :func:`~fedbrats.common.networks.models.default_taps` names last),
weights its feature maps by their mean gradients (Grad-CAM++: by its higher-order weights) and
upsamples the map to the input of the network; :func:`unit_scale` scales it to [0, 1] (MONAI's
default normaliser would flip it).

The network runs once on the whole preprocessed case (padded to a multiple of 32 voxels, then
cropped back), not in sliding windows: a gradient needs one graph. The map is then brought onto
the input's grid with the same MONAI ``Invertd`` as the segmentation (trilinear), so it lies on
the case's own voxels, 0 outside the brain's bounding box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedbrats.common.data.contract import CONTRASTS, NUM_CLASSES, REGIONS

if TYPE_CHECKING:
    import torch

    from fedbrats.common.data.cases import Case
    from fedbrats.common.inference.modelfile import Student
    from fedbrats.common.inference.predict import PreparedCase

METHODS = ("gradcam", "gradcampp")
PAD_MULTIPLE = 32
"""The whole case is padded to a multiple of this many voxels: enough for every preset's
downsampling (at most five stride-2 stages)."""


class GradCamError(ValueError):
    """A Grad-CAM that cannot be computed (an unknown layer, a region the student did not
    predict); the message says what was expected and what was found."""


def _region_score_module():
    import torch
    from torch import nn

    class RegionScore(nn.Module):
        """``forward(x)`` -> ``B, 3``: per region (WT, TC, ET) the mean log-odds of the region
        over ``mask`` (``B, 3, *spatial`` bool, fixed): a classifier's logits for MONAI's CAMs."""

        def __init__(self, net: nn.Module, mask: torch.Tensor) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mask", mask.float())
            self.members = [list(v) for v in REGIONS.values()]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.net(x)
            scores = []
            for i, members in enumerate(self.members):
                others = [c for c in range(NUM_CLASSES) if c not in members]
                odds = (torch.logsumexp(logits[:, members], dim=1)
                        - torch.logsumexp(logits[:, others], dim=1))
                m = self.mask[:, i]
                scores.append((odds * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1))
            return torch.stack(scores, dim=1)

    return RegionScore


def default_layer(student: Student) -> str:
    """The layer Grad-CAM explains by default: the student's late decoder stage (half the
    input's resolution), the last of its distillation taps."""
    from fedbrats.common.networks.models import default_taps

    return default_taps(student.spec)[-1]


def layer_names(student: Student) -> list[str]:
    """Every named module of the student (what ``--layer`` accepts)."""
    return [name for name, _ in student.network.named_modules() if name]


@dataclass
class GradCamResult:
    region: str
    layer: str
    method: str
    cam: np.ndarray
    """``H, W, D`` float32 in [0, 1] on the input's grid."""
    voxels: int
    """How many voxels (on the model grid) the student assigns to the region: the score's
    support."""


def region_gradcam(
    student: Student,
    case: Case,
    regions: Sequence[str] = tuple(REGIONS),
    layer: str | None = None,
    method: str = "gradcam",
    prepared: PreparedCase | None = None,
) -> list[GradCamResult]:
    """Grad-CAM maps of ``regions`` for ``case`` (module docstring). Raises
    :class:`GradCamError` for an unknown layer, method or region, and for a region the student
    predicts nowhere in the case."""
    import torch
    from monai.transforms import DivisiblePad
    from monai.visualize import GradCAM, GradCAMpp

    from fedbrats.common.inference.predict import prepare_case, to_input_grid

    if method not in METHODS:
        raise GradCamError(f"Grad-CAM method {method!r}: expected one of {', '.join(METHODS)}")
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise GradCamError(f"region {unknown[0]!r}: expected one of {', '.join(REGIONS)}")
    layer = layer or default_layer(student)
    names = layer_names(student)
    if layer not in names:
        raise GradCamError(
            f"--layer {layer!r}: the student ({student.spec.arch}) has no such module; its "
            f"decoder taps are {', '.join(_taps(student))} (all {len(names)} names: "
            f"`fedbrats explain --list-layers`)")
    prep = prepared if prepared is not None else prepare_case(student, case)
    device = torch.device(student.device)
    image = prep.image.as_tensor() if hasattr(prep.image, "as_tensor") else prep.image
    image = torch.as_tensor(image).float()
    spatial = tuple(image.shape[1:])
    x = DivisiblePad(PAD_MULTIPLE, mode="constant")(image)
    pad_lo = [(p - s) // 2 for p, s in zip(x.shape[1:], spatial)]
    x = torch.as_tensor(x)[None].to(device)
    import copy

    net = copy.deepcopy(student.network)  # MONAI's hooks (and inplace=False) stay on the copy
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    with torch.no_grad():
        labels = net(x).argmax(1)
    inside = torch.zeros_like(labels, dtype=torch.bool)
    inside[(slice(None), *crop)] = True  # the case, not the padding
    mask = torch.stack([_member(labels, members) & inside for members in REGIONS.values()],
                       dim=1)
    wrapped = _region_score_module()(net, mask).to(device)
    cam_class = GradCAM if method == "gradcam" else GradCAMpp
    cam = cam_class(nn_module=wrapped, target_layers=f"net.{layer}", postprocessing=unit_scale)
    results = []
    for region in regions:
        i = list(REGIONS).index(region)
        voxels = int(mask[0, i].sum())
        if voxels == 0:
            raise GradCamError(f"case {case.case_id}: the student predicts no {region}, so "
                               f"there is no {region} score to explain; pick another --region")
        with torch.enable_grad():
            heat = cam(x.clone().requires_grad_(True), class_idx=i)
        heat = heat.detach().cpu()[0][(slice(None), *crop)]
        back = to_input_grid(prep, heat)[0]
        results.append(GradCamResult(region, layer, method,
                                     np.clip(back, 0.0, 1.0).astype(np.float32), voxels))
    return results


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """Each map of a ``B, 1, *spatial`` batch scaled linearly so that its (min, max) become
    (0, 1); a constant map becomes 0. (MONAI's ``default_normalizer`` maps them to (1, 0),
    flipping the magnitudes, as its docstring says: the largest activation would be drawn as
    the smallest.)"""
    import torch

    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (x.dim() - 1))
    span = (flat.max(1).values.view(-1, *[1] * (x.dim() - 1)) - lo)
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny),
                       torch.zeros_like(x))


def _member(labels: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
    out = labels == members[0]
    for v in members[1:]:
        out = out | (labels == v)
    return out


def _taps(student: Student) -> tuple[str, ...]:
    from fedbrats.common.networks.models import default_taps

    return default_taps(student.spec)


def gradcam_paths(case_id: str, region: str, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {"nifti": out / f"{case_id}_gradcam_{region}.nii.gz",
            "png": out / f"{case_id}_gradcam_{region}.png"}


def write_gradcam(result: GradCamResult, prepared: PreparedCase, labels: np.ndarray,
                  out_dir: str | Path) -> dict[str, Path]:
    """``<case_id>_gradcam_<region>.nii.gz`` (float32, the input's grid and header) and
    ``<case_id>_gradcam_<region>.png`` (T1c and FLAIR with the map and the segmentation)."""
    import nibabel as nib

    from fedbrats.common.inference.predict import save_like
    from fedbrats.common.inference.render import render_views

    paths = gradcam_paths(prepared.case.case_id, result.region, out_dir)
    save_like(prepared.reference, result.cam, paths["nifti"])

    def canonical(vol: np.ndarray):
        img = nib.as_closest_canonical(nib.Nifti1Image(vol, prepared.affine))
        return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])

    seg, zooms = canonical(np.asarray(labels, dtype=np.uint8))
    heat, _ = canonical(result.cam)
    volumes = {name: canonical(np.asarray(prepared.raw[CONTRASTS.index(key)], np.float32))[0]
               for key, name in (("t1c", "T1c"), ("t2f", "FLAIR"))}
    title = (f"{prepared.case.case_id}: {'Grad-CAM++' if result.method == 'gradcampp' else 'Grad-CAM'}"
             f" of {result.region} at {result.layer}")
    render_views(volumes, seg, zooms, paths["png"], title, heat=heat)
    return paths


__all__ = ["GradCamError", "GradCamResult", "METHODS", "default_layer", "gradcam_paths",
           "layer_names", "region_gradcam", "write_gradcam"]
