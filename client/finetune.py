"""A site's own model: the federated student fine-tuned on the site's cases.

Parida et al. fine-tuned pre-trained nnU-Net and MedNeXt on a small SSA set with stratified
folds and beat training from scratch. fedbrats does the same with its student
(``fedbrats finetune``, or the last phase of a run with ``personalise = true``):

1. the site's cases are split as in a run (``val-fraction``, ``seed``): the validation cases
   are kept aside for the report; the training cases are split into ``folds`` folds
   stratified by tumour volume (sorted by whole-tumour volume, each consecutive block of
   ``folds`` cases spread over the folds in a seeded random order);
2. for each fold, the student is fine-tuned on the other folds (labels only: Dice + CE, the
   run's modality dropout and augmentation; Adam at ``lr``), scored every ``eval_every`` steps
   on the held-out fold (mean Dice over WT, TC, ET), and stopped ``patience`` evaluations after
   its best; the fold's best step count is kept (0 when fine-tuning never beat the student);
3. the final model is fine-tuned on all the training cases for the median of the folds' best
   step counts (none: the student itself is kept), and written as a student file of the same
   format (:mod:`fedbrats.common.inference.modelfile`) with a ``personalised`` record;
4. the report scores the federated student and the fine-tuned one on the validation cases.

A student with a last block per population fine-tunes its shared body and the site's own
block; the other blocks are kept as they are. Plain functions: the CLI and the ClientApp call
them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbrats.common.data.contract import REGIONS

if TYPE_CHECKING:  # torch (which the run settings import) only inside the functions, so that
    # `fedbrats --help` stays fast
    import torch

    from fedbrats.common.config import RunConfig, SiteConfig
    from fedbrats.common.data.cases import Case

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    folds: int = 5
    max_steps: int = 300
    eval_every: int = 25
    patience: int = 4
    lr: float = 1e-4
    """A tenth of the presets' student rate: at 1e-3 every fold of the demo's SSA site lost
    Dice within 25 steps (held-out mean Dice 0.89 -> 0.67, 0.93 -> 0.84, 0.80 -> 0.53, 0.91
    -> 0.85), and early stopping kept the federated student unchanged."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("folds", "max_steps", "eval_every", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "folds" else 1):
                raise ValueError(f"fine-tuning {name.replace('_', '-')}: expected an integer >= "
                                 f"{2 if name == 'folds' else 1}, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"fine-tuning lr: expected a number > 0, got {self.lr!r}")


class FinetuneError(ValueError):
    """Fine-tuning that cannot run (too few cases); the message says what was found."""


def tumour_volume_mm3(case: Case) -> float:
    """The whole-tumour volume of a case's segmentation file (any label > 0), in mm^3."""
    import nibabel as nib

    from fedbrats.common.data.cases import voxel_spacing

    img = nib.load(str(case.seg))
    return float(np.count_nonzero(np.asarray(img.dataobj))) * float(
        np.prod(voxel_spacing(img.affine)))


def stratified_folds(cases: Sequence[Case], volumes: Sequence[float], k: int,
                     seed: int) -> list[list[Case]]:
    """``k`` folds of ``cases`` stratified by ``volumes``: sorted by volume, each consecutive
    block of ``k`` cases goes one to a fold, in a seeded random order per block. Every fold gets
    cases of every size range; fold sizes differ by at most one."""
    if not 2 <= k <= len(cases):
        raise FinetuneError(f"{k} folds of {len(cases)} training cases: expected 2 <= folds <= "
                            "the number of cases")
    rng = np.random.default_rng(seed)
    order = sorted(range(len(cases)), key=lambda i: (volumes[i], cases[i].case_id))
    folds: list[list[Case]] = [[] for _ in range(k)]
    fill = np.zeros(k, dtype=int)
    for start in range(0, len(order), k):
        block = order[start:start + k]
        # the folds with the fewest cases first, in a random order among equals
        targets = sorted(range(k), key=lambda f: (fill[f], rng.random()))[:len(block)]
        for i, f in zip(rng.permutation(block), targets):
            folds[f].append(cases[int(i)])
            fill[f] += 1
    return [sorted(f, key=lambda c: c.case_id) for f in folds]


def _mean_dice(scores: Mapping[str, Mapping[str, Any]]) -> float:
    values = [scores[r]["dice"] for r in REGIONS if scores.get(r, {}).get("dice") is not None]
    return float(np.mean(values)) if values else math.nan


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]
    best_step: int
    curve: list[dict] = field(default_factory=list)
    """``[{"step": n, "dice": mean Dice on the held-out cases}, ...]``, step 0 the student."""


