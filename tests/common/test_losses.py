"""Losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedbrats.common.losses import (
    DistillationLoss,
    SupervisedLoss,
    feature_kd_loss,
    logit_kd_loss,
    supervised_loss,
    teacher_correct_mask,
)


def _voxels(*columns: list[float]) -> torch.Tensor:
    """Logits/features ``1, C, N, 1, 1`` from N per-voxel columns of C values."""
    return torch.tensor(columns, dtype=torch.float64).T.reshape(1, len(columns[0]), -1, 1, 1)


# ---------------------------------------------------------------------------- logit KD


def test_logit_kd_two_classes_by_hand():
    # student logits (0, 2), teacher logits (2, 0), T = 2:
    #   student / T = (0, 1)  -> log p_s = (0 - log(1 + e), 1 - log(1 + e))
    #   teacher / T = (1, 0)  -> log p_t = (1 - log(1 + e), 0 - log(1 + e))
    #   p_t = (e / (1 + e), 1 / (1 + e)) = (0.7310585786, 0.2689414214)
    #   log p_t - log p_s = (1, -1)
    #   KL = e/(1+e) * 1 + 1/(1+e) * (-1) = (e - 1) / (e + 1) = tanh(1/2) = 0.4621171573
    #   T^2 * KL = 4 * 0.4621171573 = 1.8484686290
    e = math.e
    expected = 4 * (e - 1) / (e + 1)
    assert expected == pytest.approx(1.8484686290, abs=1e-9)
    s = _voxels([0.0, 2.0])
    t = _voxels([2.0, 0.0])
    assert logit_kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_logit_kd_temperature_scaling():
    # Same logits at T = 1: log p_t - log p_s = (2, -2), p_t = (e^2, 1) / (1 + e^2)
    #   KL = 2 (e^2 - 1) / (e^2 + 1) = 2 tanh(1) = 1.5231883119; T^2 = 1.
    s = _voxels([0.0, 2.0])
    t = _voxels([2.0, 0.0])
    assert logit_kd_loss(s, t, 1.0).item() == pytest.approx(2 * math.tanh(1.0), abs=1e-6)
    # At T = 2 the loss is T^2 = 4 times the plain KL tanh(1/2) (previous test).
    # At T = 4: student / 4 = (0, 0.5), teacher / 4 = (0.5, 0); both share the log-sum-exp
    #   log(1 + e^0.5), so log p_t - log p_s = (0.5, -0.5) and
    #   KL = 0.5 * (p_t,0 - p_t,1) = 0.5 * (e^0.5 - 1) / (e^0.5 + 1) = 0.5 * tanh(1/4);
    #   T^2 * KL = 16 * 0.5 * tanh(1/4) = 1.9593493
    assert logit_kd_loss(s, t, 2.0).item() / 4 == pytest.approx(math.tanh(0.5), abs=1e-6)
    assert logit_kd_loss(s, t, 4.0).item() == pytest.approx(16 * 0.5 * math.tanh(0.25), abs=1e-6)


def test_logit_kd_identical_logits_is_zero():
    x = torch.randn(2, 4, 3, 3, 3)
    assert logit_kd_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_mean_over_voxels_and_mask():
    # voxel 0 as above (T^2 KL = 4 tanh(1/2)), voxel 1 identical logits (0):
    #   mean over the 2 voxels = 2 tanh(1/2); mask (1, 0) keeps voxel 0 only -> 4 tanh(1/2)
    s = _voxels([0.0, 2.0], [1.0, 1.0])
    t = _voxels([2.0, 0.0], [1.0, 1.0])
    assert logit_kd_loss(s, t, 2.0).item() == pytest.approx(2 * math.tanh(0.5), abs=1e-6)
    mask = torch.tensor([True, False]).reshape(1, 1, 2, 1, 1)
    assert logit_kd_loss(s, t, 2.0, mask=mask).item() == pytest.approx(4 * math.tanh(0.5), abs=1e-6)
    assert logit_kd_loss(s, t, 2.0, mask=torch.zeros(1, 2, 1, 1)).item() == 0.0


def test_logit_kd_teacher_detached():
    s = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    t = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    logit_kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_logit_kd_bad_arguments():
    x = torch.zeros(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="0"):
        logit_kd_loss(x, x, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        logit_kd_loss(x, torch.zeros(1, 3, 2, 2, 2), 1.0)


# ---------------------------------------------------------------------------- feature KD


def test_feature_mse_by_hand():
    # tap a: student (1, 2, 3, 4), teacher (1, 0, 0, 4): squared differences 0, 4, 9, 0 -> 13/4
    # tap b: student 0, teacher 1 -> 1.   Average over taps: (3.25 + 1) / 2 = 2.125
    s = {"a": torch.tensor([1.0, 2, 3, 4]).reshape(1, 2, 2, 1, 1), "b": torch.zeros(1, 1, 1, 1, 1)}
    t = {"a": torch.tensor([1.0, 0, 0, 4]).reshape(1, 2, 2, 1, 1), "b": torch.ones(1, 1, 1, 1, 1)}
    assert feature_kd_loss(s, t, "mse").item() == pytest.approx(2.125, abs=1e-6)
    # lists are matched by position
    assert feature_kd_loss([s["a"]], [t["a"]]).item() == pytest.approx(3.25, abs=1e-6)


def test_feature_cosine_by_hand():
    # channel vectors per voxel: orthogonal (1, 0) vs (0, 1): 1 - 0 = 1
    orth = feature_kd_loss([_voxels([1.0, 0.0])], [_voxels([0.0, 1.0])], "cosine")
    assert orth.item() == pytest.approx(1.0, abs=1e-6)
    # parallel (1, 2) vs (2, 4): cos = 10 / (sqrt(5) * sqrt(20)) = 1 -> 0
    par = feature_kd_loss([_voxels([1.0, 2.0])], [_voxels([2.0, 4.0])], "cosine")
    assert par.item() == pytest.approx(0.0, abs=1e-6)
    # anti-parallel: 1 - (-1) = 2; mean over the two voxels (orthogonal, parallel) = 0.5
    anti = feature_kd_loss([_voxels([1.0, 2.0])], [_voxels([-1.0, -2.0])], "cosine")
    assert anti.item() == pytest.approx(2.0, abs=1e-6)
    mixed = feature_kd_loss(
        [_voxels([1.0, 0.0], [1.0, 2.0])], [_voxels([0.0, 1.0], [2.0, 4.0])], "cosine"
    )
    assert mixed.item() == pytest.approx(0.5, abs=1e-6)


def test_feature_kd_teacher_detached_and_errors():
    s = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    t = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    feature_kd_loss({"x": s}, {"x": t}, "cosine").backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="'l1'"):
        feature_kd_loss([s], [t], "l1")
    with pytest.raises(ValueError, match="project"):
        feature_kd_loss([s], [torch.zeros(1, 4, 2, 2, 2)])
    with pytest.raises(KeyError, match="differ"):
        feature_kd_loss({"x": s}, {"y": t})


# ---------------------------------------------------------------------------- supervised


def test_supervised_uniform_logits_by_hand():
    # 8 voxels, 2 of each class, all logits 0 -> softmax 1/4 everywhere.
    #   CE = -log(1/4) = log 4 = 1.3862944
    #   Dice per class: sum(p g) = 2/4, sum p = 8/4 = 2, sum g = 2
    #     1 - (2 * 0.5 + 1e-5) / (2 + 2 + 1e-5) = 1 - 1/4 = 0.75 (up to the 1e-5 smoothing)
    #   total = 0.75 + 1.3862944 = 2.1362944
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).reshape(1, 1, 2, 2, 2)
    logits = torch.zeros(1, 4, 2, 2, 2)
    expected = 0.75 + math.log(4)
    assert supervised_loss(logits, labels).item() == pytest.approx(expected, abs=1e-4)
    # B, H, W, D labels are accepted too
    assert SupervisedLoss()(logits, labels[:, 0]).item() == pytest.approx(expected, abs=1e-4)


def test_supervised_confident_correct_is_small():
    labels = torch.randint(0, 4, (1, 1, 4, 4, 4))
    logits = 50.0 * torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    assert supervised_loss(logits, labels).item() < 1e-3
    with pytest.raises(ValueError, match="labels"):
        supervised_loss(logits, labels[:, :, :2])


def test_supervised_dice_is_batch_dice_over_tumour_classes():
    # Two 8-voxel samples; the second has no ET, and one of its background voxels is predicted
    # ET with certainty. Batch Dice per class over {NETC, SNFH, ET}:
    #   NETC, SNFH: perfect -> 0;  ET: intersection 2, predicted 3, true 2 -> 1 - 4/5 = 0.2
    #   mean over the three classes: 0.2 / 3 = 0.0667
    # (per-sample Dice would give the second sample's ET a loss of 1: mean 1/6 = 0.167)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 0, 0]])
    labels = labels.reshape(2, 1, 2, 2, 2)
    logits = 50.0 * torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    logits[1, :, 1, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 50.0])
    dice_only = SupervisedLoss(lambda_ce=0.0)(logits, labels).item()
    assert dice_only == pytest.approx(0.2 / 3, abs=1e-4)


def test_teacher_correct_mask_limits_logit_kd_to_right_voxels():
    labels = torch.tensor([0, 1, 2, 3]).reshape(1, 1, 2, 2, 1)
    teacher = torch.zeros(1, 4, 2, 2, 1)
    teacher[0, 0, 0, 0, 0] = 5.0  # voxel 0: background, right
    teacher[0, 2, 0, 1, 0] = 5.0  # voxel 1: SNFH, label NETC -> wrong
    teacher[0, 2, 1, 0, 0] = 5.0  # voxel 2: SNFH, right
    teacher[0, 1, 1, 1, 0] = 5.0  # voxel 3: NETC, label ET -> wrong
    mask = teacher_correct_mask(teacher, labels)
    assert mask.shape == (1, 1, 2, 2, 1)
    assert mask.flatten().tolist() == [True, False, True, False]
    # the masked KD term ignores the wrong voxels: a student equal to the teacher on the right
    # voxels and anything elsewhere has zero masked loss
    student = teacher.clone()
    student[0, :, 0, 1, 0] = torch.tensor([9.0, 0.0, 0.0, 0.0])
    assert logit_kd_loss(student, teacher, 2.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kd_loss(student, teacher, 2.0).item() > 0.1


# ---------------------------------------------------------------------------- combined


def _batch():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 4, 4, 4, 4)
    y = torch.randint(0, 4, (2, 1, 4, 4, 4))
    sf = {"f": torch.randn(2, 8, 2, 2, 2, requires_grad=True)}
    tf = {"f": torch.randn(2, 8, 2, 2, 2)}
    return s, t, y, sf, tf


def test_distillation_loss_is_weighted_sum():
    s, t, y, sf, tf = _batch()
    loss = DistillationLoss(0.5, 2.0, 0.25, temperature=3.0, feature_kind="cosine")
    total, parts = loss(s, t, y, sf, tf)
    sup = supervised_loss(s, y).item()
    kd = logit_kd_loss(s, t, 3.0).item()
    feat = feature_kd_loss(sf, tf, "cosine").item()
    assert parts["supervised"] == pytest.approx(sup, rel=1e-6)
    assert parts["logit"] == pytest.approx(kd, rel=1e-6)
    assert parts["feature"] == pytest.approx(feat, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * sup + 2.0 * kd + 0.25 * feat, rel=1e-6)
    assert parts["total"] == pytest.approx(total.item(), rel=1e-6)
    assert set(parts) == {"supervised", "logit", "feature", "total"}
    assert all(isinstance(v, float) for v in parts.values())
    total.backward()
    assert s.grad is not None and sf["f"].grad is not None


def test_distillation_loss_zero_weight_terms_skipped():
    s, t, y, sf, tf = _batch()
    total, parts = DistillationLoss(1.0, 0.0, 0.0)(s, None, y)
    assert parts["logit"] == 0.0 and parts["feature"] == 0.0
    assert total.item() == pytest.approx(parts["supervised"], rel=1e-6)
    with pytest.raises(ValueError, match="student_feats"):
        DistillationLoss(1.0, 1.0, 0.5)(s, t, y)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"supervised_weight": -1.0}, "supervised_weight.*-1.0"),
        ({"logit_weight": float("nan")}, "logit_weight.*nan"),
        ({"supervised_weight": 0, "logit_weight": 0, "feature_weight": 0}, "at least one"),
        ({"temperature": 0.0}, "temperature.*0.0"),
        ({"temperature": -2}, "temperature.*-2"),
        ({"feature_kind": "l1"}, "feature_kind.*'l1'"),
    ],
)
def test_distillation_loss_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


def _binary_kl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def test_region_kd_by_hand():
    from fedbrats.common.losses import region_kd_loss

    # student uniform (0.25 per class): region probabilities WT 0.75, TC 0.5, ET 0.25;
    # teacher (0.1, 0.2, 0.3, 0.4) over (background, NETC, SNFH, ET): WT 0.9, TC 0.6, ET 0.4
    s = torch.zeros(1, 4, 1, 1, 1)
    t = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).reshape(1, 4, 1, 1, 1)
    wt, tc, et = _binary_kl(0.9, 0.75), _binary_kl(0.6, 0.5), _binary_kl(0.4, 0.25)
    assert region_kd_loss(s, t, 1.0, (1, 1, 1)).item() == pytest.approx((wt + tc + et) / 3,
                                                                        abs=1e-6)
    assert region_kd_loss(s, t, 1.0, (1, 0, 0)).item() == pytest.approx(wt / 3, abs=1e-6)
    assert region_kd_loss(s, t, 1.0, (0, 1, 0)).item() == pytest.approx(tc / 3, abs=1e-6)
    assert region_kd_loss(t, t, 1.0, (1, 1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert region_kd_loss(s, t, 1.0, (0, 0, 0.5)).item() == pytest.approx(et / 6, abs=1e-6)
    # T = 2 on logits twice as large gives the same probabilities, scaled by T^2
    assert region_kd_loss(s, 2 * t, 2.0, (1, 1, 1)).item() == pytest.approx(
        4 * (wt + tc + et) / 3, abs=1e-5)


def test_region_kd_in_the_distillation_loss_and_bad_arguments():
    from fedbrats.common.losses import region_kd_loss

    s = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, 3)
    y = torch.randint(0, 4, (2, 1, 3, 3, 3))
    loss = DistillationLoss(feature_weight=0.0)
    total, parts = loss(s, t, y, region_weights=(0.0, 0.0, 0.0))
    assert parts["logit"] == 0.0
    assert total.item() == pytest.approx(parts["supervised"], abs=1e-6)
    _, parts = loss(s, t, y, region_weights=(1.0, 0.5, 0.0))
    assert parts["logit"] == pytest.approx(region_kd_loss(s, t, 2.0, (1.0, 0.5, 0.0)).item())
    assert parts["logit"] > 0
    region_kd_loss(s, t, 2.0, (1, 1, 1)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 numbers"):
        region_kd_loss(s, t, 2.0, (1, 1))
    with pytest.raises(ValueError, match="weight of TC"):
        region_kd_loss(s, t, 2.0, (1, -1, 1))
    with pytest.raises(ValueError, match="cannot be combined"):
        loss(s, t, y, kd_mask=torch.ones(2, 1, 3, 3, 3, dtype=torch.bool),
             region_weights=(1, 1, 1))
