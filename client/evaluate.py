"""Site evaluation: the student (per round) and the final student beside the site's teacher,
with every contrast and with each one removed, on the site's validation cases."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedbrats.client.data import load_site_data, select_device
from fedbrats.client.scoring import evaluate_model
from fedbrats.client.teacher import load_teacher
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.networks.models import new_student


def evaluate_site(site: SiteConfig, run: RunConfig, student_state: Mapping[str, torch.Tensor],
                  with_teacher: bool = False, missing_contrasts: bool = False,
                  tta: bool = False) -> dict:
    """Scores of the student (and the teacher) on the site's validation cases; with ``tta``
    every model segments with flip test-time augmentation (the run's final evaluation does when
    ``final-tta`` is on).

    Returns ``{"student": {region: {metric: value}}, "teacher": ... | None,
    "student_missing": {contrast: scores} | None, "num_val": n}``.
    """
    device = select_device(run)
    data = load_site_data(site, run)
    student = new_student(run, site.population)
    student.net.load_state_dict(student_state)
    student.to(device)
    out: dict = {"num_val": len(data.val_cases),
                 "student": evaluate_model(student, data.val_ds, site, run, device, tta=tta),
                 "teacher": None, "student_missing": None}
    if with_teacher:
        teacher = load_teacher(site, run, device)
        out["teacher"] = evaluate_model(teacher, data.val_ds, site, run, device, tta=tta)
    if missing_contrasts:
        out["student_missing"] = {
            c: evaluate_model(student, data.val_ds, site, run, device, drop=(c,), tta=tta)
            for c in CONTRASTS
        }
    return out
