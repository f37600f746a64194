"""What a site does, as plain functions: no Flower here (``client/app.py`` is the thin wrapper).

* :func:`site_info`: facts about the site's data (never the data itself).
* :func:`train_teacher`: phase 1, the site's own teacher, stored on the site's disk and reused when
  a finished teacher with the same settings is there; an interrupted training resumes from its last
  finished epoch.
* :func:`distill_round`: phase 2, one round: the server's student trained for a fixed number of
  local steps against the frozen local teacher and the site's labels.
* :func:`evaluate_site`: the student (and the teacher) on the site's validation cases, by MONAI
  sliding-window inference, with Dice, HD95 and the BraTS lesion-wise scores per region.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader

from common.config import RunConfig, SiteConfig
from common.contract import CONTRASTS
from common.data import Case, check_site, discover_cases, voxel_spacing
from common.files import save_atomic
from common.inference import sliding_window_softmax
from common.losses import DistillationLoss, SupervisedLoss, teacher_correct_mask
from common.metrics import evaluate_case
from common.models import FeatureProjector, TappedModel, build_projector, resolve_spec
from common.scores import mean_metrics
from common.transforms import (
    IMAGE,
    INPUT_LABEL,
    LABEL,
    build_dataset,
    normalise_probabilities,
    to_input_grid,
)

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"
PROJECTOR_FILE = "projector.pt"


class SiteError(RuntimeError):
    """The site cannot take part: no usable data, or a stored file that does not fit."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by a hash of (seed, case id): stable when cases are
    added, and the same on every run. At least one case on each side when there are two or more."""

    def key(c: Case) -> str:
        return hashlib.sha256(f"{seed}:{c.case_id}".encode()).hexdigest()

    ordered = sorted(cases, key=key)
    if len(ordered) < 2:
        raise SiteError(
            f"a site needs at least 2 usable cases (one to train, one to validate), found "
            f"{len(ordered)}"
        )
    n_val = min(max(1, round(len(ordered) * val_fraction)), len(ordered) - 1)
    val = sorted(ordered[:n_val], key=lambda c: c.case_id)
    train = sorted(ordered[n_val:], key=lambda c: c.case_id)
    return train, val


@dataclass
class SiteData:
    train_cases: list[Case]
    val_cases: list[Case]
    train_ds: object
    val_ds: object


_DATA_CACHE: dict[tuple, SiteData] = {}


def site_cases(site: SiteConfig) -> list[Case]:
    cases = discover_cases(site.data_dir, site.manifest)
    return [c for c in cases if c.seg is not None]


def load_site_data(site: SiteConfig, run: RunConfig) -> SiteData:
    """The site's cached train and validation datasets (built once per process and site)."""
    key = (str(site.data_dir.resolve()), str(site.manifest), site.labels, run.spacing,
           run.patch_size, run.val_fraction, run.seed)
    if key not in _DATA_CACHE:
        train, val = split_cases(site_cases(site), run.val_fraction, run.seed)
        spacing = (run.spacing,) * 3
        _DATA_CACHE[key] = SiteData(
            train, val,
            build_dataset(train, spacing, (run.patch_size,) * 3, site.labels),
            build_dataset(val, spacing, None, site.labels),
        )
    return _DATA_CACHE[key]


def site_info(site: SiteConfig, run: RunConfig) -> dict:
    """Facts the server may see: population, case counts, contrasts present, check summary."""
    cases = discover_cases(site.data_dir, site.manifest)
    reports = check_site(cases, site.labels)
    usable = [c for c, r in zip(cases, reports) if r.ok and c.seg is not None]
    if len(usable) >= 2:
        train, val = split_cases(usable, run.val_fraction, run.seed)
    else:
        train, val = usable, []
    contrasts = {k: sum(k in c.present for c in usable) for k in CONTRASTS}
    problems = [p for r in reports for p in r.problems]
    return {
        "population": site.population,
        "num_cases": len(cases),
        "num_usable": len(usable),
        "num_train": len(train),
        "num_val": len(val),
        "contrasts_present": contrasts,
        "num_unusable": sum(not r.ok for r in reports),
        "num_without_seg": sum(c.seg is None for c in cases),
        "problems": problems[:5],
    }


def _batches(ds, batch_size: int, seed: int) -> Iterator[dict]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                              generator=gen)


