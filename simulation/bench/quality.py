"""``fedbrats bench quality``: does the fedbrats student beat what a consortium runs today?

Every method is trained on the five phantom populations of ``make demo`` (BraTS-like imbalance:
GLI 16, MEN 13, SSA, PED and MET 6 cases) and scored on held-out *test* cases: phantoms generated
with another seed, which no training or validation step sees (10 per population). Each method runs
for several seeds (network initialisation, batches, augmentation and the train/validation split).

Every method reads its settings from the preset it names (``cpu-demo`` by default): the teachers
are trained exactly as phase 1 trains them (``train_teacher``), the student exactly as phase 2
(``distill_round``: rounds, local steps, modality dropout, learning-rate schedule, losses), so the
benchmark cannot drift from the product. ``--fraction F`` scales the schedule (teacher epochs and
distillation rounds alike; local steps, batches and learning rates stay) for the methods that
time does not allow at the full one.

Methods (:data:`METHODS`):

======================  =======================================================================
``teacher``             each site's teacher (phase 1) on its own population; the 5x5 table has
                        every teacher on every population
``ensemble``            the five teachers' softmax probabilities averaged
``fedavg``              one student on labels only (Dice + CE), equal-weight FedAvg, the
                        student's rounds x local steps and modality dropout
``fedavg_cm``           the same, compute-matched: also gets the teachers' optimizer steps, as
                        extra rounds
``fedprox``             ``fedavg`` with FedProx's proximal term ``mu/2 ||w - w_global||^2``
``fedavg_ft``           FedAvg for all rounds but the last, then each site fine-tunes it for one
                        round of local steps instead of averaging: one model per site
``fedavg_nodrop``       ``fedavg`` without modality dropout (plain FedAvg)
``centralised``         one student on the pooled training cases, population-balanced batches,
                        as many steps as all sites together
``centralised_nodrop``  the same without modality dropout
``student``             the fedbrats student with the preset's protocol
``no_feature_kd``       the student with ``feature-weight`` 0
``no_logit_kd``         the student with ``logit-weight`` 0
``case_weighted``       the student, sites weighted by their number of training cases
======================  =======================================================================

Federated methods run in this process with plain functions, not through Flower: each round calls
every site's local training one after another and the server's aggregation is the weighted mean of
the returned state dicts (what FedAvg and FedProx compute; the Flower path is tested in
``tests/simulation/test_simulation_e2e.py``). The site functions are those of ``client/``.

Resumable in parts: each (fraction, seed, method) is one JSON file under ``OUT/quality-parts/``,
written when the method is done, with the settings it ran with; a run skips the parts it finds
(same settings) and the report merges every part there into one table. Teachers are kept in the
work folder and reused by a later run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS
from fedbrats.simulation.bench.perf import (
    add_common_arguments,
    command_line,
    machine_info,
    register_perf,
    resolve_dirs,
    torch_threads,
)

if TYPE_CHECKING:  # heavy imports only inside functions: `fedbrats --help` stays fast
    import torch

    from fedbrats.common.config import RunConfig, SiteConfig

log = logging.getLogger(__name__)

METHODS: dict[str, str] = {
    "teacher": "local teacher (own population)",
    "ensemble": "ensemble of the 5 teachers",
    "fedavg": "FedAvg, labels only",
    "fedavg_cm": "FedAvg, compute-matched",
    "fedprox": "FedProx, labels only",
    "fedavg_ft": "FedAvg + local fine-tuning",
    "fedavg_nodrop": "FedAvg, no modality dropout",
    "fedavg_heads": "FedAvg, a last block per population",
    "centralised": "centralised, pooled",
    "centralised_nodrop": "centralised, no modality dropout",
    "student": "fedbrats student",
    "shared_head": "student, one shared last block (kd-trust region)",
    "no_trust": "student, distillation not weighted (kd-trust none, one shared block)",
    "no_feature_kd": "student, no feature KD",
    "no_logit_kd": "student, no logit KD",
    "case_weighted": "student, case-weighted mean",
    "kd_correct": "student, logit KD only where the teacher is right (kd-trust none)",
    "kd_correct_nofeat": "student, KD where the teacher is right, no feature KD (kd-trust none)",
    "warm_teacher": "teachers from a federated warm start",
    "warm_student": "student of the warm-started teachers",
    "warm_ensemble": "ensemble of the warm-started teachers",
    "fedkd": "student from a FedAvg warm start, its fine-tuned teachers (kd-trust none)",
    "fedkd_teacher": "teachers fine-tuned from the FedAvg warm start",
    "fedkd_ensemble": "ensemble of the fine-tuned warm-start teachers",
    "fedkd_trust": "warm-start student, distillation weighted by teacher trust",
    "trust": "student, distillation weighted by teacher trust",
    "student_fp16": "student (kd-trust none), transfer-dtype float16",
    "student_kept": "student, the teacher's outputs kept (teacher-cache)",
}
"""Method keys, in table order, with the label the tables use."""

DECIDING: tuple[str, ...] = ("teacher", "ensemble", "fedavg", "student")
"""The methods that decide the issue's question; ``--methods deciding`` runs these."""

LABELS_ONLY_VARIANTS: dict[str, dict[str, Any]] = {
    **{m: {"student_heads": "shared"} for m in (
        "fedavg", "fedavg_cm", "fedprox", "fedavg_ft", "fedavg_nodrop", "centralised",
        "centralised_nodrop")},
    "fedavg_heads": {"student_heads": "population"},
}
"""Run-setting changes of the labels-only methods: the FedAvg that consortia run today has one
shared network whatever the preset's student has; ``fedavg_heads`` gives it the student's head
per population (FedPer-like), to tell what the heads do from what distillation does."""

