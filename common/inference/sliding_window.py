"""Sliding-window class probabilities, optionally averaged over flipped copies of the input.

Both the sites' evaluation (``client/scoring.py``) and ``fedbrats predict`` segment through
:func:`sliding_window_softmax`: MONAI ``sliding_window_inference`` with Gaussian blending of the
windows' logits, then a softmax. With ``tta`` (flip test-time augmentation, as nnU-Net's
mirroring) the input is also run flipped along every combination of the three spatial axes
(8 passes), each softmax is flipped back, and the 8 are averaged; their variance is an
uncertainty map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

FLIPS: tuple[tuple[int, ...], ...] = tuple(
    tuple(d for i, d in enumerate((2, 3, 4)) if mask >> i & 1) for mask in range(8)
)
"""The 8 flip combinations of a ``B, C, H, W, D`` tensor's spatial axes (the first: none)."""


def sliding_window_softmax(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float,
    *,
    tta: bool = False,
    sw_batch_size: int = 2,
    stitch_device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax ``K, H, W, D`` (float32, on the stitching device) of ``predictor`` on the
    ``1, C, H, W, D`` image ``x``.

    ``predictor`` maps a batch of windows to logits. ``stitch_device`` is where the windows are
    blended (None: ``x``'s device; the CPU spares GPU memory on large volumes). With ``tta`` the
    softmax is the mean over :data:`FLIPS` and the second value is its variance averaged over
    the classes (``H, W, D``); otherwise the second value is None.
    """
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape 1, C, H, W, D; got {tuple(x.shape)}")
    flips = FLIPS if tta else FLIPS[:1]
    total = sq = None
    for dims in flips:
        xi = torch.flip(x, dims) if dims else x
        logits = sliding_window_inference(
            xi, roi_size=tuple(int(r) for r in roi_size), sw_batch_size=sw_batch_size,
            predictor=predictor, overlap=overlap, mode="gaussian", device=stitch_device,
        )
        logits = torch.as_tensor(logits).float()
        if dims:
            logits = torch.flip(logits, dims)
        p = torch.softmax(logits, dim=1)[0]
        total = p if total is None else total + p
        if tta:
            sq = p * p if sq is None else sq + p * p
    mean = total / len(flips)
    if not tta:
        return mean, None
    var = (sq / len(flips) - mean * mean).clamp_min(0).mean(dim=0)
    return mean, var
