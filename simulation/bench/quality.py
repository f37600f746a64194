"""``fedbrats bench quality``: fedbrats against federated and centralised baselines, on phantoms.

Every method is trained on the same five phantom populations (BraTS-like imbalance: GLI and MEN
large, SSA, PED and MET small) and scored on held-out *test* cases: phantoms generated with another
seed, which no training step and no validation step sees. Each method runs for several seeds
(network initialisation, batches, augmentation and the train/validation split); tables give the
mean +/- standard deviation over seeds of the mean over each population's test cases.

Methods (:data:`METHODS`):

==================  ===========================================================================
``teacher``         each site's teacher (``train_teacher``) on its own population; the 5x5 table
                    has every teacher on every population
``ensemble``        the five teachers' softmax probabilities averaged
``fedavg``          one student trained on labels only (Dice + CE), equal-weight FedAvg
``fedavg_nodrop``   the same without modality dropout (plain FedAvg)
``fedprox``         the same with FedProx's proximal term ``mu/2 ||w - w_global||^2``
``fedavg_ft``       FedAvg for all rounds but the last, then each site fine-tunes it locally for
                    one round of local steps instead of averaging: one model per site
``centralised``     one student on the pooled training cases, population-balanced batches
                    (one population after another), as many steps as all sites together
``centralised_nodrop``  the same without modality dropout (the usual upper bound)
``student``         the fedbrats distillation student (``distill_round``), equal weights
``no_feature_kd``   the same with ``feature-weight`` 0
``no_logit_kd``     the same with ``logit-weight`` 0
``case_weighted``   the same, sites weighted by their number of training cases
==================  ===========================================================================

Federated methods run in this process with plain functions, not through Flower: each round calls
every site's local training one after another and the server's aggregation is the weighted mean of
the returned state dicts (what FedAvg and FedProx compute; the Flower path is tested in
``tests/simulation/test_simulation_e2e.py``). The site functions of ``client/`` (``train_teacher``,
``load_teacher``, ``distill_round``, ``evaluate_model``, ``predict_volume``) are the ones a real
site runs. The labels-only baselines use :func:`supervised_round`: ``distill_round``'s loop, same
batch sampling, same modality dropout (except the ``_nodrop`` rows) and learning-rate schedule,
without the teacher.

Budget: every trained network (teachers included) gets the same number of optimizer steps x
batch per site; the centralised model gets the sum over the sites.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS, REGIONS
from fedbrats.common.utils.plotting import pyplot
from fedbrats.simulation.bench.perf import (
    add_common_arguments,
    command_line,
    fmt_mean_sd,
    machine_info,
    machine_markdown,
    md_table,
    mean_sd,
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
    "fedavg_nodrop": "FedAvg, no modality dropout",
    "fedprox": "FedProx, labels only",
    "fedavg_ft": "FedAvg + local fine-tuning",
    "centralised": "centralised, pooled",
    "centralised_nodrop": "centralised, no modality dropout",
    "student": "fedbrats student",
    "no_feature_kd": "student, no feature KD",
    "no_logit_kd": "student, no logit KD",
    "case_weighted": "student, case-weighted mean",
}
"""Method keys, in table order, with the label the tables use."""

DISTILLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "student": {},
    "no_feature_kd": {"feature_weight": 0.0},
    "no_logit_kd": {"logit_weight": 0.0},
    "case_weighted": {"aggregation": "cases"},
}
"""Run-setting changes of each distillation method against the benchmark's run settings."""

SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    s for k in range(1, len(CONTRASTS) + 1) for s in combinations(CONTRASTS, k)
)
"""The 15 non-empty subsets of the contrasts: singles, pairs, triples, all four."""

DICE_METRICS = ("dice",)
TABLE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("dice", "Dice", True),
    ("hd95", "HD95 (mm)", False),
)
"""(metric key, title, higher is better) of the population x method tables."""