SHARED_HEAD: dict[str, Any] = {"student_heads": "shared"}
"""The student's last block shared by all populations, as before ``student-heads population``
became the presets' default: the ablations measured then keep it (their parts stay valid)."""

DISTILLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "student": {},
    "shared_head": SHARED_HEAD,
    "no_trust": {"kd_trust": "none", **SHARED_HEAD},
    "no_feature_kd": {"feature_weight": 0.0, **SHARED_HEAD},
    "no_logit_kd": {"logit_weight": 0.0, **SHARED_HEAD},
    "case_weighted": {"aggregation": "cases", **SHARED_HEAD},
    "kd_correct": {"kd_mask": "teacher-correct", "kd_trust": "none", **SHARED_HEAD},
    "kd_correct_nofeat": {"kd_mask": "teacher-correct", "feature_weight": 0.0,
                          "kd_trust": "none", **SHARED_HEAD},
    "warm_student": lambda run: {**warm_split(run), **SHARED_HEAD},
    "fedkd": lambda run: {**fedkd_split(run), "kd_trust": "none", **SHARED_HEAD},
    "fedkd_trust": lambda run: {**fedkd_split(run), "kd_trust": "site", **SHARED_HEAD},
    "trust": {"kd_trust": "site", **SHARED_HEAD},
    "student_fp16": {"transfer_dtype": "float16", "kd_trust": "none", **SHARED_HEAD},
    "student_kept": {"teacher_cache": True},
}
"""Run-setting changes of each distillation method against the preset (or a function of the
preset's settings that gives them). The student of the presets has a last block per population
(``student_heads = "population"``) and weights its distillation by region trust (``kd_trust =
"region"``); ``shared_head`` is that student with one shared last block (the presets' student
before 2026-12-03). The other variants were measured before either and keep one shared block
(and ``fedkd``, ``student_fp16`` and the teacher-correct mask, which cannot be combined with
region trust, ``kd_trust = "none"``)."""


