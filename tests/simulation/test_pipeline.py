"""The core parts fit together: phantom files -> discovery -> cached MONAI pipeline -> teacher and
student -> distillation loss -> BraTS metrics. The same path real BraTS folders take."""

import numpy as np
import torch
from monai.data import DataLoader

from fedbrats.common.data.cases import discover_cases
from fedbrats.common.data.transforms import IMAGE, LABEL, build_dataset
from fedbrats.common.losses import DistillationLoss
from fedbrats.common.metrics.brats import evaluate_case
from fedbrats.common.networks.models import PRESETS, TappedModel, build_projector
from fedbrats.simulation.phantoms import write_dataset


def test_phantom_to_distillation_step_to_metrics(tmp_path):
    torch.manual_seed(0)
    write_dataset(tmp_path, {"MET": 2}, shape=(48, 48, 48), seed=3, progress=False)
    cases = discover_cases(tmp_path / "MET")
    assert [c.population for c in cases] == ["MET", "MET"]

    ds = build_dataset(cases, spacing=(4.0, 4.0, 4.0), patch_size=(32, 32, 32))
    batch = next(iter(DataLoader(ds, batch_size=2)))
    x, y = batch[IMAGE], batch[LABEL]
    assert x.shape == (2, 4, 32, 32, 32) and y.shape == (2, 1, 32, 32, 32)

    teacher = TappedModel.from_spec(PRESETS["teacher-tiny"]).eval()
    student = TappedModel.from_spec(PRESETS["student-tiny"])
    projector = build_projector(student, teacher, patch_size=32)
    loss_fn = DistillationLoss(feature_weight=0.5)
    params = list(student.parameters()) + list(projector.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)

    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    s_logits, s_feats = student(x)
    total, terms = loss_fn(s_logits, t_logits, y, projector(s_feats, t_feats), t_feats)
    opt.zero_grad()
    total.backward()
    opt.step()
    assert all(np.isfinite(v) and v >= 0 for v in terms.values())
    assert terms["total"] > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    pred = s_logits.argmax(1)[0].numpy().astype(np.uint8)
    gt = y[0, 0].numpy().astype(np.uint8)
    scores = evaluate_case(pred, gt, spacing=(4.0, 4.0, 4.0), challenge="MET")
    assert set(scores) == {"WT", "TC", "ET"}
    assert all(0.0 <= s["dice"] <= 1.0 and 0.0 <= s["lesion_dice"] <= 1.0 for s in scores.values())
