"""Phase 1 at a site: its own teacher, trained on its own cases and stored in its work folder
(it never leaves the site). A finished teacher with the same settings is reused; an interrupted
training resumes from its last finished epoch."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedbrats.client.data import SiteError, load_site_data, select_device, training_batches
from fedbrats.client.scoring import evaluate_model
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.transforms import IMAGE, LABEL
from fedbrats.common.losses import SupervisedLoss
from fedbrats.common.networks.models import TappedModel, resolve_spec
from fedbrats.common.utils.files import save_atomic
from fedbrats.common.utils.seeds import derived_seed

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.pt"


def teacher_path(site: SiteConfig) -> Path:
    """Where the site keeps its teacher."""
    return site.work_dir / TEACHER_FILE


def _read_teacher_file(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn write from a crash: start the teacher again
        log.warning("%s: unreadable teacher checkpoint (%s); training again", path, e)
        return None


def warm_round(site: SiteConfig, run: RunConfig, state: Mapping[str, torch.Tensor],
               server_round: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One site's round of the teachers' federated warm start: the global teacher network
    (``state``) trained ``run.local_steps`` steps (a round, as in phase 2) on the site's labels
    (Dice + CE, Adam at ``teacher-lr``, every contrast: the teacher never sees modality
    dropout). Returns the updated state dict and the mean loss."""
    import dataclasses

    from fedbrats.client.distill import LocalTrainer

    device = select_device(run)
    data = load_site_data(site, run)
    model = TappedModel.from_spec(resolve_spec(run.teacher_model))
    model.net.load_state_dict(state)
    model.to(device).train()
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0,
                                      modality_dropout=False)
    seed = derived_seed(run.seed, site.population, "warm", server_round)
    trainer = LocalTrainer(model, labels_only, device, run.teacher_lr, seed)
    batches = training_batches(data.train_ds, run.batch_size, seed)
    loss = 0.0
    for _ in range(run.local_steps):
        loss += float(trainer.step(next(batches))["total"])
    metrics = {"loss": loss / run.local_steps, "num_steps": run.local_steps}
    return {k: v.detach().cpu() for k, v in model.net.state_dict().items()}, metrics


def _initial_teacher(site: SiteConfig, run: RunConfig,
                     init_state: Mapping[str, torch.Tensor] | None, resuming: bool
                     ) -> TappedModel:
    """The teacher network before its first step: seeded, or the warm start's network."""
    torch.manual_seed(derived_seed(run.seed, site.population, "teacher"))
    model = TappedModel.from_spec(resolve_spec(run.teacher_model))
    if init_state is not None:
        model.net.load_state_dict(init_state)
    elif run.teacher_warm_rounds and not resuming:
        raise SiteError(f"{site.population}: teacher-warm-rounds is {run.teacher_warm_rounds} "
                        "but no warm-start network was given to train the teacher from")
    return model


def train_teacher(site: SiteConfig, run: RunConfig,
                  init_state: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Train (or reuse, or resume) the site's teacher; returns metrics only.

    The teacher is stored in ``site.work_dir/teacher.pt`` with the settings it was trained with
    (:meth:`RunConfig.teacher_fingerprint`). A finished teacher with the same settings is reused;
    an unfinished one resumes from its last finished epoch. ``init_state``: the network the
    training starts from (the federated warm start's result); required when
    ``run.teacher_warm_rounds > 0`` and no stored teacher is reused or resumed.
    """
    path = teacher_path(site)
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
    model = _initial_teacher(site, run, init_state, resuming=stored is not None).to(device)
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
    batches = training_batches(data.train_ds, run.batch_size,
                               derived_seed(run.seed, site.population, start_epoch))
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
    stored = _read_teacher_file(teacher_path(site))
    if stored is None or not stored["finished"]:
        raise SiteError(
            f"{site.population}: no finished teacher in {teacher_path(site)}; phase 1 (train "
            "teacher) must run first"
        )
    if json.loads(stored["fingerprint"]) != run.teacher_fingerprint():
        raise SiteError(
            f"{teacher_path(site)}: the stored teacher was trained with other settings"
        )
    model = TappedModel.from_spec(resolve_spec(json.loads(stored["spec"])))
    model.net.load_state_dict(stored["state_dict"])
    return model.to(device).eval()
