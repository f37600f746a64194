"""A model on a site's validation cases: MONAI sliding-window inference on the model grid, each
case scored on its own grid (Dice, HD95 and the BraTS lesion-wise scores per region). The teacher
(phase 1) and the site evaluation use it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.cases import voxel_spacing
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.data.transforms import (
    IMAGE,
    INPUT_LABEL,
    normalise_probabilities,
    to_input_grid,
)
from fedbrats.common.inference.sliding_window import sliding_window_softmax
from fedbrats.common.metrics.brats import evaluate_case
from fedbrats.common.metrics.scores import mean_metrics
from fedbrats.common.networks.models import TappedModel, set_population


def predict_volume(model: TappedModel, image: torch.Tensor, run: RunConfig,
                   device: torch.device, tta: bool = False) -> torch.Tensor:
    """Class probabilities ``K, H, W, D`` (on the CPU) for a ``C, H, W, D`` image by MONAI
    sliding-window inference (Gaussian blending of the windows' logits, then softmax); with
    ``tta`` averaged over the 8 flipped copies (:mod:`fedbrats.common.inference.sliding_window`)."""
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=run.amp and device.type == "cuda"):
        probs, _ = sliding_window_softmax(lambda x: model(x)[0], image[None].to(device),
                                          (run.patch_size,) * 3, run.sw_overlap, tta=tta)
    return probs.cpu()


def evaluate_model(model: TappedModel, val_ds, site: SiteConfig, run: RunConfig,
                   device: torch.device, drop: Sequence[str] = (),
                   score: Callable[[np.ndarray, np.ndarray], dict] | None = None,
                   tta: bool = False, keep: list | None = None) -> dict:
    """Mean scores of ``model`` over the validation cases; ``drop`` zeroes those contrasts;
    ``tta`` segments with the softmax averaged over the 8 flipped copies of each case.

    Each case is segmented on the model grid and scored on its own grid, as BraTS scores: the
    class probabilities go back through the inverse of the preprocessing (trilinear), their
    argmax is compared with the label as the site's file has it (``val_ds`` is an evaluation
    dataset of :func:`~fedbrats.common.data.transforms.build_dataset`, whose items keep that label).

    ``score(pred, gt)`` gives one case's ``{region: {metric: value}}``; by default all the
    metrics of :func:`~fedbrats.common.metrics.brats.evaluate_case` for the site's population.
    A student with a head per population segments with the site's own
    (:func:`~fedbrats.common.networks.models.set_population`). ``keep``: a list that gets each
    case's ``(segmentation, label, spacing)`` on the case's grid (post-processing tuning).
    """
    set_population(model, site.population)
    per_case = []
    for i in range(len(val_ds)):
        item = val_ds[i]
        if INPUT_LABEL not in item:
            raise ValueError(f"case {item.get('case_id')}: no {INPUT_LABEL!r}; evaluation needs "
                             "a dataset built without a patch size")
        image = item[IMAGE].as_tensor().clone()
        for c in drop:
            image[CONTRASTS.index(c)] = 0
        probs = predict_volume(model, image, run, device, tta=tta)
        back = normalise_probabilities(to_input_grid(probs, item[IMAGE], val_ds.transform))
        pred = back.argmax(axis=0).astype(np.uint8)
        label = item[INPUT_LABEL]
        gt = label.as_tensor()[0].numpy().astype(np.uint8)
        if keep is not None:
            keep.append((pred, gt, voxel_spacing(label.affine)))
        if score is None:
            per_case.append(evaluate_case(pred, gt, voxel_spacing(label.affine),
                                          site.population))
        else:
            per_case.append(score(pred, gt))
    return mean_metrics(per_case)
