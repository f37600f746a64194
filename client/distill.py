"""Phase 2 at a site: one distillation round. The server's student is trained for a fixed number
of local steps against the frozen local teacher (logit and feature distillation) and the site's
labels; the student may see a random subset of the contrasts (modality dropout) while the teacher
sees them all. The student-to-teacher feature projector stays at the site across rounds."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence

import torch

from fedbrats.client.data import load_site_data, select_device, training_batches
from fedbrats.client.teacher import load_teacher
from fedbrats.client.teacher_outputs import teacher_digest, teacher_training_data
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.contract import REGIONS
from fedbrats.common.data.transforms import IMAGE, LABEL, TEACHER_FEATURE, TEACHER_LOGITS
from fedbrats.common.losses import DistillationLoss, teacher_correct_mask
from fedbrats.common.networks.models import (
    FeatureProjector,
    TappedModel,
    build_projector,
    new_student,
)
from fedbrats.common.utils.files import save_atomic
from fedbrats.common.utils.seeds import derived_seed

log = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.pt"


def modality_dropout(x: torch.Tensor, prob: float, gen: torch.Generator,
                     channels: Sequence[int] | None = None) -> torch.Tensor:
    """Zero each droppable contrast of each sample with probability ``prob``, keeping at least one.

    ``x``: ``B, C, H, W, D``; ``channels``: the contrasts that may be dropped (all if None; the
    others are always kept). Returns a new tensor. A dropped contrast looks exactly like a
    missing one at inference (zero after normalisation).
    """
    b, c = x.shape[:2]
    keep = torch.rand(b, c, generator=gen) >= prob
    if channels is not None:
        fixed = torch.ones(c, dtype=torch.bool)
        fixed[list(channels)] = False
        keep |= fixed
    for i in range(b):
        if not keep[i].any():
            keep[i, torch.randint(c, (1,), generator=gen)] = True
    return x * keep.to(x.device, x.dtype)[:, :, None, None, None]


def student_input(x: torch.Tensor, run: RunConfig, gen: torch.Generator) -> torch.Tensor:
    """What the student sees of a training batch: ``x`` after the run's modality dropout."""
    if not run.modality_dropout:
        return x
    return modality_dropout(x, run.dropout_prob, gen, run.dropout_channels)


def _projector(site: SiteConfig, student: TappedModel, teacher: TappedModel,
               run: RunConfig, device: torch.device) -> FeatureProjector:
    """The site's own student->teacher feature projector: it stays at the site across rounds."""
    projector = build_projector(student, teacher, patch_size=run.patch_size).to(device)
    path = site.work_dir / PROJECTOR_FILE
    if path.exists():
        try:
            projector.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        except Exception as e:
            log.warning("%s: projector checkpoint does not fit (%s); starting a new one", path, e)
    return projector


