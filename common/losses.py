"""Losses for training teachers and distilling the student.

Shapes: logits ``B, C, H, W, D`` with ``C = NUM_CLASSES`` (4), labels ``B, 1, H, W, D`` integer
(``B, H, W, D`` is accepted too), features ``B, C_f, h, w, d``.

* :func:`supervised_loss`: Dice + cross-entropy (MONAI ``DiceCELoss``, softmax, one-hot labels,
  batch Dice over the tumour classes).
* :func:`logit_kd_loss`: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the
  class axis, averaged over voxels and batch (Hinton et al., 2015).
* :func:`feature_kd_loss`: mean squared error or ``1 - cosine similarity`` (channel axis)
  between projected student features and teacher features, averaged over taps.
* :func:`region_kd_loss`: the logit KD split by evaluated region (WT, TC, ET): per region the
  binary KL between the teacher's and the student's region probability (the sum of the class
  probabilities at ``T``), weighted per region (``kd-trust region``).
* :func:`teacher_correct_mask`: where the teacher's class is the label's (optional logit KD mask).
* :class:`DistillationLoss`: the weighted sum of the three.

The teacher side is always detached: no gradient reaches a teacher through these losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.common.data.contract import NUM_CLASSES, REGIONS

__all__ = [
    "FEATURE_KINDS",
    "DistillationLoss",
    "SupervisedLoss",
    "feature_kd_loss",
    "logit_kd_loss",
    "region_kd_loss",
    "supervised_loss",
    "teacher_correct_mask",
]

FEATURE_KINDS: tuple[str, ...] = ("mse", "cosine")

Features = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _as_label_map(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels as ``B, 1, H, W, D`` matching ``logits`` (``B, C, H, W, D``)."""
    if labels.ndim == logits.ndim - 1:
        labels = labels.unsqueeze(1)
    if labels.ndim != logits.ndim or labels.shape[1] != 1:
        raise ValueError(
            f"labels must be B, 1, H, W, D (or B, H, W, D) integers; got shape "
            f"{tuple(labels.shape)} for logits of shape {tuple(logits.shape)}"
        )
    if labels.shape[0] != logits.shape[0] or labels.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape "
            f"{tuple(logits.shape)} (batch and spatial axes must agree)"
        )
    return labels