@dataclass(frozen=True)
class QualitySettings:
    """Sizes of one benchmark run (:data:`QUICK` for the tests, :data:`FULL` for the docs)."""

    teacher_model: str
    student_model: str
    spacing: float
    """Training and evaluation grid (mm)."""
    patch_size: int
    batch_size: int
    num_rounds: int
    local_steps: int
    """Optimizer steps per site and round; every trained network gets ``num_rounds *
    local_steps`` steps per site (teachers as ``teacher_epochs`` x the rest)."""
    teacher_epochs: int
    shape: int
    """Phantom grid (a cube; 96 = 2 mm voxels, 48 = 4 mm)."""
    train_largest: int
    """Training-side cases of the largest population; the others follow BraTS 2023's imbalance
    (``fedbrats.simulation.phantoms.case_counts``), at least ``min_train``."""
    min_train: int
    test_cases: int
    """Held-out test cases per population."""
    seeds: tuple[int, ...]
    val_fraction: float = 0.2
    data_seed: int = 0
    test_seed: int = 1000
    """Phantom seed of the test cases: other brains and tumours than the training side's."""

    def __post_init__(self) -> None:
        if self.num_rounds < 2:
            raise ValueError("num_rounds must be >= 2 (FedAvg + fine-tuning needs a last round)")
        if self.num_rounds * self.local_steps % self.teacher_epochs:
            raise ValueError("teacher_epochs must divide num_rounds * local_steps")
        if not self.seeds:
            raise ValueError("at least one seed")

    @property
    def steps_per_site(self) -> int:
        return self.num_rounds * self.local_steps

    def run(self, seed: int, **changes: Any) -> RunConfig:
        """The run settings of ``seed`` (the cpu-demo preset's losses, dropout and schedule)."""
        from fedbrats.common.config import PRESETS

        return dataclasses.replace(
            PRESETS["cpu-demo"], preset="bench", teacher_model=self.teacher_model,
            student_model=self.student_model, spacing=self.spacing, patch_size=self.patch_size,
            batch_size=self.batch_size, val_fraction=self.val_fraction,
            teacher_epochs=self.teacher_epochs,
            teacher_steps_per_epoch=self.steps_per_site // self.teacher_epochs,
            num_rounds=self.num_rounds, local_steps=self.local_steps, seed=seed, **changes,
        )

    def train_counts(self) -> dict[str, int]:
        from fedbrats.simulation.phantoms import case_counts

        return {p: max(n, self.min_train) for p, n in case_counts(self.train_largest).items()}


QUICK = QualitySettings(
    teacher_model="teacher-tiny", student_model="student-tiny", spacing=4.0, patch_size=16,
    batch_size=1, num_rounds=2, local_steps=1, teacher_epochs=1, shape=32, train_largest=2,
    min_train=2, test_cases=1, seeds=(0,),
)
"""For the test suite: tiny networks on 32^3 phantoms, one test case per population, one seed."""

FULL = QualitySettings(
    teacher_model="teacher-cpu", student_model="student-cpu", spacing=3.0, patch_size=32,
    batch_size=2, num_rounds=10, local_steps=10, teacher_epochs=10, shape=96, train_largest=10,
    min_train=3, test_cases=4, seeds=(0, 1, 2),
)
"""For docs/bench/quality.md: the cpu-demo networks, sized for ~20-25 min on two CPU cores."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TestSet:
    """One population's held-out test cases, preprocessed on the benchmark grid."""

    site: SiteConfig
    dataset: Any
    num_cases: int


def _write_once(folder: Path, counts: Mapping[str, int], shape: int, seed: int) -> Path:
    """Phantoms in ``folder``, written unless a finished copy with the same counts is there."""
    from fedbrats.simulation.phantoms import write_dataset

    stamp = folder / "phantoms.json"
    want = {"counts": dict(counts), "shape": shape, "seed": seed}
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
    test = _write_once(work / "data" / f"test-{settings.shape}-seed{settings.test_seed}",
                       test_counts, settings.shape, settings.test_seed)
    return train, test


def load_test_sets(test_root: Path, run: RunConfig) -> dict[str, TestSet]:
    from fedbrats.common.config import SiteConfig
    from fedbrats.common.data.cases import discover_cases
    from fedbrats.common.data.transforms import build_dataset

    out = {}
    for pop in POPULATIONS:
        cases = [c for c in discover_cases(test_root / pop) if c.seg is not None]
        site = SiteConfig(population=pop, data_dir=test_root / pop, work_dir=test_root / pop)
        out[pop] = TestSet(site, build_dataset(cases, (run.spacing,) * 3, None), len(cases))
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