def fedkd_split(run: RunConfig) -> dict[str, Any]:
    """Teachers of the student's own network from a FedAvg warm start that the student also
    starts from: a third of the rounds warm start, the rest distillation, the teachers'
    epochs as fine-tuning (the steps of compute-matched FedAvg)."""
    warm = max(1, run.num_rounds // 3)
    return {"teacher_model": run.student_model, "teacher_warm_rounds": warm,
            "student_init": "warm", "num_rounds": max(1, run.num_rounds - warm)}


def warm_split(run: RunConfig) -> dict[str, int]:
    """The teachers' steps of ``run`` split in half: warm-start rounds, then local epochs (the
    same teacher compute as training from scratch)."""
    warm = max(1, run.teacher_epochs // 2)
    return {"teacher_warm_rounds": warm, "teacher_epochs": max(1, run.teacher_epochs - warm)}

SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    s for k in range(1, len(CONTRASTS) + 1) for s in combinations(CONTRASTS, k)
)
"""The 15 non-empty subsets of the contrasts: singles, pairs, triples, all four."""

KEPT_METRICS = ("dice", "hd95", "lesion_dice", "lesion_hd95", "volume_ratio")
"""The metrics a part keeps per population and region: those of ``evaluate_case`` and the
predicted over the true volume (under 1: under-segmentation)."""

KEY_OMITS_WHEN_OFF: dict[str, Any] = {"teacher_warm_rounds": 0, "student_init": "new",
                                      "baseline": "", "kd_trust": "none",
                                      "transfer_dtype": "float32", "student_heads": "shared",
                                      "teacher_cache": False}
"""Run settings added after parts were stored, with their "off" value: left out of a part's key
while they are off, so that the parts made before stay valid."""

DISTILLATION_ONLY: tuple[str, ...] = ("logit_weight", "feature_weight", "temperature",
                                      "feature_kind", "kd_mask", "kd_trust", "teacher_cache")
"""Run settings that only a distillation method reads (left out of the other methods' keys)."""

OWN_TEACHERS_OF: dict[str, str] = {"warm_teacher": "warm_student", "warm_ensemble": "warm_student",
                                   "fedkd_teacher": "fedkd", "fedkd_ensemble": "fedkd"}
"""The distillation variant whose teachers each ``*_teacher`` / ``*_ensemble`` method scores."""

CURVE_CASES = 3
"""Test cases per population of the per-round curves (Dice every ``curve_every`` rounds)."""


@dataclass(frozen=True)
class QualitySettings:
    """What one benchmark run trains and tests on (:data:`QUICK` for the tests, :data:`FULL`)."""

    preset: str = "cpu-demo"
    """The preset every method takes its settings from."""
    fraction: float = 1.0
    """Share of the preset's schedule (teacher epochs and distillation rounds, rounded)."""
    shape: int = 96
    """Phantom grid (a cube; 96 = 2 mm voxels, as ``make synth``)."""
    train_largest: int = 16
    """Training-side cases of the largest population; the others follow BraTS 2023's imbalance
    (``fedbrats.simulation.phantoms.case_counts``), at least ``min_train``: ``make synth``."""
    min_train: int = 6
    test_cases: int = 10
    """Held-out test cases per population."""
    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    test_seed: int = 1000
    """Phantom seed of the test cases: other brains and tumours than the training side's."""
    curve_every: int = 10
    """Rounds between two points of the per-round curves (0: no curves)."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not self.seeds:
            raise ValueError("at least one seed")

    def run(self, seed: int, **changes: Any) -> RunConfig:
        """The preset's run settings for ``seed``, its schedule scaled by ``fraction``."""
        from fedbrats.common.config import PRESETS

        base = PRESETS[self.preset]
        return dataclasses.replace(
            base, seed=seed, num_rounds=max(2, round(base.num_rounds * self.fraction)),
            teacher_epochs=max(1, round(base.teacher_epochs * self.fraction)), **changes,
        )

    def train_counts(self) -> dict[str, int]:
        from fedbrats.simulation.phantoms import case_counts

        return {p: max(n, self.min_train) for p, n in case_counts(self.train_largest).items()}

    def method_run(self, seed: int, method: str) -> RunConfig:
        """The run settings ``method`` trains with: the preset's, with the method's changes
        (a distillation variant's, or those of the variant whose teachers it scores)."""
        run = self.run(seed)
        changes = LABELS_ONLY_VARIANTS.get(method) or DISTILLATION_VARIANTS.get(
            method, DISTILLATION_VARIANTS.get(OWN_TEACHERS_OF.get(method, ""), {}))
        if callable(changes):
            changes = changes(run)
        return dataclasses.replace(run, **changes)

    def key(self, seed: int, method: str) -> str:
        """What ``method``'s part depends on, but the seed: the data and the settings the method
        trains with. A labels-only or teacher method leaves out :data:`DISTILLATION_ONLY`, so
        that a change to the preset's distillation does not make its parts stale."""
        run = dataclasses.asdict(self.method_run(seed, method))
        for k in ("seed", "output_dir", "data_root", "device", "eval_every", "keep_site_updates"):
            run.pop(k, None)
        if method not in DISTILLATION_VARIANTS:
            for k in DISTILLATION_ONLY:
                run.pop(k, None)
        if method in ("teacher", "ensemble", *OWN_TEACHERS_OF):
            run.pop("student_heads", None)  # no student is trained
        for k, off in KEY_OMITS_WHEN_OFF.items():  # parts made before they existed stay valid
            if run.get(k) == off:
                run.pop(k, None)
        text = json.dumps({"run": run, "data": self._data()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _data(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("shape", "train_largest", "min_train",
                                              "test_cases", "data_seed", "test_seed")}

    def group(self) -> str:
        """What the parts of one report group share: the preset, the fraction and the data."""
        text = json.dumps({"preset": self.preset, "fraction": self.fraction,
                           "data": self._data()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


QUICK = QualitySettings(preset="tiny", shape=32, train_largest=2, min_train=2, test_cases=1,
                        seeds=(0,), curve_every=1)
"""For the test suite: the tiny preset on 32^3 phantoms, one test case per population."""

FULL = QualitySettings()
"""For docs/bench/quality.md: the cpu-demo preset at its full schedule, 3 seeds."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TestSet:
    """One population's held-out test cases, preprocessed on the benchmark grid."""

    site: SiteConfig
    dataset: Any
    num_cases: int
    spacings: list
    """Each case's voxel spacing (mm), from its label file's header."""


def _write_once(folder: Path, counts: Mapping[str, int], shape: int, seed: int) -> Path:
    """Phantoms in ``folder``, written unless a finished copy with the same counts is there."""
    import fcntl

    from fedbrats.simulation.phantoms import write_dataset

    stamp = folder / "phantoms.json"
    want = {"counts": dict(counts), "shape": shape, "seed": seed}
    folder.parent.mkdir(parents=True, exist_ok=True)
    # runs of other parts may start side by side: one writes, the others wait for it
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and json.loads(stamp.read_text()) == want:
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        write_dataset(folder, counts, shape=(shape,) * 3, seed=seed, progress=False)
        stamp.write_text(json.dumps(want))
    return folder


def prepare_data(settings: QualitySettings, work: Path) -> tuple[Path, Path]:
    """Training-side phantoms (imbalanced) and held-out test phantoms (another seed)."""
    train = _write_once(work / "data" / f"train-{settings.shape}-seed{settings.data_seed}",
                        settings.train_counts(), settings.shape, settings.data_seed)
    test_counts = {p: settings.test_cases for p in POPULATIONS}
    test = _write_once(work / "data" / f"test-{settings.shape}-seed{settings.test_seed}-"
                                       f"{settings.test_cases}",
                       test_counts, settings.shape, settings.test_seed)
    return train, test


def load_test_sets(test_root: Path, run: RunConfig, limit: int | None = None
                   ) -> dict[str, TestSet]:
    """Each population's test cases (the first ``limit`` of them if given)."""
    import nibabel as nib

    from fedbrats.common.config import SiteConfig
    from fedbrats.common.data.cases import discover_cases, voxel_spacing
    from fedbrats.common.data.transforms import build_dataset

    out = {}
    for pop in POPULATIONS:
        cases = [c for c in discover_cases(test_root / pop) if c.seg is not None][:limit]
        site = SiteConfig(population=pop, data_dir=test_root / pop, work_dir=test_root / pop)
        spacings = [voxel_spacing(nib.load(c.seg).affine) for c in cases]
        out[pop] = TestSet(site, build_dataset(cases, (run.spacing,) * 3, None), len(cases),
                           spacings)
    return out


# --------------------------------------------------------------------------------------------
# Training methods (plain functions; the server's aggregation is a weighted mean)
# --------------------------------------------------------------------------------------------


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts (floating tensors; others are taken from the first)."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = sum(float(w) * s[key].double() for s, w in zip(states, weights))
            out[key] = (acc / total).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def weighted_tensor_mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """One entry of :func:`weighted_mean`."""
    return weighted_mean([{"v": v} for v in values], weights)["v"]


def supervised_round(site: SiteConfig, run: RunConfig, state: Mapping[str, torch.Tensor],
                     server_round: int, proximal_mu: float = 0.0) -> dict[str, torch.Tensor]:
    """One site's local round on labels only: ``distill_round`` without the teacher.

    The same batches (seeded per site and round), modality dropout, optimizer and learning rate
    as ``fedbrats.client.distill.distill_round``; loss Dice + CE, plus FedProx's proximal term when
    ``proximal_mu > 0``.
    """
    from fedbrats.client.distill import distill_round

    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    return distill_round(site, labels_only, state, server_round, proximal_mu=proximal_mu)[0]


LocalFn = Callable[["SiteConfig", Mapping[str, "torch.Tensor"], int], Mapping[str, "torch.Tensor"]]
RoundHook = Callable[[int, Mapping[str, "torch.Tensor"]], None]


def federated(sites: Mapping[str, SiteConfig], run: RunConfig, local: LocalFn,
              weights: Mapping[str, float], after_round: RoundHook | None = None,
              init: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, dict[str, dict]]:
    """``run.num_rounds`` rounds: every site trains the global student, the server averages.

    Returns the final global student and the sites' updates of the last round (each the global
    student of the round before, trained ``run.local_steps`` more steps at that site).
    ``after_round(round, global_state)`` is called after each aggregation; ``init``: the
    student to start from (default: the run's new student).
    """
    from fedbrats.common.networks.models import expand_to_heads, new_student, population_mean

    start = new_student(run).net.state_dict()
    if init is not None:  # a warm start of one last block: every head starts as it
        start = expand_to_heads(init, start) if set(init) != set(start) else init
    state = {k: v.detach().clone() for k, v in start.items()}
    updates: dict[str, dict] = {}
    for rnd in range(1, run.num_rounds + 1):
        sent = _travelling(state, run.transfer_dtype)
        # a site answers in the precision it was sent; the server averages in float32
        updates = {p: _travelling(dict(local(site, sent, rnd)), sent) for p, site in sites.items()}
        # each population head over its own population's sites (what the strategy does)
        state = _travelling(population_mean(
            [updates[p] for p in sites], [weights[p] for p in sites],
            [site.population for site in sites.values()], weighted_tensor_mean, state), state)
        if after_round is not None:
            after_round(rnd, state)
        log.info("  round %d/%d done", rnd, run.num_rounds)
    return state, updates


def _travelling(state: Mapping[str, torch.Tensor], like: str | Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """``state`` as the run's ``transfer-dtype`` sends it (``like`` a dtype name), or cast
    like another state dict: what the strategy and the sites do to the arrays."""
    import numpy as np
    import torch

    from fedbrats.common.utils.arrays import cast_like, transfer_copy

    if isinstance(like, str):
        if like == "float32":
            return dict(state)
        arrays = transfer_copy(state, like)
    else:
        arrays = cast_like(state, like)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def warm_start(sites: Mapping[str, SiteConfig], run: RunConfig) -> dict[str, torch.Tensor]:
    """The teachers' federated warm start: ``run.teacher_warm_rounds`` rounds of
    ``warm_round`` at every site, averaged with equal weight (what the server does)."""
    from fedbrats.client.teacher import warm_round
    from fedbrats.common.networks.models import new_warm_teacher

    state = {k: v.detach().clone() for k, v in new_warm_teacher(run).net.state_dict().items()}
    for rnd in range(1, run.teacher_warm_rounds + 1):
        updates = [warm_round(site, run, state, rnd)[0] for site in sites.values()]
        state = weighted_mean(updates, [1.0] * len(updates))
        log.info("  warm-start round %d/%d done", rnd, run.teacher_warm_rounds)
    return state


def centralised(sites: Mapping[str, SiteConfig], run: RunConfig) -> dict[str, torch.Tensor]:
    """One student on the pooled training cases: each step takes a batch of the next population
    in turn (population-balanced), ``num_rounds * local_steps`` steps per population, the same
    learning-rate schedule, loss and modality dropout as the federated students."""
    from fedbrats.client.data import load_site_data, select_device, training_batches
    from fedbrats.client.distill import LocalTrainer
    from fedbrats.common.networks.models import new_student
    from fedbrats.common.utils.seeds import derived_seed

    device = select_device(run)
    streams = {p: training_batches(load_site_data(site, run).train_ds, run.batch_size,
                                   derived_seed(run.seed, p, "centralised"))
               for p, site in sites.items()}
    student = new_student(run).to(device).train()
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    from fedbrats.common.networks.models import set_population

    trainer = LocalTrainer(student, labels_only, device, run.round_lr(1),
                           derived_seed(run.seed, "centralised"))
    for rnd in range(1, run.num_rounds + 1):
        trainer.set_lr(run.round_lr(rnd))
        for _ in range(run.local_steps):
            for pop in sites:
                set_population(student, sites[pop].population)
                trainer.step(next(streams[pop]))
    return {k: v.detach().cpu() for k, v in student.net.state_dict().items()}


def _ensemble(teachers: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """The teachers as one model: log of their mean softmax (argmax = the averaged probabilities'
    argmax), in the ``(logits, features)`` form ``predict_volume`` expects."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(teachers)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
            probs = torch.stack([torch.softmax(m(x)[0], dim=1) for m in self.members]).mean(0)
            return torch.log(probs.clamp_min(1e-8)), {}

    return Ensemble().eval()


def _student(run: RunConfig, state: Mapping[str, torch.Tensor], device) -> torch.nn.Module:
    from fedbrats.common.networks.models import new_student

    model = new_student(run)
    model.net.load_state_dict(state)
    return model.to(device).eval()


def _with_teacher(sites: Mapping[str, SiteConfig], folder: Path) -> dict[str, SiteConfig]:
    """The sites with their own work folder (the projector of a variant stays in it) holding a
    copy of the site's finished teacher."""
    from fedbrats.client.teacher import TEACHER_FILE

    out = {}
    if folder.exists():
        shutil.rmtree(folder)  # a projector left by an interrupted run would not start afresh
    for pop, site in sites.items():
        work = folder / pop
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site.work_dir / TEACHER_FILE, work / TEACHER_FILE)
        out[pop] = dataclasses.replace(site, work_dir=work)
    return out


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _scores(scores: Mapping) -> dict:
    """The kept metrics of ``evaluate_model``'s mean scores."""
    return {r: {m: float(v) for m, v in s.items() if m in KEPT_METRICS}
            for r, s in scores.items()}


def score_case(pred, gt, spacing, population: str) -> dict:
    """``evaluate_case`` plus each region's predicted / true volume (nan when there is none)."""
    import numpy as np

    from fedbrats.common.data.contract import REGIONS, region_masks
    from fedbrats.common.metrics.brats import evaluate_case

    out = evaluate_case(pred, gt, spacing, population)
    for r in REGIONS:
        true = np.count_nonzero(region_masks(gt, r))
        out[r]["volume_ratio"] = (np.count_nonzero(region_masks(pred, r)) / true if true
                                  else float("nan"))
    return out


def dice_only(model, test: TestSet, run: RunConfig, device, drop: Sequence[str] = ()) -> dict:
    """Mean WT/TC/ET Dice over the test cases with the contrasts ``drop`` zero-filled
    (``evaluate_model`` with Dice only: no distances, faster)."""
    from fedbrats.client.scoring import evaluate_model
    from fedbrats.common.inference.explain import dice_per_region

    def dice(pred, gt) -> dict:
        return {r: {"dice": d} for r, d in dice_per_region(pred, gt).items()}

    return evaluate_model(model, test.dataset, test.site, run, device, drop, score=dice)


# --------------------------------------------------------------------------------------------
# One seed, method by method
# --------------------------------------------------------------------------------------------


@dataclass
class SeedRun:
    """What the methods of one (fraction, seed) share: settings, sites, test sets, teachers."""

    settings: QualitySettings
    seed: int
    train_root: Path
    tests: Mapping[str, TestSet]
    curve_tests: Mapping[str, TestSet]
    work: Path
    _teachers: dict | None = None

    @property
    def run(self) -> RunConfig:
        return self.settings.run(self.seed)

    @property
    def folder(self) -> Path:
        return self.work / f"f{self.settings.fraction:g}" / f"seed-{self.seed}"

    @property
    def device(self):
        from fedbrats.client.data import select_device

        return select_device(self.run)

    @property
    def sites(self) -> dict[str, SiteConfig]:
        from fedbrats.common.config import SiteConfig

        return {p: SiteConfig(population=p, data_dir=self.train_root / p,
                              work_dir=self.folder / "teachers" / p) for p in POPULATIONS}

    def evaluate(self, model, pop: str) -> dict:
        from fedbrats.client.scoring import evaluate_model

        test = self.tests[pop]
        spacings = iter(test.spacings)  # evaluate_model scores the cases in order

        def score(pred, gt) -> dict:
            return score_case(pred, gt, next(spacings), pop)

        return _scores(evaluate_model(model, test.dataset, test.site, self.run, self.device,
                                      score=score))

    def evaluate_all(self, model) -> dict:
        return {p: self.evaluate(model, p) for p in POPULATIONS}

    def teachers(self) -> dict:
        """Every site's teacher as phase 1 trains it (kept in the work folder, reused)."""
        if self._teachers is None:
            import torch

            from fedbrats.client.teacher import load_teacher, train_teacher

            torch.manual_seed(self.seed)
            run, sites = self.run, self.sites
            for site in sites.values():
                train_teacher(site, run)
            self._teachers = {p: load_teacher(s, run, self.device) for p, s in sites.items()}
        return self._teachers

    def teacher_folder(self, run: RunConfig) -> Path:
        """Where the teachers trained with ``run``'s teacher settings are kept."""
        tag = hashlib.sha256(json.dumps(run.teacher_fingerprint(), sort_keys=True)
                             .encode()).hexdigest()[:8]
        return self.folder / f"teachers-{tag}"

    def teachers_for(self, run: RunConfig) -> dict[str, SiteConfig]:
        """Sites whose work folders hold finished teachers trained with ``run``'s teacher
        settings: phase 1's own when they are the preset's, else trained here (with the
        federated warm start when ``run.teacher_warm_rounds`` > 0), kept and reused."""
        if run.teacher_fingerprint() == self.run.teacher_fingerprint():
            self.teachers()
            return self.sites
        import torch

        from fedbrats.client.data import SiteError
        from fedbrats.client.teacher import load_teacher, train_teacher

        folder = self.teacher_folder(run)
        sites = {p: dataclasses.replace(s, work_dir=folder / p) for p, s in self.sites.items()}
        try:
            for site in sites.values():
                load_teacher(site, run, self.device)
            return sites
        except SiteError:
            pass
        init = None
        if run.teacher_warm_rounds:
            init = warm_start(sites, run)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(init, folder / "warm-start.pt")
        for site in sites.values():
            train_teacher(site, run, init_state=init)
        return sites

    def warm_state(self, run: RunConfig) -> dict | None:
        """The warm-start network :meth:`teachers_for` trained for ``run`` (None without)."""
        import torch

        self.teachers_for(run)
        path = self.teacher_folder(run) / "warm-start.pt"
        return torch.load(path, weights_only=True) if path.exists() else None

    def curve_hook(self, run: RunConfig, curve: dict) -> RoundHook | None:
        """Records the global model's Dice on the curve cases every ``curve_every`` rounds."""
        every = self.settings.curve_every
        if not every:
            return None

        def hook(rnd: int, state) -> None:
            if rnd % every and rnd != run.num_rounds:
                return
            model = _student(run, state, self.device)
            curve[str(rnd)] = {p: dice_only(model, t, run, self.device)
                               for p, t in self.curve_tests.items()}
        return hook


Part = dict[str, Any]


def _teacher_parts(ctx: SeedRun) -> dict[str, Part]:
    t0 = time.perf_counter()
    teachers = ctx.teachers()
    train_s = time.perf_counter() - t0
    scores, cross = {}, {}
    for tp, teacher in teachers.items():
        scores[tp] = ctx.evaluate(teacher, tp)
        cross[tp] = {ep: dice_only(teacher, ctx.tests[ep], ctx.run, ctx.device) if ep != tp
                     else scores[tp] for ep in POPULATIONS}
    run = ctx.run
    return {"teacher": {"scores": scores, "cross": cross, "train_seconds": train_s,
                        "schedule": f"{run.teacher_epochs} epochs x "
                                    f"{run.teacher_steps_per_epoch} steps ({run.teacher_model})"}}


def _ensemble_parts(ctx: SeedRun) -> dict[str, Part]:
    model = _ensemble(list(ctx.teachers().values())).to(ctx.device)
    return {"ensemble": {"scores": ctx.evaluate_all(model), "schedule": "the 5 teachers"}}


def _fedavg_parts(ctx: SeedRun) -> dict[str, Part]:
    run, curve = ctx.settings.method_run(ctx.seed, "fedavg"), {}
    state, last = federated(ctx.sites, run, lambda s, st, r: supervised_round(s, run, st, r),
                            {p: 1.0 for p in POPULATIONS}, ctx.curve_hook(run, curve))
    schedule = f"{run.num_rounds} rounds x {run.local_steps} steps ({run.student_model})"
    return {
        "fedavg": {"scores": ctx.evaluate_all(_student(run, state, ctx.device)),
                   "curve": curve, "schedule": schedule},
        # the last round's local updates are the fine-tuned models: FedAvg for rounds 1..R-1,
        # then local_steps more steps at each site, not averaged
        "fedavg_ft": {"scores": {p: ctx.evaluate(_student(run, last[p], ctx.device), p)
                                 for p in POPULATIONS},
                      "schedule": f"{run.num_rounds - 1} FedAvg rounds, then "
                                  f"{run.local_steps} local steps"},
    }


def compute_matched_rounds(run: RunConfig) -> int:
    """FedAvg's rounds when it also gets the teachers' optimizer steps (rounded up)."""
    teacher_steps = run.teacher_epochs * run.teacher_steps_per_epoch
    return run.num_rounds + -(-teacher_steps // run.local_steps)


def _labels_only_part(ctx: SeedRun, run: RunConfig, proximal_mu: float = 0.0) -> Part:
    curve: dict = {}
    state, _ = federated(ctx.sites, run,
                         lambda s, st, r: supervised_round(s, run, st, r, proximal_mu),
                         {p: 1.0 for p in POPULATIONS}, ctx.curve_hook(run, curve))
    return {"scores": ctx.evaluate_all(_student(run, state, ctx.device)), "curve": curve,
            "schedule": f"{run.num_rounds} rounds x {run.local_steps} steps"}


def _fedavg_cm_parts(ctx: SeedRun) -> dict[str, Part]:
    run = ctx.settings.method_run(ctx.seed, "fedavg_cm")
    return {"fedavg_cm": _labels_only_part(
        ctx, dataclasses.replace(run, num_rounds=compute_matched_rounds(run)))}


def _fedprox_parts(ctx: SeedRun) -> dict[str, Part]:
    run = ctx.settings.method_run(ctx.seed, "fedprox")
    return {"fedprox": _labels_only_part(ctx, run, run.proximal_mu)}


def _fedavg_nodrop_parts(ctx: SeedRun) -> dict[str, Part]:
    return {"fedavg_nodrop": _labels_only_part(ctx, dataclasses.replace(
        ctx.settings.method_run(ctx.seed, "fedavg_nodrop"), modality_dropout=False))}


def _fedavg_heads_parts(ctx: SeedRun) -> dict[str, Part]:
    return {"fedavg_heads": _labels_only_part(ctx, ctx.settings.method_run(ctx.seed,
                                                                           "fedavg_heads"))}


def _centralised_part(ctx: SeedRun, run: RunConfig) -> Part:
    model = _student(run, centralised(ctx.sites, run), ctx.device)
    return {"scores": ctx.evaluate_all(model),
            "schedule": f"{run.num_rounds * run.local_steps} steps x 5 populations in turn"}


def _centralised_parts(ctx: SeedRun) -> dict[str, Part]:
    return {"centralised": _centralised_part(ctx, ctx.settings.method_run(ctx.seed,
                                                                          "centralised"))}


def _centralised_nodrop_parts(ctx: SeedRun) -> dict[str, Part]:
    return {"centralised_nodrop": _centralised_part(ctx, dataclasses.replace(
        ctx.settings.method_run(ctx.seed, "centralised_nodrop"), modality_dropout=False))}


def distillation_part(ctx: SeedRun, method: str, changes: Mapping[str, Any]) -> Part:
    """The fedbrats student with ``changes`` to the preset's settings: phase 2 in process."""
    from fedbrats.client.data import load_site_data
    from fedbrats.client.distill import distill_round

    if callable(changes):
        changes = changes(ctx.run)
    run = ctx.settings.method_run(ctx.seed, method)
    sites = _with_teacher(ctx.teachers_for(run), ctx.folder / method)
    if run.aggregation == "cases":
        weights = {p: float(len(load_site_data(s, run).train_cases)) for p, s in sites.items()}
    else:
        weights = {p: 1.0 for p in POPULATIONS}
    curve: dict = {}
    init = ctx.warm_state(run) if run.student_init == "warm" else None
    state, _ = federated(sites, run, lambda s, st, r: distill_round(s, run, st, r)[0], weights,
                         ctx.curve_hook(run, curve), init=init)
    model = _student(run, state, ctx.device)
    part = {"scores": ctx.evaluate_all(model), "curve": curve, "changes": dict(changes),
            "schedule": f"{run.num_rounds} rounds x {run.local_steps} steps, with the "
                        "teachers' forward pass"}
    if method == "student":
        part["subsets"] = {}
        for subset in SUBSETS:
            drop = tuple(c for c in CONTRASTS if c not in subset)
            part["subsets"]["+".join(subset)] = (
                {p: {r: {"dice": v["dice"]} for r, v in part["scores"][p].items()}
                 for p in POPULATIONS} if not drop else
                {p: dice_only(model, ctx.tests[p], run, ctx.device, drop) for p in POPULATIONS})
    shutil.rmtree(ctx.folder / method, ignore_errors=True)
    return part


def _own_teacher_parts(ctx: SeedRun, variant: str) -> dict[str, Part]:
    """The teachers of distillation ``variant`` (which trains its own) and their ensemble,
    scored as phase 1's are: parts ``<prefix>_teacher`` and ``<prefix>_ensemble``."""
    from fedbrats.client.teacher import load_teacher

    prefix = variant.removesuffix("_student")
    run = ctx.settings.method_run(ctx.seed, variant)
    t0 = time.perf_counter()
    sites = ctx.teachers_for(run)
    train_s = time.perf_counter() - t0
    teachers = {p: load_teacher(s, run, ctx.device) for p, s in sites.items()}
    ensemble = _ensemble(list(teachers.values())).to(ctx.device)
    steps = run.teacher_steps_per_epoch
    schedule = (f"{run.teacher_warm_rounds} warm-start rounds x {run.local_steps} steps, then "
                f"{run.teacher_epochs} epochs x {steps} steps ({run.teacher_model})")
    return {f"{prefix}_teacher": {"scores": {p: ctx.evaluate(t, p) for p, t in teachers.items()},
                                  "train_seconds": train_s, "schedule": schedule},
            f"{prefix}_ensemble": {"scores": ctx.evaluate_all(ensemble), "schedule": schedule}}


PRODUCERS: dict[str, Callable[[SeedRun], dict[str, Part]]] = {
    "warm_teacher": lambda ctx: _own_teacher_parts(ctx, "warm_student"),
    "warm_ensemble": lambda ctx: _own_teacher_parts(ctx, "warm_student"),
    "fedkd_teacher": lambda ctx: _own_teacher_parts(ctx, "fedkd"),
    "fedkd_ensemble": lambda ctx: _own_teacher_parts(ctx, "fedkd"),
    "teacher": _teacher_parts,
    "ensemble": _ensemble_parts,
    "fedavg": _fedavg_parts,
    "fedavg_ft": _fedavg_parts,
    "fedavg_cm": _fedavg_cm_parts,
    "fedprox": _fedprox_parts,
    "fedavg_nodrop": _fedavg_nodrop_parts,
    "fedavg_heads": _fedavg_heads_parts,
    "centralised": _centralised_parts,
    "centralised_nodrop": _centralised_nodrop_parts,
}
"""The function that makes each labels-only or teacher method's part (fedavg also makes
fedavg_ft); the distillation methods go through :func:`distillation_part`."""


# --------------------------------------------------------------------------------------------
# Parts on disk
# --------------------------------------------------------------------------------------------


class PartStore:
    """One JSON file per (fraction, seed, method) under ``root``: what a run has finished."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, fraction: float, seed: int, method: str) -> Path:
        return self.root / f"f{fraction:g}" / f"seed-{seed}" / f"{method}.json"

    def get(self, settings: QualitySettings, seed: int, method: str) -> Part | None:
        """The stored part, or None if absent or made with other settings."""
        path = self.path(settings.fraction, seed, method)
        if not path.exists():
            return None
        part = json.loads(path.read_text())
        if part.get("key") != settings.key(seed, method):
            log.warning("%s was made with other settings; it is run again", path)
            return None
        return part

    def put(self, settings: QualitySettings, seed: int, method: str, part: Part) -> None:
        path = self.path(settings.fraction, seed, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        full = {"method": method, "seed": seed, "fraction": settings.fraction,
                "preset": settings.preset, "group": settings.group(),
                "key": settings.key(seed, method), **part}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(full, indent=1, default=float))
        tmp.replace(path)

    def all(self) -> list[Part]:
        """Every stored part, whatever its settings (the report groups them)."""
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("f*/seed-*/*.json"))]

    def current(self, settings: QualitySettings) -> list[Part]:
        """Every stored part but those of ``settings``' preset and data that its methods'
        settings no longer give (stale: left out of the report, and made again when run)."""
        out = []
        for part in self.all():
            at = dataclasses.replace(settings, fraction=part["fraction"])
            if part.get("group") == at.group() and (
                    part["method"] not in METHODS
                    or part["key"] != at.key(int(part["seed"]), part["method"])):
                log.warning("%s: made with other settings than method %s has now; left out "
                            "of the report", self.path(part["fraction"], part["seed"],
                                                        part["method"]), part["method"])
                continue
            out.append(part)
        return out


def run_methods(settings: QualitySettings, methods: Sequence[str], store: PartStore,
                work: Path) -> None:
    """Make every missing part of ``methods`` x ``settings.seeds``."""
    from fedbrats.client.data import clear_site_data_cache

    work.mkdir(parents=True, exist_ok=True)
    train_root, test_root = prepare_data(settings, work)
    run0 = settings.run(settings.seeds[0])
    tests = load_test_sets(test_root, run0)
    curve_tests = load_test_sets(test_root, run0, limit=CURVE_CASES)
    for seed in settings.seeds:
        ctx = SeedRun(settings, seed, train_root, tests, curve_tests, work)
        for method in methods:
            if store.get(settings, seed, method) is not None:
                log.info("f%g seed %d: %s already done", settings.fraction, seed, method)
                continue
            log.info("f%g seed %d: %s", settings.fraction, seed, METHODS[method])
            t0 = time.perf_counter()
            if method in DISTILLATION_VARIANTS:
                parts = {method: distillation_part(ctx, method, DISTILLATION_VARIANTS[method])}
            else:
                parts = PRODUCERS[method](ctx)
            seconds = time.perf_counter() - t0
            for name, part in parts.items():
                if name == method or store.get(settings, seed, name) is None:
                    store.put(settings, seed, name, {**part, "seconds": seconds})
            log.info("f%g seed %d: %s done in %.0f s", settings.fraction, seed, method, seconds)
        clear_site_data_cache()  # the next seed splits the cases differently


def run_quality(settings: QualitySettings, methods: Sequence[str], out_dir: Path, work: Path,
                command: str, prefix: str = "quality", threads: int = 1,
                report_only: bool = False) -> dict[str, Path]:
    """Make the missing parts (``threads`` torch threads), then write the report of all parts."""
    from fedbrats.simulation.bench.quality_report import write_report

    store = PartStore(out_dir / f"{prefix}-parts")
    start = time.perf_counter()
    machine = machine_info()
    if not report_only:
        with torch_threads(threads):
            run_methods(settings, methods, store, work)
    machine = {**machine, "load_average_end": machine_info()["load_average"]}
    return write_report(store.current(settings), out_dir, command,
                        time.perf_counter() - start, machine, prefix, settings)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _method_list(text: str) -> list[str]:
    if text.strip() == "all":
        return list(METHODS)
    if text.strip() == "deciding":
        return list(DECIDING)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"methods: unknown {', '.join(unknown) or '(none given)'}; expected 'all', "
            f"'deciding' or a comma-separated list of {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fraction: expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"fraction: expected 0 < F <= 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.fraction is not None:
        changes["fraction"] = args.fraction
    if args.preset:
        changes["preset"] = args.preset
    settings = dataclasses.replace(settings, **changes)
    methods = args.methods or list(METHODS)
    if not args.verbose_sites:
        logging.getLogger("fedbrats.client").setLevel(logging.WARNING)
    out, work = resolve_dirs(args, "quality")
    command = command_line("quality", args, {
        "preset": args.preset, "fraction": args.fraction,
        "seeds": ",".join(map(str, args.seeds or ())),
        "methods": ",".join(args.methods) if args.methods else None,
        "report-only": args.report_only})
    paths = run_quality(settings, methods, out, work, command, threads=args.threads,
                        report_only=args.report_only)
    data = json.loads(paths["json"].read_text())
    for group in data["groups"]:
        print(f"{group['title']}:")
        for method, h in group["headline"].items():
            print(f"  {METHODS[method]:34s} mean Dice WT {h['WT']['mean']:.3f} "
                  f"TC {h['TC']['mean']:.3f} ET {h['ET']['mean']:.3f}; worst WT "
                  f"{h['WT']['worst']:.3f} ({h['seeds']} seeds)")
    for p in paths.values():
        print(f"  wrote {p}")
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds: expected integers like 0,1,2, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("seeds: at least one")
    return seeds


def register_quality(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quality",
        help="every method on phantom populations, scored on held-out test cases",
        description=(
            "Train the local teachers (phase 1), their ensemble, FedAvg and FedProx on labels "
            "(also compute-matched), FedAvg with local fine-tuning, a centralised model, the "
            "fedbrats student (phase 2) and its ablations on the five phantom populations of "
            "`make demo`, every one with the settings of --preset, for several seeds, and score "
            "each on 10 held-out phantom test cases per population (Dice, HD95, sensitivity, "
            "precision, MET lesion-wise; the student also for every subset of contrasts). "
            "Each (fraction, seed, method) is kept as a part under OUT/quality-parts and "
            "skipped when found again, so a long run resumes; OUT/quality.md, quality.json and "
            "the charts merge every part there. At the full schedule the four deciding methods "
            "took 54 min for one seed on one core of a shared 2-core machine; --quick takes a "
            "minute."
        ),
    )
    add_common_arguments(p, "quality")
    p.add_argument("--preset", default=None,
                   help="preset whose settings every method uses (default: cpu-demo; "
                   "with --quick tiny)")
    p.add_argument("--fraction", type=_fraction, default=None, metavar="F",
                   help="share of the preset's schedule: teacher epochs and distillation "
                   "rounds scaled alike (default 1)")
    p.add_argument("--methods", type=_method_list, default=None, metavar="M,M,...",
                   help="methods to run: 'all' (default), 'deciding' "
                   f"({', '.join(DECIDING)}) or a list of: {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                   help="seeds to run (default: 0,1,2; with --quick 0)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report of the parts already there")
    p.add_argument("--verbose-sites", action="store_true",
                   help="show the sites' own progress messages (teacher epochs)")
    p.set_defaults(func=_run)
    return p


def register_bench(subparsers) -> argparse.ArgumentParser:
    """``fedbrats bench quality`` and ``fedbrats bench perf``."""
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: segmentation quality against baselines, and performance",
        description=(
            "Benchmarks whose results are committed in docs/bench: `fedbrats bench quality` "
            "(every method on phantom populations, held-out test cases) and `fedbrats bench "
            "perf` (cost ratios: distillation, simulation, bytes, inference, memory, "
            "throughput, and a profile). --quick runs tiny versions quickly."
        ),
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    register_quality(sub)
    register_perf(sub)
    return p


__all__ = [
    "DECIDING",
    "FULL",
    "METHODS",
    "QUICK",
    "SUBSETS",
    "PartStore",
    "QualitySettings",
    "compute_matched_rounds",
    "register_bench",
    "run_quality",
    "supervised_round",
    "weighted_mean",
    "weighted_tensor_mean",
]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: fedbrats bench quality")