def select_device(run: RunConfig) -> torch.device:
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SiteError("run setting device='cuda' but this site has no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def predict_volume(model: TappedModel, image: torch.Tensor, run: RunConfig,
                   device: torch.device, tta: bool = False) -> torch.Tensor:
    """Class probabilities ``K, H, W, D`` (on the CPU) for a ``C, H, W, D`` image by MONAI
    sliding-window inference (Gaussian blending of the windows' logits, then softmax); with
    ``tta`` averaged over the 8 flipped copies (:mod:`common.inference`)."""
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=run.amp and device.type == "cuda"):
        probs, _ = sliding_window_softmax(lambda x: model(x)[0], image[None].to(device),
                                          (run.patch_size,) * 3, run.sw_overlap, tta=tta)
    return probs.cpu()


def evaluate_model(model: TappedModel, val_ds, site: SiteConfig, run: RunConfig,
                   device: torch.device, drop: Sequence[str] = (),
                   score: Callable[[np.ndarray, np.ndarray], dict] | None = None,
                   tta: bool = False) -> dict:
    """Mean scores of ``model`` over the validation cases; ``drop`` zeroes those contrasts;
    ``tta`` segments with the softmax averaged over the 8 flipped copies of each case.

    Each case is segmented on the model grid and scored on its own grid, as BraTS scores: the
    class probabilities go back through the inverse of the preprocessing (trilinear), their
    argmax is compared with the label as the site's file has it (``val_ds`` is an evaluation
    dataset of :func:`~common.transforms.build_dataset`, whose items keep that label).

    ``score(pred, gt)`` gives one case's ``{region: {metric: value}}``; by default all the
    metrics of :func:`~common.metrics.evaluate_case` for the site's population.
    """
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
        if score is None:
            per_case.append(evaluate_case(pred, gt, voxel_spacing(label.affine),
                                          site.population))
        else:
            per_case.append(score(pred, gt))
    return mean_metrics(per_case)


# --------------------------------------------------------------------------------------------
# Phase 1: the site's teacher
# --------------------------------------------------------------------------------------------


def _teacher_path(site: SiteConfig) -> Path:
    return site.work_dir / TEACHER_FILE