def supervised_round(site: SiteConfig, run: RunConfig, state: Mapping[str, torch.Tensor],
                     server_round: int, proximal_mu: float = 0.0) -> dict[str, torch.Tensor]:
    """One site's local round on labels only: ``distill_round`` without the teacher.

    The same batches (seeded per site and round), modality dropout, optimizer and learning rate
    as ``fedbrats.client.distill.distill_round``; loss Dice + CE, plus FedProx's proximal term when
    ``proximal_mu > 0``.
    """
    import dataclasses

    from fedbrats.client.distill import distill_round

    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    return distill_round(site, labels_only, state, server_round, proximal_mu=proximal_mu)[0]


LocalFn = Callable[["SiteConfig", Mapping[str, "torch.Tensor"], int], Mapping[str, "torch.Tensor"]]


def federated(sites: Mapping[str, SiteConfig], run: RunConfig, local: LocalFn,
              weights: Mapping[str, float]) -> tuple[dict, dict[str, dict]]:
    """``run.num_rounds`` rounds: every site trains the global student, the server averages.

    Returns the final global student and the sites' updates of the last round (each the global
    student of the round before, trained ``run.local_steps`` more steps at that site).
    """
    from fedbrats.common.networks.models import new_student

    state = {k: v.detach().clone() for k, v in new_student(run).net.state_dict().items()}
    updates: dict[str, dict] = {}
    for rnd in range(1, run.num_rounds + 1):
        updates = {p: dict(local(site, state, rnd)) for p, site in sites.items()}
        state = weighted_mean([updates[p] for p in sites], [weights[p] for p in sites])
        log.info("  round %d/%d done", rnd, run.num_rounds)
    return state, updates


def centralised(sites: Mapping[str, SiteConfig], run: RunConfig) -> dict[str, torch.Tensor]:
    """One student on the pooled training cases: each step takes a batch of the next population
    in turn (population-balanced), ``num_rounds * local_steps`` steps per population, the same
    learning-rate schedule, loss and modality dropout as the federated students."""
    import dataclasses

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
    trainer = LocalTrainer(student, labels_only, device, run.round_lr(1),
                           derived_seed(run.seed, "centralised"))
    for rnd in range(1, run.num_rounds + 1):
        trainer.set_lr(run.round_lr(rnd))
        for _ in range(run.local_steps):
            for pop in sites:
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
    for pop, site in sites.items():
        work = folder / pop
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site.work_dir / TEACHER_FILE, work / TEACHER_FILE)
        out[pop] = dataclasses.replace(site, work_dir=work)
    return out


# --------------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------------


def _scores(scores: Mapping) -> dict:
    """Keep the tabled metrics of ``evaluate_model``'s mean scores."""
    keep = ("dice", "hd95", "lesion_dice", "lesion_hd95")
    return {r: {m: float(v) for m, v in s.items() if m in keep} for r, s in scores.items()}