def _fit(run: RunConfig, site: SiteConfig, start: Mapping[str, torch.Tensor], train_ds,
         settings: FinetuneSettings, device: torch.device, steps: int | None = None,
         held_ds=None, seed: int = 0) -> FitResult:
    """Fine-tune ``start`` on ``train_ds``: with ``held_ds``, up to ``max_steps`` steps with
    early stopping on it (the best state kept); without, exactly ``steps`` steps."""
    from fedbrats.client.data import training_batches
    from fedbrats.client.distill import LocalTrainer
    from fedbrats.client.scoring import evaluate_model
    from fedbrats.common.networks.models import new_student

    model = new_student(run, site.population)
    model.net.load_state_dict(start)
    model.to(device)
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    trainer = LocalTrainer(model, labels_only, device, settings.lr, seed)
    batches = training_batches(train_ds, run.batch_size, seed)

    import torch  # noqa: F401 (the step below runs on torch)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}

    def score() -> float:
        return _mean_dice(evaluate_model(model, held_ds, site, run, device))

    best_state, best_step, curve = snapshot(), 0, []
    if held_ds is not None:
        best = score()
        curve.append({"step": 0, "dice": best})
        since = 0
        total = settings.max_steps
    else:
        total = int(steps or 0)
    for step in range(1, total + 1):
        model.train()
        trainer.step(next(batches))
        if held_ds is not None and step % settings.eval_every == 0:
            dice = score()
            curve.append({"step": step, "dice": dice})
            if dice > best:
                best, best_step, best_state, since = dice, step, snapshot(), 0
            else:
                since += 1
                if since >= settings.patience:
                    break
    if held_ds is None:
        best_state, best_step = snapshot(), total
    return FitResult(best_state, best_step, curve)


@dataclass
class FinetuneResult:
    state: dict[str, torch.Tensor]
    steps: int
    folds: list[dict]
    """Per fold: its cases (with volumes), best step, curve."""
    global_scores: dict
    personal_scores: dict
    num_train: int
    num_val: int
    seconds: float

    def to_dict(self) -> dict:
        return {"steps": self.steps, "folds": self.folds, "global": self.global_scores,
                "personal": self.personal_scores, "num_train": self.num_train,
                "num_val": self.num_val, "seconds": self.seconds}


def finetune_site(run: RunConfig, site: SiteConfig, student_state: Mapping[str, torch.Tensor],
                  settings: FinetuneSettings = FinetuneSettings(),
                  progress: Callable[[str], None] | None = None) -> FinetuneResult:
    """The module docstring's steps 1-4 for ``site`` (its ``work_dir`` keeps the preprocessed
    cases); returns the fine-tuned weights and the figures."""
    from fedbrats.client.data import select_device, site_cases, split_cases
    from fedbrats.client.scoring import evaluate_model
    from fedbrats.common.data.transforms import build_dataset, kept_cases, training_dataset
    from fedbrats.common.networks.models import new_student
    from fedbrats.common.utils.seeds import derived_seed

    started = time.monotonic()
    say = progress or (lambda text: log.info("%s", text))
    device = select_device(run)
    cases = site_cases(site)
    if len(cases) < 3:
        raise FinetuneError(f"site {site.population} ({site.data_dir}): {len(cases)} labelled "
                            "case(s); fine-tuning needs at least 3 (two to train in folds, one "
                            "to validate)")
    train, val = split_cases(cases, run.val_fraction, run.seed)
    k = min(settings.folds, len(train))
    if k < 2:
        raise FinetuneError(f"site {site.population}: {len(train)} training case(s) after the "
                            f"validation split; fine-tuning needs at least 2 for its folds")
    spacing = (run.spacing,) * 3
    patch = (run.patch_size,) * 3
    cache = site.work_dir / "case-cache"
    volumes = [tumour_volume_mm3(c) for c in train]
    folds = stratified_folds(train, volumes, k, settings.seed)
    volume_of = {c.case_id: v for c, v in zip(train, volumes)}

    def train_ds(subset: Sequence[Case]):
        return training_dataset(kept_cases(subset, spacing, cache, site.labels), patch)

    def eval_ds(subset: Sequence[Case]):
        return build_dataset(subset, spacing, None, site.labels, cache_dir=cache)

    fold_records = []
    for i, held in enumerate(folds):
        fit_cases = [c for c in train if c not in held]
        say(f"{site.population}: fold {i + 1}/{k}: fine-tuning on {len(fit_cases)} case(s), "
            f"stopping on {len(held)}")
        fit = _fit(run, site, student_state, train_ds(fit_cases), settings, device,
                   held_ds=eval_ds(held), seed=derived_seed(settings.seed, site.population, i))
        fold_records.append({
            "fold": i + 1, "best_step": fit.best_step, "curve": fit.curve,
            "held_out": [{"case_id": c.case_id, "wt_mm3": volume_of[c.case_id]} for c in held]})
    steps = int(np.median([f["best_step"] for f in fold_records]))
    if steps > 0:
        say(f"{site.population}: fine-tuning on all {len(train)} training case(s) for {steps} "
            "step(s) (the folds' median best)")
        final = _fit(run, site, student_state, train_ds(train), settings, device, steps=steps,
                     seed=derived_seed(settings.seed, site.population, "final")).state
    else:
        say(f"{site.population}: no fold gained from fine-tuning; the student is kept as it is")
        final = {k: v.detach().cpu().clone() for k, v in student_state.items()}

    scores = {}
    val_ds = eval_ds(val)
    for name, state in (("global", student_state), ("personal", final)):
        model = new_student(run, site.population)
        model.net.load_state_dict(state)
        model.to(device)
        scores[name] = evaluate_model(model, val_ds, site, run, device)
    return FinetuneResult(final, steps, fold_records, scores["global"], scores["personal"],
                          len(train), len(val), time.monotonic() - started)


