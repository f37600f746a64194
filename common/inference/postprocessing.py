"""Post-processing of a segmentation: small tumour components removed, a small ET relabelled.

Standalone on purpose (numpy and scipy only, nothing of fedbrats): ``fedbrats predict`` calls
:func:`clean_labels` through :func:`fedbrats.common.inference.predict.postprocess`, and
``fedbrats export`` copies this very file into the MONAI bundle it writes
(``scripts/postprocess.py``), whose ``inference.json`` calls :func:`clean_label_tensor`; so a
bundle post-processes exactly as ``predict`` does, without fedbrats installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity: voxels touching by a face, an edge or a corner belong to one component."""


def clean_labels(
    labels: np.ndarray, spacing: Sequence[float], min_component_mm3: float, et_min_mm3: float
) -> tuple[np.ndarray, int, float, float]:
    """Clean a BraTS 2023 label map ``H, W, D`` (0 background, 1 NETC, 2 SNFH, 3 ET).

    1. Remove every 26-connected component of the tumour (labels 1-3) whose volume is under
       ``min_component_mm3``.
    2. Then, if the remaining enhancing tumour (3) is under ``et_min_mm3`` in total, make it
       NETC (1).

    Volumes are voxel counts times the voxel volume from ``spacing`` (mm); a threshold of 0
    skips its step. Returns the new map (uint8; ``labels`` is left untouched), the number and
    volume of the components removed, and the ET volume relabelled.
    """
    from scipy import ndimage

    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"post-processing expects a 3-D label map, got shape {arr.shape}")
    if len(spacing) != 3:
        raise ValueError(f"post-processing expects three voxel sizes (mm), got {tuple(spacing)}")
    out = arr.astype(np.uint8, copy=True)
    vox = float(np.prod([float(s) for s in spacing]))
    removed, removed_mm3, relabelled_mm3 = 0, 0.0, 0.0
    if min_component_mm3 > 0 and out.any():
        comp, n = ndimage.label(out > 0, structure=CONNECTIVITY_26)
        sizes = np.bincount(comp.ravel(), minlength=n + 1) * vox
        small = np.flatnonzero(sizes < min_component_mm3)
        small = small[small > 0]
        if small.size:
            out[np.isin(comp, small)] = 0
            removed, removed_mm3 = int(small.size), float(sizes[small].sum())
    if et_min_mm3 > 0:
        et = out == 3
        et_mm3 = float(np.count_nonzero(et)) * vox
        if 0 < et_mm3 < et_min_mm3:
            out[et] = 1
            relabelled_mm3 = et_mm3
    return out, removed, removed_mm3, relabelled_mm3


def clean_label_tensor(seg, min_component_mm3: float, et_min_mm3: float):
    """:func:`clean_labels` of a ``1, H, W, D`` MONAI ``MetaTensor`` label map (the voxel size
    from its affine); a new MetaTensor with the same metadata."""
    import torch

    spacing = [float(s) for s in seg.pixdim]
    cleaned = clean_labels(seg[0].detach().cpu().numpy(), spacing, min_component_mm3,
                           et_min_mm3)[0]
    out = seg.clone()
    out[0] = torch.as_tensor(cleaned, dtype=out.dtype, device=out.device)
    return out