def run_seed(settings: QualitySettings, seed: int, train_root: Path, tests: Mapping[str, TestSet],
             work: Path) -> dict:
    """Every method for one seed; returns the scores, the 5x5 table, the subsets and timings."""
    import torch

    from fedbrats.client.data import load_site_data, select_device
    from fedbrats.client.distill import distill_round
    from fedbrats.client.scoring import evaluate_model
    from fedbrats.client.teacher import load_teacher, train_teacher
    from fedbrats.common.config import SiteConfig

    run = settings.run(seed)
    device = select_device(run)
    folder = work / f"seed-{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    sites = {p: SiteConfig(population=p, data_dir=train_root / p, work_dir=folder / "teachers" / p)
             for p in POPULATIONS}
    out: dict[str, Any] = {"seed": seed, "scores": {m: {} for m in METHODS}, "cross": {},
                           "subsets": {}, "seconds": {}}
    out["train_cases"] = {p: len(load_site_data(s, run).train_cases) for p, s in sites.items()}

    def evaluate(model, pop: str, drop: tuple[str, ...] = ()) -> dict:
        test = tests[pop]
        return _scores(evaluate_model(model, test.dataset, test.site, run, device, drop))

    @contextmanager
    def timed(key: str) -> Iterator[None]:
        log.info("seed %d: %s", seed, METHODS.get(key, key))
        t0 = time.perf_counter()
        yield
        out["seconds"][key] = out["seconds"].get(key, 0.0) + time.perf_counter() - t0

    torch.manual_seed(seed)
    with timed("teacher"):
        for site in sites.values():
            train_teacher(site, run)
    teachers = {p: load_teacher(site, run, device) for p, site in sites.items()}
    with timed("evaluation"):
        for tp, teacher in teachers.items():
            # Dice only off the diagonal (the 5x5 table shows Dice); full scores on it
            out["scores"]["teacher"][tp] = evaluate(teacher, tp)
            out["cross"][tp] = {ep: dice_only(teacher, tests[ep], run, device) if ep != tp
                                else out["scores"]["teacher"][tp] for ep in POPULATIONS}
        ensemble = _ensemble(list(teachers.values())).to(device)
        out["scores"]["ensemble"] = {p: evaluate(ensemble, p) for p in POPULATIONS}
    del ensemble

    equal = {p: 1.0 for p in sites}
    with timed("fedavg"):
        fedavg, last_updates = federated(
            sites, run, lambda s, st, r: supervised_round(s, run, st, r), equal)
    with timed("fedprox"):
        fedprox, _ = federated(
            sites, run, lambda s, st, r: supervised_round(s, run, st, r, run.proximal_mu), equal)
    plain = dataclasses.replace(run, modality_dropout=False)
    with timed("fedavg_nodrop"):
        fedavg_nodrop, _ = federated(
            sites, plain, lambda s, st, r: supervised_round(s, plain, st, r), equal)
    with timed("centralised"):
        central = _student(run, centralised(sites, run), device)
    with timed("centralised_nodrop"):
        central_nodrop = _student(run, centralised(sites, plain), device)
    with timed("evaluation"):
        out["scores"]["fedavg"] = {p: evaluate(_student(run, fedavg, device), p)
                                   for p in POPULATIONS}
        out["scores"]["fedprox"] = {p: evaluate(_student(run, fedprox, device), p)
                                    for p in POPULATIONS}
        # the last round's local updates are the fine-tuned models: FedAvg for rounds 1..R-1,
        # then local_steps more steps at each site, not averaged
        out["scores"]["fedavg_ft"] = {p: evaluate(_student(run, last_updates[p], device), p)
                                      for p in POPULATIONS}
        out["scores"]["centralised"] = {p: evaluate(central, p) for p in POPULATIONS}
        out["scores"]["fedavg_nodrop"] = {p: evaluate(_student(run, fedavg_nodrop, device), p)
                                          for p in POPULATIONS}
        out["scores"]["centralised_nodrop"] = {p: evaluate(central_nodrop, p)
                                               for p in POPULATIONS}

    for method, changes in DISTILLATION_VARIANTS.items():
        vrun = dataclasses.replace(run, **changes)
        vsites = _with_teacher(sites, folder / method)
        if vrun.aggregation == "cases":
            weights = {p: float(len(load_site_data(s, vrun).train_cases))
                       for p, s in vsites.items()}
        else:
            weights = equal
        with timed(method):
            state, _ = federated(vsites, vrun,
                                 lambda s, st, r, vrun=vrun: distill_round(s, vrun, st, r)[0],
                                 weights)
        with timed("evaluation"):
            model = _student(run, state, device)
            out["scores"][method] = {p: evaluate(model, p) for p in POPULATIONS}
            if method == "student":
                for subset in SUBSETS:
                    drop = tuple(c for c in CONTRASTS if c not in subset)
                    name = "+".join(subset)
                    if not drop:
                        out["subsets"][name] = out["scores"]["student"]
                        continue
                    out["subsets"][name] = {p: dice_only(model, tests[p], run, device, drop)
                                            for p in POPULATIONS}
    if folder.exists():
        shutil.rmtree(folder)  # teachers, projectors: several MB per site and variant
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
# Summaries
# --------------------------------------------------------------------------------------------


def _cell(values: Sequence[float], digits: int) -> str:
    return fmt_mean_sd(values, digits)


def method_summary(results: Sequence[Mapping], method: str, region: str, metric: str,
                   higher_is_better: bool, section: str = "scores") -> dict:
    """Per population, mean, worst and gap (best - worst) of one method, as lists over seeds."""
    per_pop = {p: [r[section][method][p][region][metric] for r in results] for p in POPULATIONS}
    mean, worst, gap, worst_pop = [], [], [], []
    for i in range(len(results)):
        values = {p: per_pop[p][i] for p in POPULATIONS}
        finite = {p: v for p, v in values.items() if math.isfinite(v)}
        mean.append(sum(finite.values()) / len(finite) if finite else math.nan)
        pick = min if higher_is_better else max
        wp = pick(finite, key=finite.get) if finite else "-"
        worst.append(finite.get(wp, math.nan))
        gap.append(max(finite.values()) - min(finite.values()) if finite else math.nan)
        worst_pop.append(wp)
    return {"populations": per_pop, "mean": mean, "worst": worst, "gap": gap,
            "worst_population": worst_pop}