def _read_teacher_file(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn write from a crash: start the teacher again
        log.warning("%s: unreadable teacher checkpoint (%s); training again", path, e)
        return None


def train_teacher(site: SiteConfig, run: RunConfig) -> dict:
    """Train (or reuse, or resume) the site's teacher; returns metrics only.

    The teacher is stored in ``site.work_dir/teacher.pt`` with the settings it was trained with
    (:meth:`RunConfig.teacher_fingerprint`). A finished teacher with the same settings is reused;
    an unfinished one resumes from its last finished epoch.
    """
    path = _teacher_path(site)
    fingerprint = run.teacher_fingerprint()
    stored = _read_teacher_file(path)
    if stored is not None and json.loads(stored["fingerprint"]) != fingerprint:
        log.info("%s: stored teacher was trained with other settings; training a new one", path)
        stored = None
    if stored is not None and stored["finished"]:
        log.info("%s: reusing the finished teacher (%s)", site.population, path)
        return {**json.loads(stored["metrics"]), "reused": 1}

    device = select_device(run)
    data = load_site_data(site, run)
    spec = resolve_spec(run.teacher_model)
    torch.manual_seed(_seed(run.seed, site.population, "teacher"))
    model = TappedModel.from_spec(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=run.teacher_lr, weight_decay=1e-5)
    total_steps = run.teacher_epochs * run.teacher_steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=run.teacher_lr, total_steps=total_steps,
                                                pct_start=0.1)
    start_epoch = 0
    history: list[dict] = []
    if stored is not None:
        model.net.load_state_dict(stored["state_dict"])
        opt.load_state_dict(stored["optimizer"])
        sched.load_state_dict(stored["scheduler"])
        start_epoch = int(stored["epoch"])
        history = json.loads(stored["history"])
        log.info("%s: resuming the teacher at epoch %d", site.population, start_epoch + 1)

    loss_fn = SupervisedLoss()
    batches = _batches(data.train_ds, run.batch_size, _seed(run.seed, site.population, start_epoch))
    scaler = torch.amp.GradScaler(enabled=run.amp and device.type == "cuda")
    t0 = time.perf_counter()
    for epoch in range(start_epoch, run.teacher_epochs):
        model.train()
        losses = []
        for _ in range(run.teacher_steps_per_epoch):
            batch = next(batches)
            x, y = batch[IMAGE].to(device), batch[LABEL].to(device)
            with torch.autocast(device.type, enabled=run.amp and device.type == "cuda"):
                loss = loss_fn(model(x)[0], y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        finished = epoch + 1 == run.teacher_epochs
        metrics = {}
        if finished:
            scores = evaluate_model(model, data.val_ds, site, run, device)
            metrics = {f"{r}_{m}": v for r, s in scores.items() for m, v in s.items()
                       if m in ("dice", "lesion_dice") and v is not None}
            metrics.update(train_loss=history[-1]["loss"], epochs=run.teacher_epochs,
                           seconds=time.perf_counter() - t0, reused=0)
        log.info("%s teacher epoch %d/%d loss %.4f", site.population, epoch + 1,
                 run.teacher_epochs, history[-1]["loss"])
        save_atomic(path, {
            "spec": json.dumps(spec.to_dict()),
            "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch + 1,
            "finished": finished,
            "fingerprint": json.dumps(fingerprint),
            "history": json.dumps(history),
            "metrics": json.dumps(metrics),
        })
    return metrics


def load_teacher(site: SiteConfig, run: RunConfig, device: torch.device) -> TappedModel:
    stored = _read_teacher_file(_teacher_path(site))
    if stored is None or not stored["finished"]:
        raise SiteError(
            f"{site.population}: no finished teacher in {_teacher_path(site)}; phase 1 (train "
            "teacher) must run first"
        )
    if json.loads(stored["fingerprint"]) != run.teacher_fingerprint():
        raise SiteError(
            f"{_teacher_path(site)}: the stored teacher was trained with other settings"
        )
    model = TappedModel.from_spec(resolve_spec(json.loads(stored["spec"])))
    model.net.load_state_dict(stored["state_dict"])
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Phase 2: a distillation round
# --------------------------------------------------------------------------------------------


def new_student(run: RunConfig) -> TappedModel:
    torch.manual_seed(_seed(run.seed, "student"))
    return TappedModel.from_spec(resolve_spec(run.student_model))


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


def distill_round(site: SiteConfig, run: RunConfig, student_state: Mapping[str, torch.Tensor],
                  server_round: int, proximal_mu: float = 0.0
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the server's student for ``run.local_steps`` steps against the local teacher.

    Loss: supervised (Dice + CE on the site's labels) + logit and feature distillation from the
    frozen teacher, which sees every contrast while the student may see a random subset (modality
    dropout); with ``proximal_mu > 0`` (FedProx) also ``mu / 2 * ||w - w_global||^2``.
    Returns the updated student state dict and metrics (mean loss terms). The projector stays here.
    """
    device = select_device(run)
    data = load_site_data(site, run)
    # without distillation terms (a labels-only baseline) no teacher or projector is involved
    distil = run.logit_weight > 0 or run.feature_weight > 0
    teacher = load_teacher(site, run, device).requires_grad_(False) if distil else None
    student = new_student(run)
    student.net.load_state_dict(student_state)
    student.to(device).train()
    projector = _projector(site, student, teacher, run, device) if distil else None
    loss_fn = DistillationLoss(
        supervised_weight=run.supervised_weight, logit_weight=run.logit_weight,
        feature_weight=run.feature_weight, temperature=run.temperature,
        feature_kind=run.feature_kind,
    )
    params = list(student.parameters())
    if projector is not None:
        params += list(projector.parameters())
    opt = torch.optim.Adam(params, lr=run.round_lr(server_round))
    global_params = [p.detach().clone() for p in student.parameters()] if proximal_mu else []
    seed = _seed(run.seed, site.population, "round", server_round)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data.train_ds, run.batch_size, seed)
    amp = run.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(enabled=amp)
    sums: dict[str, float] = {}
    for _ in range(run.local_steps):
        batch = next(batches)
        x, y = batch[IMAGE].to(device), batch[LABEL].to(device)
        x_student = student_input(x, run, gen)
        with torch.autocast(device.type, enabled=amp):
            t_logits = t_feats = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits, t_feats = teacher(x)
            s_logits, s_feats = student(x_student)
            need_feats = run.feature_weight > 0
            kd_mask = None
            if t_logits is not None and run.kd_mask == "teacher-correct":
                kd_mask = teacher_correct_mask(t_logits, y)
            total, terms = loss_fn(
                s_logits, t_logits, y,
                projector(s_feats, t_feats) if need_feats else None,
                t_feats if need_feats else None,
                kd_mask=kd_mask,
            )
        if proximal_mu:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(student.parameters(), global_params))
            total = total + proximal_mu / 2 * prox
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if projector is not None:
        save_atomic(site.work_dir / PROJECTOR_FILE,
                     {k: v.detach().cpu() for k, v in projector.state_dict().items()})
    metrics = {("loss" if k == "total" else k): v / run.local_steps for k, v in sums.items()}
    metrics["num_steps"] = run.local_steps
    state = {k: v.detach().cpu() for k, v in student.net.state_dict().items()}
    return state, metrics


# --------------------------------------------------------------------------------------------
# Evaluation of the final student beside the teacher
# --------------------------------------------------------------------------------------------


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
    student = new_student(run)
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