def personal_payload(run: RunConfig, result: FinetuneResult, base: Mapping[str, Any],
                     site: SiteConfig, settings: FinetuneSettings) -> dict:
    """The fine-tuned model as a student file (``base``: the federated student's file
    contents, whose round and post-processing it keeps), with a ``personalised`` record."""
    from fedbrats.common.inference.modelfile import PostprocessThresholds, student_payload

    raw = (base.get("postprocess_by_population") or {}).get(site.population) \
        or base.get("postprocess")
    thresholds = PostprocessThresholds.from_dict(raw) if raw else None
    payload = student_payload(run, result.state, int(base.get("round") or 0), thresholds)
    payload["personalised"] = json.dumps({
        "population": site.population, "steps": result.steps, "folds": len(result.folds),
        "settings": dataclasses.asdict(settings), "num_train": result.num_train,
    })
    return payload


def write_report(result: FinetuneResult, site: SiteConfig, out: Path,
                 model_path: Path) -> Path:
    """``finetune.json`` and ``finetune.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(
        {"population": site.population, "model": str(model_path), **result.to_dict()},
        indent=1, default=float))
    lines = [f"# {site.population}: the federated student fine-tuned on the site's cases", "",
             f"{result.num_train} training case(s) in {len(result.folds)} volume-stratified "
             f"folds; the final model was fine-tuned for {result.steps} step(s) (the median of "
             f"the folds' best); {result.seconds:.0f} s.", "",
             f"On the site's {result.num_val} validation case(s):", "",
             "| region | Dice, federated | Dice, fine-tuned | diff | lesion Dice, federated | "
             "lesion Dice, fine-tuned | diff |", "|---|---|---|---|---|---|---|"]
    for r in REGIONS:
        g, p = result.global_scores.get(r, {}), result.personal_scores.get(r, {})
        cells = []
        for m in ("dice", "lesion_dice"):
            a, b = g.get(m), p.get(m)
            cells += [_f(a), _f(b), _f(None if a is None or b is None else b - a, True)]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "| fold | held-out cases (WT mm^3) | best step | held-out mean Dice by step |",
              "|---|---|---|---|"]
    for f in result.folds:
        held = ", ".join(f"{c['case_id']} ({c['wt_mm3']:.0f})" for c in f["held_out"])
        curve = ", ".join(f"{p['step']}: {p['dice']:.3f}" for p in f["curve"])
        lines.append(f"| {f['fold']} | {held} | {f['best_step']} | {curve} |")
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    return out / "finetune.md"


def _f(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


__all__ = ["FinetuneError", "FinetuneResult", "FinetuneSettings", "finetune_site",
           "personal_payload", "stratified_folds", "tumour_volume_mm3", "write_report"]


# --------------------------------------------------------------------------------------------
# Command line: fedbrats finetune
# --------------------------------------------------------------------------------------------

FINETUNE_DESCRIPTION = """\
Fine-tune a federated student on one site's own cases and write a personalised student file of
the same format. The site's cases are split as in the run the student came from (its
val-fraction and seed): the validation cases are kept for the report; the training cases are
split into --folds folds stratified by tumour volume. For each fold the student is fine-tuned on
the others (labels only, Dice + CE, with the run's modality dropout and augmentation), scored on
the held-out fold every --eval-every steps and stopped --patience evaluations after its best;
the final model is fine-tuned on all training cases for the median of the folds' best step
counts. Writes OUT/student.pt, OUT/finetune.md (federated vs fine-tuned on the validation cases,
the folds) and OUT/finetune.json.
"""


def register_finetune(subparsers) -> None:
    import argparse

    from fedbrats.common.data.contract import POPULATIONS
    from fedbrats.common.data.labels import add_labels_argument

    p = subparsers.add_parser("finetune", help="fine-tune a federated student on one site's "
                              "cases (a personalised model)", description=FINETUNE_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FinetuneSettings()
    p.add_argument("--model", metavar="STUDENT", required=True, help="the federated student.pt")
    p.add_argument("--site", metavar="DIR", required=True, help="the site's case folder")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder for the personalised student.pt and the report (created; "
                        "its work/ subfolder keeps the preprocessed cases)")
    p.add_argument("--population", choices=POPULATIONS, default=None,
                   help="the site's population (default: read from the case ids)")
    add_labels_argument(p, of="the site's segmentations")
    p.add_argument("--folds", type=int, default=defaults.folds,
                   help=f"volume-stratified folds of the training cases (default "
                        f"{defaults.folds}; at most the number of training cases)")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help=f"most optimiser steps per fold (default {defaults.max_steps})")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help=f"steps between scores on the held-out fold (default "
                        f"{defaults.eval_every})")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help=f"scores without a gain before a fold stops (default "
                        f"{defaults.patience})")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"Adam learning rate (default {defaults.lr:g})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the folds and steps")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (auto: CUDA when available)")
    p.set_defaults(func=run_finetune)


def _population_of(site_dir: Path) -> str | None:
    from fedbrats.common.data.cases import discover_cases, population_from_id

    pops = {population_from_id(c.case_id) for c in discover_cases(site_dir)}
    return pops.pop() if len(pops) == 1 else None


def run_finetune(args) -> int:
    import sys

    from fedbrats.client.data import SiteError
    from fedbrats.common.config import ConfigError, SiteConfig, load_run_config
    from fedbrats.common.data.cases import DataError
    from fedbrats.common.inference.modelfile import ModelFileError, load_student
    from fedbrats.common.utils.files import save_atomic

    import torch

    out = Path(args.out)
    try:
        settings = FinetuneSettings(args.folds, args.max_steps, args.eval_every, args.patience,
                                    args.lr, args.seed)
        student = load_student(args.model)  # checks the file
        base = torch.load(args.model, map_location="cpu", weights_only=True)
        config = json.loads(base.get("config") or "{}")
        if not config:
            raise ModelFileError(f"{args.model}: no run settings (config) in the file; "
                                 "fine-tuning needs the run's preprocessing and split")
        run = load_run_config({k.replace("_", "-"): v for k, v in config.items()
                               if k != "preset"} | {"device": args.device})
        site_dir = Path(args.site)
        if not site_dir.is_dir():
            raise DataError(f"--site {site_dir}: no such folder")
        population = args.population or _population_of(site_dir)
        if population is None:
            raise DataError(f"--site {site_dir}: the case ids name no single population; pass "
                            "--population")
        site = SiteConfig(population, site_dir, out / "work", labels=args.labels)
        result = finetune_site(run, site, student.network.state_dict(), settings,
                               progress=lambda text: print(text, flush=True))
    except (ValueError, ModelFileError, DataError, SiteError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_path = out / "student.pt"
    save_atomic(model_path, personal_payload(run, result, base, site, settings))
    report = write_report(result, site, out, model_path)
    print(report.read_text())
    print(f"wrote {model_path}, {report} and {out / 'finetune.json'}")
    return 0