def _worst_label(pops: Sequence[str]) -> str:
    name, n = Counter(pops).most_common(1)[0]
    return f"{name}" if n == len(pops) else f"{name} {n}/{len(pops)}"


def method_table(results: Sequence[Mapping], region: str, metric: str,
                 higher_is_better: bool, digits: int) -> str:
    header = ["method", *POPULATIONS, "mean", "worst", "worst pop.", "gap best-worst"]
    rows = []
    for method, label in METHODS.items():
        s = method_summary(results, method, region, metric, higher_is_better)
        rows.append([label, *(_cell(s["populations"][p], digits) for p in POPULATIONS),
                     _cell(s["mean"], digits), _cell(s["worst"], digits),
                     _worst_label(s["worst_population"]), _cell(s["gap"], digits)])
    return md_table(header, rows, ["l"] + ["r"] * (len(header) - 1))


def lesion_table(results: Sequence[Mapping], population: str = "MET") -> str:
    header = ["method", *(f"{r} lesion Dice" for r in REGIONS),
              *(f"{r} lesion HD95" for r in REGIONS)]
    rows = []
    for method, label in METHODS.items():
        cells = [label]
        for metric, digits in (("lesion_dice", 3), ("lesion_hd95", 1)):
            for region in REGIONS:
                cells.append(_cell([r["scores"][method][population][region][metric]
                                    for r in results], digits))
        rows.append(cells)
    return md_table(header, rows, ["l"] + ["r"] * (len(header) - 1))


def cross_table(results: Sequence[Mapping]) -> str:
    header = ["teacher trained on \\ tested on", *POPULATIONS, "mean (others)"]
    rows = []
    for tp in POPULATIONS:
        cells = [tp]
        others = []
        for ep in POPULATIONS:
            per_region = []
            for region in REGIONS:
                values = [r["cross"][tp][ep][region]["dice"] for r in results]
                per_region.append(mean_sd(values)[0])
            text = " / ".join(f"{v:.2f}" for v in per_region)
            cells.append(f"**{text}**" if ep == tp else text)
            if ep != tp:
                others.append(per_region)
        cells.append(" / ".join(f"{sum(o[i] for o in others) / len(others):.2f}"
                                for i in range(len(REGIONS))))
        rows.append(cells)
    return md_table(header, rows, ["l"] + ["c"] * (len(header) - 1))


def subset_table(results: Sequence[Mapping]) -> str:
    header = ["contrasts", *POPULATIONS, "mean"]
    rows = []
    for subset in SUBSETS:
        name = "+".join(subset)
        cells = [name]
        means = []
        for pop in POPULATIONS:
            per_region = [mean_sd([r["subsets"][name][pop][region]["dice"] for r in results])[0]
                          for region in REGIONS]
            means.append(per_region)
            cells.append(" / ".join(f"{v:.2f}" for v in per_region))
        cells.append(" / ".join(f"{sum(m[i] for m in means) / len(means):.2f}"
                                for i in range(len(REGIONS))))
        rows.append(cells)
    return md_table(header, rows, ["l"] + ["c"] * (len(header) - 1))


