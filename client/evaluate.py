"""Site evaluation: the student (per round) and the final student beside the site's teacher,
with every contrast and with each one removed, on the site's validation cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedbrats.client.data import load_site_data, select_device
from fedbrats.client.scoring import evaluate_model
from fedbrats.client.teacher import load_teacher
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.networks.models import new_student


def evaluate_site(site: SiteConfig, run: RunConfig, student_state: Mapping[str, torch.Tensor],
                  with_teacher: bool = False, missing_contrasts: bool = False,
                  tta: bool = False, postprocess_grid: Sequence | None = None) -> dict:
    """Scores of the student (and the teacher) on the site's validation cases; with ``tta``
    every model segments with flip test-time augmentation (the run's final evaluation does when
    ``final-tta`` is on).

    ``postprocess_grid`` (a list of ``PostprocessThresholds``): also the lesion-wise Dice per
    region of the student's segmentations post-processed at each point, averaged over the
    validation cases (:func:`~fedbrats.common.inference.postprocess_tuning.score_points`).

    Returns ``{"student": {region: {metric: value}}, "teacher": ... | None,
    "student_missing": {contrast: scores} | None, "postprocess_grid": array | None,
    "num_val": n}``.
    """
    device = select_device(run)
    data = load_site_data(site, run)
    student = new_student(run, site.population)
    student.net.load_state_dict(student_state)
    student.to(device)
    kept: list | None = [] if postprocess_grid is not None else None
    out: dict = {"num_val": len(data.val_cases),
                 "student": evaluate_model(student, data.val_ds, site, run, device, tta=tta,
                                           keep=kept),
                 "teacher": None, "student_missing": None, "postprocess_grid": None}
    if kept is not None:
        from fedbrats.common.inference.postprocess_tuning import score_points

        out["postprocess_grid"] = score_points(kept, site.population, postprocess_grid)
    if with_teacher:
        teacher = load_teacher(site, run, device)
        out["teacher"] = evaluate_model(teacher, data.val_ds, site, run, device, tta=tta)
    if missing_contrasts:
        out["student_missing"] = {
            c: evaluate_model(student, data.val_ds, site, run, device, drop=(c,), tta=tta)
            for c in CONTRASTS
        }
    return out