class LocalTrainer:
    """A site's local optimisation of the student: what every step of a round does.

    The loss is supervised (Dice + CE on the site's labels) plus, with a ``teacher``, logit and
    (with a ``projector``) feature distillation from the frozen teacher, which sees every contrast
    while the student may see a random subset (modality dropout); with ``proximal_mu > 0``
    (FedProx) also ``mu / 2 * ||w - w_start||^2``, ``w_start`` the student as given. Adam at
    ``lr`` over the student's and the projector's parameters. With ``region_weights`` (WT, TC,
    ET) the logit term is split by region (:func:`~fedbrats.common.losses.region_kd_loss`).
    Without a teacher (a labels-only
    baseline) the run's logit and feature weights must be 0.
    """

    def __init__(self, student: TappedModel, run: RunConfig, device: torch.device, lr: float,
                 seed: int, teacher: TappedModel | None = None,
                 projector: FeatureProjector | None = None, proximal_mu: float = 0.0,
                 region_weights: Sequence[float] | None = None) -> None:
        self.student, self.teacher, self.projector = student, teacher, projector
        self.region_weights = region_weights
        self.run, self.device, self.proximal_mu = run, device, proximal_mu
        self.loss_fn = DistillationLoss(
            supervised_weight=run.supervised_weight, logit_weight=run.logit_weight,
            feature_weight=run.feature_weight, temperature=run.temperature,
            feature_kind=run.feature_kind,
        )
        params = list(student.parameters())
        if projector is not None:
            params += list(projector.parameters())
        self.opt = torch.optim.Adam(params, lr=lr)
        self.start = ([p.detach().clone() for p in student.parameters()] if proximal_mu
                      else [])
        self.gen = torch.Generator().manual_seed(seed)
        self.amp = run.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(enabled=self.amp)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch`` (``IMAGE``, ``LABEL``; with the teacher's kept
        outputs, :data:`TEACHER_LOGITS` and its features, the teacher is not run); returns the
        loss terms."""
        run, device = self.run, self.device
        x, y = batch[IMAGE].to(device), batch[LABEL].to(device)
        x_student = student_input(x, run, self.gen)
        with torch.autocast(device.type, enabled=self.amp):
            t_logits = t_feats = None
            if self.teacher is not None and TEACHER_LOGITS in batch:  # kept (teacher-cache)
                t_logits = batch[TEACHER_LOGITS].to(device).float()
                t_feats = {tap: batch[TEACHER_FEATURE + tap].to(device).float()
                           for tap in self.teacher.taps}
            elif self.teacher is not None:
                with torch.no_grad():
                    t_logits, t_feats = self.teacher(x)
            s_logits, s_feats = self.student(x_student)
            need_feats = run.feature_weight > 0
            kd_mask = None
            if t_logits is not None and run.kd_mask == "teacher-correct":
                kd_mask = teacher_correct_mask(t_logits, y)
            total, terms = self.loss_fn(
                s_logits, t_logits, y,
                self.projector(s_feats, t_feats) if need_feats else None,
                t_feats if need_feats else None,
                kd_mask=kd_mask, region_weights=self.region_weights,
            )
        if self.proximal_mu:
            prox = sum(((p - g) ** 2).sum()
                       for p, g in zip(self.student.parameters(), self.start))
            total = total + self.proximal_mu / 2 * prox
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return terms


def distill_round(site: SiteConfig, run: RunConfig, student_state: Mapping[str, torch.Tensor],
                  server_round: int, proximal_mu: float = 0.0
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the server's student for ``run.local_steps`` steps against the local teacher
    (:class:`LocalTrainer`). Returns the updated student state dict and metrics (mean loss
    terms). The projector stays here."""
    started = time.monotonic()
    device = select_device(run)
    data = load_site_data(site, run)
    # without distillation terms (a labels-only baseline) no teacher or projector is involved
    distil = run.logit_weight > 0 or run.feature_weight > 0
    teacher = load_teacher(site, run, device).requires_grad_(False) if distil else None
    student = new_student(run, site.population)
    student.net.load_state_dict(student_state)
    student.to(device)
    trust, region_weights = 1.0, None
    if distil and run.kd_trust == "site":
        trust = teacher_trust(site, run, student, teacher, device)
    elif distil and run.kd_trust == "region":
        # each region's logit term by its own weight; the feature term by their mean
        region_weights = tuple(region_trust(site, run, student, teacher, device).values())
        trust = sum(region_weights) / len(region_weights)
    if trust != 1.0 or region_weights is not None:
        run = dataclasses.replace(
            run, feature_weight=run.feature_weight * trust,
            logit_weight=run.logit_weight * (1.0 if region_weights else trust))
    student.train()
    projector = _projector(site, student, teacher, run, device) if distil else None
    seed = derived_seed(run.seed, site.population, "round", server_round)
    trainer = LocalTrainer(student, run, device, run.round_lr(server_round), seed,
                           teacher=teacher, projector=projector, proximal_mu=proximal_mu,
                           region_weights=region_weights)
    train_ds = (teacher_training_data(site, run, teacher, device)
                if distil and run.teacher_cache else data.train_ds)
    batches = training_batches(train_ds, run.batch_size, seed)
    sums: dict[str, float] = {}
    first_step_s = time.monotonic() - started  # the data, the teacher (its outputs), the trust
    for _ in range(run.local_steps):
        for k, v in trainer.step(next(batches)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if projector is not None:
        save_atomic(site.work_dir / PROJECTOR_FILE,
                    {k: v.detach().cpu() for k, v in projector.state_dict().items()})
    metrics = {("loss" if k == "total" else k): v / run.local_steps for k, v in sums.items()}
    metrics["num_steps"] = run.local_steps
    metrics["first_step_s"] = first_step_s
    if distil and run.kd_trust != "none":
        metrics["kd_trust"] = trust
        if region_weights is not None:
            metrics.update({f"kd_trust_{r}": w for r, w in zip(REGIONS, region_weights)})
    state = {k: v.detach().cpu() for k, v in student.net.state_dict().items()}
    metrics["round_s"] = time.monotonic() - started
    return state, metrics


TEACHER_VAL_FILE = "teacher-val-dice.json"


def trust_weight(teacher_dice: float, student_dice: float) -> float:
    """``clip(0.5 + (teacher - student) / 0.1, 0, 1)``: a teacher 0.05 ahead of the student
    counts fully, one 0.05 behind not at all."""
    return float(min(1.0, max(0.0, 0.5 + (teacher_dice - student_dice) / 0.1)))


def _val_dice(site: SiteConfig, run: RunConfig, model: TappedModel,
              device: torch.device) -> dict[str, float]:
    """``model``'s mean Dice per region (WT, TC, ET) on the site's validation cases."""
    from fedbrats.client.scoring import evaluate_model
    from fedbrats.common.inference.explain import dice_per_region

    def dice(pred, gt) -> dict:
        return {r: {"dice": d} for r, d in dice_per_region(pred, gt).items()}

    data = load_site_data(site, run)
    scores = evaluate_model(model.eval(), data.val_ds, site, run, device, score=dice)
    return {r: float(scores[r]["dice"]) for r in REGIONS}


def _teacher_val_dice(site: SiteConfig, run: RunConfig, teacher: TappedModel,
                      device: torch.device) -> dict[str, float]:
    """The frozen teacher's validation Dice, computed once and kept in the work folder beside
    the teacher (keyed by the teacher file's digest and the validation cases)."""
    data = load_site_data(site, run)
    digest = teacher_digest(site)
    key = {"teacher": digest, "val": [c.case_id for c in data.val_cases],
           "patch_size": run.patch_size, "spacing": run.spacing}
    path = site.work_dir / TEACHER_VAL_FILE
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return {r: float(stored["dice"][r]) for r in REGIONS}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, torn or from another teacher: score it again
    dice = _val_dice(site, run, teacher, device)
    save_atomic(path, json.dumps({"key": key, "dice": dice}, indent=1))
    return dice


def region_trust(site: SiteConfig, run: RunConfig, student: TappedModel, teacher: TappedModel,
                 device: torch.device) -> dict[str, float]:
    """How far to trust the teacher in each region (WT, TC, ET) this round:
    :func:`trust_weight` of the teacher's and the sent student's Dice on the site's validation
    cases."""
    t = _teacher_val_dice(site, run, teacher, device)
    s = _val_dice(site, run, student, device)
    student.train()
    return {r: trust_weight(t[r], s[r]) for r in REGIONS}


def teacher_trust(site: SiteConfig, run: RunConfig, student: TappedModel, teacher: TappedModel,
                  device: torch.device) -> float:
    """``kd-trust site``: the weight of this site's distillation terms in this round, from the
    teacher's and the sent student's mean WT/TC/ET Dice on the site's validation cases."""
    t = _teacher_val_dice(site, run, teacher, device)
    s = _val_dice(site, run, student, device)
    student.train()
    return trust_weight(sum(t.values()) / len(t), sum(s.values()) / len(s))