def subset_means(results: Sequence[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """subset -> population (and "mean") -> region -> Dice averaged over seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for subset in SUBSETS:
        name = "+".join(subset)
        out[name] = {p: {reg: mean_sd([r["subsets"][name][p][reg]["dice"] for r in results])[0]
                         for reg in REGIONS} for p in POPULATIONS}
        out[name]["mean"] = {reg: sum(out[name][p][reg] for p in POPULATIONS) / len(POPULATIONS)
                             for reg in REGIONS}
    return out


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def _heatmaps(plt, matrices: Sequence[tuple[str, list[list[float]]]], rows: Sequence[str],
              cols: Sequence[str], title: str, path: Path, height: float) -> Path:
    import numpy as np

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices) + 2.5, height),
                             sharey=True)
    for i, (ax, (name, matrix)) in enumerate(zip(np.atleast_1d(axes), matrices)):
        arr = np.array(matrix, dtype=float)
        im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        if i:  # the y axis is shared: hide, not replace, the labels of the other panels
            ax.tick_params(labelleft=False)
        ax.set_title(name)
        for (y, x), v in np.ndenumerate(arr):
            if math.isfinite(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.55 else "black")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Dice")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_methods(results: Sequence[Mapping], path: Path) -> Path:
    plt = pyplot()
    cols = [*POPULATIONS, "mean", "worst"]
    matrices = []
    for region in REGIONS:
        matrix = []
        for method in METHODS:
            s = method_summary(results, method, region, "dice", True)
            matrix.append([mean_sd(s["populations"][p])[0] for p in POPULATIONS]
                          + [mean_sd(s["mean"])[0], mean_sd(s["worst"])[0]])
        matrices.append((f"{region} Dice", matrix))
    return _heatmaps(plt, matrices, list(METHODS.values()), cols,
                     f"Dice on held-out phantom test cases (mean of {len(results)} seeds)", path,
                     height=0.42 * len(METHODS) + 1.8)


def plot_subsets(results: Sequence[Mapping], path: Path) -> Path:
    plt = pyplot()
    means = subset_means(results)
    cols = [*POPULATIONS, "mean"]
    matrices = [(f"{region} Dice", [[means["+".join(s)][c][region] for c in cols]
                                    for s in SUBSETS]) for region in REGIONS]
    return _heatmaps(plt, matrices, ["+".join(s) for s in SUBSETS], cols,
                     "fedbrats student with only these contrasts (others zero-filled)", path,
                     height=0.32 * len(SUBSETS) + 1.8)


def plot_cross(results: Sequence[Mapping], path: Path) -> Path:
    plt = pyplot()
    matrices = [(f"{region} Dice", [[mean_sd([r["cross"][tp][ep][region]["dice"]
                                              for r in results])[0] for ep in POPULATIONS]
                                    for tp in POPULATIONS]) for region in REGIONS]
    return _heatmaps(plt, matrices, [f"teacher {p}" for p in POPULATIONS],
                     [f"test {p}" for p in POPULATIONS],
                     "Local teachers on every population's test cases", path, height=3.6)


# --------------------------------------------------------------------------------------------
# The run and its report
# --------------------------------------------------------------------------------------------


def headline(results: Sequence[Mapping]) -> dict[str, Any]:
    """Mean over populations (and worst population) of WT/TC/ET Dice per method, seed means."""
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for region in REGIONS:
            s = method_summary(results, method, region, "dice", True)
            out[method][region] = {"mean": mean_sd(s["mean"])[0],
                                   "worst": mean_sd(s["worst"])[0],
                                   "gap": mean_sd(s["gap"])[0]}
    return out


def _budget_table(settings: QualitySettings, counts: Mapping[str, int]) -> str:
    from fedbrats.common.networks.models import TappedModel, count_parameters, resolve_spec

    steps = settings.steps_per_site
    voxels = settings.batch_size * settings.patch_size ** 3
    n_sites = len(POPULATIONS)

    def params(name: str) -> str:
        return f"{count_parameters(TappedModel.from_spec(resolve_spec(name)).net) / 1e6:.2f} M"

    t, s = settings.teacher_model, settings.student_model
    rows = [
        ["local teachers", f"{t} ({params(t)})", f"{steps}", f"{steps * n_sites}",
         f"{settings.teacher_epochs} epochs x {steps // settings.teacher_epochs} steps"],
        ["ensemble", f"5 x {t}", "0 (the teachers)", "0", "no training of its own"],
        ["FedAvg (with and without dropout), FedProx", f"{s} ({params(s)})", f"{steps}",
         f"{steps * n_sites}",
         f"{settings.num_rounds} rounds x {settings.local_steps} local steps"],
        ["FedAvg + fine-tuning", s, f"{steps}", f"{steps * n_sites}",
         f"{settings.num_rounds - 1} FedAvg rounds, then {settings.local_steps} local steps"],
        ["centralised (with and without dropout)", s, "-", f"{steps * n_sites}",
         f"{steps} steps x 5 populations in turn"],
        ["student and ablations", s, f"{steps}", f"{steps * n_sites}",
         f"{settings.num_rounds} rounds x {settings.local_steps} steps, plus the teachers' "
         "forward pass each step"],
    ]
    table = md_table(["method", "network", "optimizer steps per site", "steps in all", "schedule"],
                     rows, ["l", "l", "r", "r", "l"])
    return table + (f"\n\nEvery step is one batch of {settings.batch_size} crops of "
                    f"{settings.patch_size}^3 voxels ({voxels:,} voxels).")


def write_report(settings: QualitySettings, results: Sequence[Mapping], out_dir: Path,
                 command: str, seconds: float, machine: Mapping[str, Any],
                 prefix: str = "quality") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{prefix}.json",
        "markdown": out_dir / f"{prefix}.md",
        "methods_png": out_dir / f"{prefix}.png",
        "subsets_png": out_dir / f"{prefix}-subsets.png",
        "teachers_png": out_dir / f"{prefix}-teachers.png",
    }
    counts = settings.train_counts()
    head = headline(results)
    paths["json"].write_text(json.dumps({
        "command": command, "seconds": seconds, "machine": dict(machine),
        "settings": dataclasses.asdict(settings), "train_counts": counts,
        "headline": head, "seeds": list(results),
    }, indent=1, default=float))
    plot_methods(results, paths["methods_png"])
    plot_subsets(results, paths["subsets_png"])
    plot_cross(results, paths["teachers_png"])

    n_seeds = len(results)
    train_cases = results[0]["train_cases"]
    secs: dict[str, list[float]] = {}
    for r in results:
        for k, v in r["seconds"].items():
            secs.setdefault(k, []).append(v)
    lines = [
        "# Quality benchmark: fedbrats against federated and centralised baselines",
        "",
        *machine_markdown(machine, command, seconds),
        "",
        "## Setup",
        "",
        f"- **Data**: phantoms from `simulation/phantoms.py` at {settings.shape}^3 "
        f"(seed {settings.data_seed}); training side per population "
        f"{', '.join(f'{p} {n}' for p, n in counts.items())} cases (BraTS 2023-like imbalance), "
        f"of which a validation share of {settings.val_fraction:g} (at least 1) is held back "
        "for the teachers' end-of-training check; training cases per seed "
        f"{', '.join(f'{p} {n}' for p, n in train_cases.items())} (seed 0).",
        f"- **Test**: {settings.test_cases} held-out cases per population, generated with "
        f"another phantom seed ({settings.test_seed}): other brains, other tumours; no training "
        "or validation step sees them. Scores are the mean over a population's test cases "
        "(`evaluate_model`: MONAI sliding-window inference, the probabilities brought back to "
        "the case's own grid, then `fedbrats.common.metrics.brats.evaluate_case` against its "
        "label file).",
        f"- **Grid and networks**: {settings.spacing:g} mm, crops {settings.patch_size}^3, "
        f"batch {settings.batch_size}; teachers `{settings.teacher_model}`, students "
        f"`{settings.student_model}`; otherwise the cpu-demo run settings (student-lr 3e-3 "
        "with cosine decay over the rounds, modality dropout 0.25 for every student but the "
        "two *no modality dropout* rows, "
        "logit weight 1, feature weight 0.1, temperature 2, FedProx mu 0.01).",
        f"- **Seeds**: {', '.join(str(r['seed']) for r in results)} (network initialisation, "
        f"batches, augmentation, modality dropout, train/validation split); each cell is the "
        f"mean +/- sd over the {n_seeds} seeds.",
        "- **In-process federation**: the federated methods run in one process with plain "
        "functions, not through Flower: each round calls every site's local training "
        "(`fedbrats.client.distill.distill_round`, or `supervised_round` for the labels-only "
        "baselines) "
        "and the server's aggregation is the (equal- or case-weighted) mean of the returned "
        "state dicts, which is what Flower's FedAvg/FedProx compute. The Flower path itself "
        "is tested in `tests/simulation/test_simulation_e2e.py`.",
        "",
        "### Compute budget",
        "",
        _budget_table(settings, counts),
        "",
        "Wall time per seed (s, mean over seeds): "
        + ", ".join(f"{METHODS.get(k, k)} {mean_sd(v)[0]:.0f}" for k, v in secs.items()) + ".",
        "",
        "## Population x method",
        "",
        "Each cell: mean +/- sd over seeds of the population's mean over its test cases. "
        "*worst*: the lowest population (highest for HD95) per seed, averaged; *worst pop.*: "
        "the population that was worst (with how many seeds when they disagree); *gap*: best "
        "minus worst population. FedAvg + fine-tuning is scored with each site's own model.",
        "",
    ]
    for metric, title, higher in TABLE_METRICS:
        for region in REGIONS:
            lines += [f"### {region} {title}", "",
                      method_table(results, region, metric, higher, 3 if higher else 1), ""]
    lines += [
        "### MET lesion-wise (BraTS 2023: dilation 1, lesions over 2 mm^3)", "",
        lesion_table(results, "MET"), "",
        f"![Dice per method and population]({paths['methods_png'].name})", "",
        "## Local teachers on every population", "",
        "WT / TC / ET Dice (mean over seeds); the diagonal (bold) is the teacher's own "
        "population; the last column is the mean over the other four.", "",
        cross_table(results), "",
        f"![Teachers across populations]({paths['teachers_png'].name})", "",
        "## The student with missing contrasts", "",
        "WT / TC / ET Dice of the fedbrats student on the test cases when only these contrasts "
        "are given (the others zero-filled after normalisation, as a missing contrast is at "
        "inference), mean over seeds.", "",
        subset_table(results), "",
        f"![Student Dice per contrast subset]({paths['subsets_png'].name})", "",
        "Raw per-seed numbers: " + f"[`{paths['json'].name}`]({paths['json'].name}).", "",
    ]
    paths["markdown"].write_text("\n".join(lines))
    return paths


def run_quality(settings: QualitySettings, out_dir: Path, work: Path, command: str,
                prefix: str = "quality", threads: int = 1) -> dict[str, Path]:
    """Generate the data, run every method for every seed (``threads`` torch threads), write
    the report files."""
    with torch_threads(threads):
        return _run_quality(settings, out_dir, work, command, prefix)


def _run_quality(settings: QualitySettings, out_dir: Path, work: Path, command: str,
                 prefix: str) -> dict[str, Path]:
    from fedbrats.client.data import clear_site_data_cache

    start = time.perf_counter()
    machine = machine_info()
    work.mkdir(parents=True, exist_ok=True)
    train_root, test_root = prepare_data(settings, work)
    tests = load_test_sets(test_root, settings.run(settings.seeds[0]))
    results = []
    for seed in settings.seeds:
        t0 = time.perf_counter()
        results.append(run_seed(settings, seed, train_root, tests, work))
        clear_site_data_cache()  # the next seed splits the cases differently
        log.info("seed %d done in %.0f s", seed, time.perf_counter() - t0)
    machine = {**machine, "load_average_end": machine_info()["load_average"]}
    return write_report(settings, results, out_dir, command, time.perf_counter() - start,
                        machine, prefix)


def _run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    if not args.verbose_sites:
        logging.getLogger("fedbrats.client").setLevel(logging.WARNING)
    out, work = resolve_dirs(args, "quality")
    command = command_line("quality", args, {"seeds": ",".join(map(str, args.seeds or ()))})
    paths = run_quality(settings, out, work, command, threads=args.threads)
    head = json.loads(paths["json"].read_text())
    secs = head["seconds"]
    print(f"quality benchmark: {len(settings.seeds)} seeds in {secs / 60:.1f} min")
    for method, label in METHODS.items():
        h = head["headline"][method]
        print(f"  {label:34s} mean Dice WT {h['WT']['mean']:.3f} TC {h['TC']['mean']:.3f} "
              f"ET {h['ET']['mean']:.3f}; worst WT {h['WT']['worst']:.3f}")
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
            "Train local teachers, their ensemble, FedAvg and FedProx on labels, FedAvg with "
            "local fine-tuning, a centralised model, the fedbrats distillation student and its "
            "ablations on five phantom populations, for several seeds and the same optimizer "
            "budget, and score each on held-out phantom test cases (Dice, HD95, MET "
            "lesion-wise; the student also for every subset of contrasts). Writes "
            "OUT/quality.md, quality.json and PNG charts. The full run takes about 20-25 min "
            "on two CPU cores; --quick takes seconds."
        ),
    )
    add_common_arguments(p, "quality")
    p.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                   help="seeds to run (default: 0,1,2; with --quick 0,1)")
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
            "throughput, and a profile). --quick runs tiny versions in seconds."
        ),
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    register_quality(sub)
    register_perf(sub)
    return p


__all__ = [
    "FULL",
    "METHODS",
    "QUICK",
    "SUBSETS",
    "QualitySettings",
    "register_bench",
    "run_quality",
    "supervised_round",
    "weighted_mean",
]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: fedbrats bench quality")