class SupervisedLoss(nn.Module):
    """Dice + cross-entropy on integer labels (MONAI ``DiceCELoss``).

    ``forward(logits, labels)``: logits ``B, C, H, W, D`` (raw scores), labels ``B, 1, H, W, D``
    (or ``B, H, W, D``) with values in ``0 .. C-1``. Returns a scalar tensor. Dice is computed
    on softmax probabilities against one-hot labels for the tumour classes (background left to
    cross-entropy), over the whole batch per class ("batch Dice", as nnU-Net does for 3D), then
    averaged over classes; cross-entropy is averaged over voxels; the two are added with
    weights ``lambda_dice`` and ``lambda_ce``.

    Batch Dice matters for small crops: a crop without, say, enhancing tumour would otherwise
    have a per-sample ET Dice of 0 for any predicted ET voxel, however few, a loss term that
    swamps the rest of the batch.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        from monai.losses import DiceCELoss

        self.dice_ce = DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=False, batch=True,
            lambda_dice=lambda_dice, lambda_ce=lambda_ce,
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = _as_label_map(labels, logits)
        if labels.is_floating_point():
            labels = labels.round()
        return self.dice_ce(logits.float(), labels.long())


_DEFAULT_SUPERVISED: SupervisedLoss | None = None


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + CE of ``logits`` (``B, C, H, W, D``) against ``labels`` (``B, 1, H, W, D``)."""
    global _DEFAULT_SUPERVISED
    if _DEFAULT_SUPERVISED is None:
        _DEFAULT_SUPERVISED = SupervisedLoss()
    return _DEFAULT_SUPERVISED(logits, labels)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature-scaled KL divergence from the teacher's to the student's class distribution.

    ``student_logits``, ``teacher_logits``: ``B, C, H, W, D`` (any number of spatial axes).
    Per voxel, ``kl = sum_c p_t,c * (log p_t,c - log p_s,c)`` with ``p = softmax(logits / T)``
    over axis 1; the result is ``T^2 * mean(kl)`` over ``B, H, W, D``. With ``mask``
    (``B, 1, H, W, D`` or ``B, H, W, D``, bool or non-negative weights) the mean is a weighted
    mean over the masked voxels (0 if the mask is empty). The teacher is detached; the
    computation is done in float32.
    """
    temperature = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, C, H, W, D)"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # B, H, W, D
    scale = temperature * temperature
    if mask is None:
        return scale * kl.mean()
    if mask.ndim == kl.ndim + 1:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must be B, 1, H, W, D or B, H, W, D, got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.shape != kl.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the voxel grid {tuple(kl.shape)}"
        )
    weights = mask.detach().to(kl.dtype)
    return scale * (kl * weights).sum() / weights.sum().clamp_min(1e-12)


def region_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    weights: Sequence[float],
) -> torch.Tensor:
    """Logit distillation region by region, each region with its own weight.

    For each evaluated region ``r`` (``REGIONS``: WT, TC, ET, in that order) the region
    probability is ``q_r = sum_{c in r} softmax(logits / T)_c``; the term is the binary KL
    ``q_t log(q_t / q_s) + (1 - q_t) log((1 - q_t) / (1 - q_s))`` averaged over voxels and
    batch. Returns ``T^2 * sum_r weights[r] * term_r / 3``: with a weight of 0 the student
    learns that region from the labels alone. The nested regions determine the four classes
    (background = not WT, SNFH = WT - TC, NETC = TC - ET), so with every weight 1 the student
    is pulled towards the teacher's whole distribution, as with :func:`logit_kd_loss`.
    """
    temperature = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, C, H, W, D)"
        )
    if len(weights) != len(REGIONS):
        raise ValueError(f"region weights must be {len(REGIONS)} numbers ({', '.join(REGIONS)}), "
                         f"got {list(weights)!r}")
    for name, w in zip(REGIONS, weights):
        _check_weight(f"weight of {name}", w)
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    eps = 1e-6
    total = student_logits.new_zeros((), dtype=torch.float32)
    for w, classes in zip(weights, REGIONS.values()):
        if w == 0:
            continue
        idx = list(classes)
        q_s = p_s[:, idx].sum(1).clamp(eps, 1 - eps)
        q_t = p_t[:, idx].sum(1).clamp(eps, 1 - eps)
        kl = q_t * (q_t.log() - q_s.log()) + (1 - q_t) * ((1 - q_t).log() - (1 - q_s).log())
        total = total + float(w) * kl.mean()
    return temperature * temperature * total / len(REGIONS)


def _pair_features(
    student_feats: Features, teacher_feats: Features
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(student_feats, Mapping) != isinstance(teacher_feats, Mapping):
        raise TypeError("student and teacher features must both be dicts or both be sequences")
    if isinstance(student_feats, Mapping):
        assert isinstance(teacher_feats, Mapping)
        if set(student_feats) != set(teacher_feats):
            raise KeyError(
                f"student feature keys {sorted(student_feats)} differ from teacher feature keys "
                f"{sorted(teacher_feats)}; project the student features first (FeatureProjector)"
            )
        pairs = [(str(k), student_feats[k], teacher_feats[k]) for k in teacher_feats]
    else:
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"{len(student_feats)} student features but {len(teacher_feats)} teacher features"
            )
        pairs = [(f"#{i}", s, t) for i, (s, t) in enumerate(zip(student_feats, teacher_feats))]
    if not pairs:
        raise ValueError("feature_kd_loss needs at least one feature pair")
    for name, s, t in pairs:
        if s.shape != t.shape:
            raise ValueError(
                f"feature {name}: student shape {tuple(s.shape)} != teacher shape "
                f"{tuple(t.shape)}; project the student features first (FeatureProjector)"
            )
    return pairs


def feature_kd_loss(
    student_feats: Features, teacher_feats: Features, kind: str = "mse"
) -> torch.Tensor:
    """Feature distillation between already projected student features and teacher features.

    Both are dicts (matched by key) or sequences (matched by position) of ``B, C, h, w, d``
    tensors of equal shapes. ``kind="mse"``: mean over all elements of ``(s - t)^2``;
    ``kind="cosine"``: mean over ``B, h, w, d`` of ``1 - cos(s, t)`` along the channel axis.
    The per-tap values are averaged. The teacher is detached; computed in float32.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
    terms = []
    for _, s, t in _pair_features(student_feats, teacher_feats):
        s, t = s.float(), t.detach().float()
        if kind == "mse":
            terms.append(F.mse_loss(s, t))
        else:
            terms.append((1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean())
    return torch.stack(terms).mean()


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def teacher_correct_mask(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``B, 1, H, W, D`` bool: voxels where the teacher's most likely class is the label.

    Used as ``kd_mask`` (run setting ``kd-mask = "teacher-correct"``): the student then copies
    the teacher's soft output only where the teacher is right, and learns the rest from the
    labels alone.
    """
    labels = _as_label_map(labels, teacher_logits)
    return teacher_logits.detach().argmax(1, keepdim=True) == labels.round().long()


class DistillationLoss(nn.Module):
    """``supervised_weight * DiceCE + logit_weight * logit KD + feature_weight * feature KD``.

    ``forward(student_logits, teacher_logits, labels, student_feats=None, teacher_feats=None,
    kd_mask=None)``:

    * ``student_logits``, ``teacher_logits``: ``B, C, H, W, D``;
    * ``labels``: ``B, 1, H, W, D`` integers (``B, H, W, D`` accepted);
    * ``student_feats`` (already projected), ``teacher_feats``: dicts or sequences of
      ``B, C_f, h, w, d`` tensors of equal shapes; required when ``feature_weight > 0``;
    * ``kd_mask``: optional voxel mask for the logit term (see :func:`logit_kd_loss`);
    * ``region_weights``: WT, TC, ET weights; the logit term is then :func:`region_kd_loss`.

    Returns ``(total, parts)``: the scalar tensor to back-propagate and a dict of floats
    ``{"supervised", "logit", "feature", "total"}`` where the first three are the unweighted
    terms and ``total`` the weighted sum. A term whose weight is 0 is not computed (reported as
    0.0); ``labels`` / ``teacher_logits`` may then be ``None``.
    """

    def __init__(
        self,
        supervised_weight: float = 1.0,
        logit_weight: float = 1.0,
        feature_weight: float = 0.1,
        temperature: float = 2.0,
        feature_kind: str = "mse",
        num_classes: int = NUM_CLASSES,
    ):
        super().__init__()
        self.supervised_weight = _check_weight("supervised_weight", supervised_weight)
        self.logit_weight = _check_weight("logit_weight", logit_weight)
        self.feature_weight = _check_weight("feature_weight", feature_weight)
        if self.supervised_weight == self.logit_weight == self.feature_weight == 0:
            raise ValueError(
                "at least one of supervised_weight, logit_weight, feature_weight must be > 0, "
                f"got ({supervised_weight!r}, {logit_weight!r}, {feature_weight!r})"
            )
        self.temperature = _check_temperature(temperature)
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}")
        self.feature_kind = feature_kind
        self.num_classes = int(num_classes)
        self.supervised = SupervisedLoss()

    def extra_repr(self) -> str:
        return (
            f"supervised_weight={self.supervised_weight}, logit_weight={self.logit_weight}, "
            f"feature_weight={self.feature_weight}, temperature={self.temperature}, "
            f"feature_kind={self.feature_kind!r}"
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        student_feats: Features | None = None,
        teacher_feats: Features | None = None,
        kd_mask: torch.Tensor | None = None,
        region_weights: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if student_logits.ndim < 3 or student_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"student logits must be B, {self.num_classes}, H, W, D; "
                f"got {tuple(student_logits.shape)}"
            )
        zero = student_logits.new_zeros((), dtype=torch.float32)
        sup = logit = feat = zero
        if self.supervised_weight > 0:
            if labels is None:
                raise ValueError("labels are required when supervised_weight > 0")
            sup = self.supervised(student_logits, labels)
        if self.logit_weight > 0:
            if teacher_logits is None:
                raise ValueError("teacher_logits are required when logit_weight > 0")
            if region_weights is not None:
                if kd_mask is not None:
                    raise ValueError("region_weights and kd_mask cannot be combined")
                logit = region_kd_loss(student_logits, teacher_logits, self.temperature,
                                       region_weights)
            else:
                logit = logit_kd_loss(student_logits, teacher_logits, self.temperature, kd_mask)
        if self.feature_weight > 0:
            if student_feats is None or teacher_feats is None:
                raise ValueError(
                    "student_feats and teacher_feats are required when feature_weight > 0 "
                    f"(feature_weight={self.feature_weight})"
                )
            feat = feature_kd_loss(student_feats, teacher_feats, self.feature_kind)
        total = (
            self.supervised_weight * sup + self.logit_weight * logit + self.feature_weight * feat
        )
        parts = {
            "supervised": float(sup.detach()),
            "logit": float(logit.detach()),
            "feature": float(feat.detach()),
            "total": float(total.detach()),
        }
        return total, parts
