"""``fedbrats bench perf``: what fedbrats costs, each figure a ratio measured side by side.

================================  ==========================================================
figure                            measured against
================================  ==========================================================
distillation step                 a supervised step of the same student on the same batch
simulation wall time              the same protocol, and the same training steps alone, in
                                  one process
bytes per site and round          twice the student's size in float32
inference, one 240x240x155 case   student: the five-teacher ensemble; ``predict_case``:
                                  MONAI's ``sliding_window_inference`` of the same network
peak memory of a site process     the same process with only its libraries imported
training throughput (voxels/s)    distillation against teacher training
================================  ==========================================================

Plus a profile of one distillation round (``torch.profiler`` operators and ``cProfile``
functions). Everything runs the project's own functions (``fedbrats.client``,
``fedbrats.common.inference.predict``,
``fedbrats.simulation.runner``); the network steps mirror ``distill_round``'s loop body.

Helpers shared with ``simulation/bench/quality.py`` (machine facts, markdown tables, mean +/- sd)
live here too. Only the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbrats.common.data.contract import POPULATIONS
from fedbrats.common.utils.plotting import pyplot
from fedbrats.common.utils.tables import markdown_table as md_table

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Shared helpers (also used by bench_quality)
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, library versions, GPU (or none), load and the date (UTC)."""
    import torch

    def version(name: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _v

        try:
            return _v(name)
        except PackageNotFoundError:
            return "not installed"

    gpu = (f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
           if torch.cuda.is_available() else "none")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "flwr": version("flwr"),
        "monai": version("monai"),
        "gpu": gpu,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_markdown(machine: Mapping[str, Any], command: str, seconds: float) -> list[str]:
    """The header lines every results file starts with."""
    ram = machine.get("ram_gib")
    load = machine.get("load_average")
    load_end = machine.get("load_average_end")
    load_text = f"{load[0]:.1f}" if load else "n/a"
    if load_end:
        load_text += f" at the start, {load_end[0]:.1f} at the end"
    return [
        f"- **Command**: `{command}`",
        f"- **Date**: {machine.get('date')}; wall time {seconds / 60:.1f} min",
        f"- **Machine**: {machine.get('cpu')}, {machine.get('cores')} cores "
        f"({machine.get('usable_cores')} usable, torch uses {machine.get('torch_threads')} "
        f"threads), {ram:.1f} GiB RAM, {machine.get('os')}; GPU: {machine.get('gpu')}"
        if ram is not None else f"- **Machine**: {machine.get('cpu')}",
        f"- **Software**: Python {machine.get('python')}, torch {machine.get('torch')}, "
        f"flwr {machine.get('flwr')}, MONAI {machine.get('monai')}",
        f"- **Load average** (1 min): {load_text} (other work may share these cores)",
    ]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan when there are none; sd 0
    for a single value)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fmt_mean_sd(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_sd(values)
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous number."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_common_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (seconds; what the test suite runs); results go to "
                   "build/bench/quick unless --out is given")
    p.add_argument("--out", metavar="DIR",
                   help="folder of the results files (default: docs/bench; with --quick "
                   "build/bench/quick)")
    p.add_argument("--work", metavar="DIR",
                   help=f"scratch folder for data and models (default: build/bench/{name})")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads (default: 1, as each simulated site; small "
                   "3-D convolutions gain little from more, and lose a lot when other work "
                   "shares the cores)")


def resolve_dirs(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    out = Path(args.out) if args.out else Path("build/bench/quick" if args.quick else "docs/bench")
    work = Path(args.work) if args.work else Path("build/bench") / (
        f"{name}-quick" if args.quick else name)
    return out, work


def command_line(name: str, args: argparse.Namespace, extra: Mapping[str, Any]) -> str:
    """The command as a user would type it again (options at their default left out)."""
    parts = ["fedbrats", "bench", name]
    if args.quick:
        parts.append("--quick")
    if getattr(args, "threads", 1) != 1:
        parts += ["--threads", str(args.threads)]
    for key in ("out", "work"):
        if getattr(args, key, None):
            parts += [f"--{key}", str(getattr(args, key))]
    for key, value in extra.items():
        if value is True:
            parts.append(f"--{key}")
        elif value not in (None, "", False):
            parts += [f"--{key}", str(value)]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfSettings:
    """Sizes of one perf run (:data:`QUICK` for the tests, :data:`FULL` for the docs)."""

    preset: str
    """Run preset of the step, memory and profile measurements."""
    step_reps: int
    site_cases: int
    """Cases of the measured site (GLI), like make demo's largest site in the full run."""
    site_shape: int
    inference_shape: tuple[int, int, int]
    inference_reps: int
    simulation: bool
    sim_sites: int = 3
    profile_steps: int = 0
    """Local steps of the profiled round (0: the preset's)."""
    patch_size: int = 0
    """Training crops of the step, profile and memory measurements (0: the preset's)."""
    phase2_rounds: int = 0
    """Distillation rounds of the phase-2 overhead measurement at the preset's scale, five sites
    with ``make demo``'s data (0: not measured)."""
    deploy_cases: int = 0
    """Cases (240x240x155 phantoms) of the site whose deployment rounds are timed against the
    simulation's (:func:`measure_deployment`; 0: not measured)."""


QUICK = PerfSettings(preset="tiny", step_reps=2, site_cases=3, site_shape=48,
                     inference_shape=(32, 32, 32), inference_reps=1, simulation=False,
                     profile_steps=2, patch_size=16)
FULL = PerfSettings(preset="cpu-demo", step_reps=8, site_cases=16, site_shape=96,
                    inference_shape=(240, 240, 155), inference_reps=3, simulation=True,
                    phase2_rounds=6, deploy_cases=20)


def _run_config(preset: str, **changes: Any):
    from fedbrats.common.config import PRESETS

    return dataclasses.replace(PRESETS[preset], **changes)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# 1. Training steps and throughput
# --------------------------------------------------------------------------------------------


def measure_steps(site, run, reps: int, device) -> dict[str, Any]:
    """Median seconds of a supervised student step, a distillation step (the body of
    ``distill_round``) with the teacher run at the step and with its kept outputs
    (``teacher-cache``), and a teacher training step, interleaved on the same batch (the kept
    outputs: of that batch's crop)."""
    import math
    import tempfile

    import torch

    from fedbrats.client.data import load_site_data, training_batches
    from fedbrats.client.distill import LocalTrainer
    from fedbrats.client.teacher_outputs import feature_strides
    from fedbrats.common.data.transforms import IMAGE, LABEL, teacher_outputs_dataset
    from fedbrats.common.losses import SupervisedLoss
    from fedbrats.common.networks.models import (
        TappedModel,
        build_projector,
        new_student,
        resolve_spec,
        spatial_divisor,
    )

    data = load_site_data(site, run)
    teacher = TappedModel.from_spec(resolve_spec(run.teacher_model)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    strides = feature_strides(teacher, run.patch_size)
    with tempfile.TemporaryDirectory() as kept_dir:  # the teacher's outputs, as a site keeps them
        kept_ds = teacher_outputs_dataset(
            data.kept_train, teacher, device, Path(kept_dir), "bench", (run.patch_size,) * 3,
            math.lcm(spatial_divisor(teacher.spec), max(strides.values())), strides,
            overlap=run.sw_overlap, amp=run.amp)
        kept_batch = next(training_batches(kept_ds, run.batch_size, 0))
    batch = {k: kept_batch[k] for k in (IMAGE, LABEL)}  # the same crop without the outputs
    x, y = batch[IMAGE].to(device), batch[LABEL].to(device)
    student = new_student(run, site.population).to(device).train()
    trainee = TappedModel.from_spec(resolve_spec(run.teacher_model)).to(device).train()
    projector = build_projector(student, teacher, patch_size=run.patch_size).to(device)
    t_opt = torch.optim.AdamW(trainee.parameters(), lr=1e-3, weight_decay=1e-5)
    sup = SupervisedLoss()
    # the step of a round (fedbrats.client.distill.LocalTrainer), with and without the teacher
    labels_only = dataclasses.replace(run, logit_weight=0.0, feature_weight=0.0)
    supervised_trainer = LocalTrainer(student, labels_only, device, 1e-3, 0)
    distillation_trainer = LocalTrainer(student, run, device, 1e-3, 0, teacher=teacher,
                                        projector=projector)

    def supervised() -> None:
        supervised_trainer.step(batch)

    def distillation() -> None:
        distillation_trainer.step(batch)

    def distillation_kept() -> None:
        distillation_trainer.step(kept_batch)

    def teacher_step() -> None:
        loss = sup(trainee(x)[0], y)
        t_opt.zero_grad(set_to_none=True)
        loss.backward()
        t_opt.step()

    steps: dict[str, Callable[[], None]] = {
        "supervised": supervised, "distillation": distillation,
        "distillation_kept": distillation_kept, "teacher": teacher_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    _sync(device)
    for _ in range(reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    voxels = int(x.shape[0]) * int(x[0, 0].numel())
    med = {k: _median(v) for k, v in times.items()}
    return {
        "device": str(device), "reps": reps, "batch": int(x.shape[0]),
        "crop": list(x.shape[2:]), "voxels_per_step": voxels, "seconds": med,
        "all_seconds": times,
        "voxels_per_second": {k: voxels / v for k, v in med.items()},
        "ratio_distillation_over_supervised": med["distillation"] / med["supervised"],
        "ratio_kept_distillation_over_supervised": med["distillation_kept"] / med["supervised"],
        "ratio_distillation_over_teacher_throughput": med["teacher"] / med["distillation"],
    }


# --------------------------------------------------------------------------------------------
# 2. Simulation against one process
# --------------------------------------------------------------------------------------------


def _in_process_protocol(data_root: Path, work: Path, run, sites: Sequence[str]) -> float:
    """Everything the simulated sites do (info, teachers, rounds with evaluation, final
    evaluation), with the site functions called in this process; the server's mean in between."""
    from fedbrats.client.data import clear_site_data_cache, site_info
    from fedbrats.client.evaluate import evaluate_site
    from fedbrats.client.teacher import train_teacher
    from fedbrats.common.config import SiteConfig
    from fedbrats.common.networks.models import new_student

    clear_site_data_cache()
    cfg = {p: SiteConfig(population=p, data_dir=data_root / p, work_dir=work / p) for p in sites}
    t0 = time.perf_counter()
    for site in cfg.values():
        site_info(site, run)
    for site in cfg.values():
        train_teacher(site, run)
    state = dict(new_student(run).net.state_dict())
    for rnd in range(1, run.num_rounds + 1):
        state = _in_process_round(cfg, run, state, rnd)
        if run.evaluates_round(rnd):
            for site in cfg.values():
                evaluate_site(site, run, state)
    for site in cfg.values():
        evaluate_site(site, run, state, with_teacher=True, missing_contrasts=True)
    return time.perf_counter() - t0


def _in_process_round(sites: Mapping[str, Any], run, state, rnd: int) -> dict:
    """One distillation round with the site functions, one site after another, and the
    server's mean (each population head over its own site)."""
    from fedbrats.client.distill import distill_round
    from fedbrats.common.networks.models import population_mean
    from fedbrats.simulation.bench.quality import weighted_tensor_mean

    updates = [distill_round(site, run, state, rnd)[0] for site in sites.values()]
    pops = [site.population for site in sites.values()]
    return population_mean(updates, [1.0] * len(updates), pops, weighted_tensor_mean, state)


def _plain_loop(data_root: Path, run, sites: Sequence[str]) -> float:
    """Only the training steps (each site's teacher steps, then every round's distillation
    steps), one plain PyTorch loop, data loaded once."""
    import torch

    from fedbrats.client.data import clear_site_data_cache, load_site_data, training_batches
    from fedbrats.client.distill import LocalTrainer
    from fedbrats.common.config import SiteConfig
    from fedbrats.common.data.transforms import IMAGE, LABEL
    from fedbrats.common.losses import SupervisedLoss
    from fedbrats.common.networks.models import (
        TappedModel,
        build_projector,
        new_student,
        resolve_spec,
        set_population,
    )

    clear_site_data_cache()
    t0 = time.perf_counter()
    streams = {p: training_batches(load_site_data(SiteConfig(population=p, data_dir=data_root / p,
                                                     work_dir=data_root / p), run).train_ds,
                           run.batch_size, 0) for p in sites}
    sup = SupervisedLoss()
    teachers = {}
    for p in sites:
        teacher = TappedModel.from_spec(resolve_spec(run.teacher_model)).train()
        opt = torch.optim.AdamW(teacher.parameters(), lr=run.teacher_lr)
        for _ in range(run.teacher_epochs * run.teacher_steps_per_epoch):
            b = next(streams[p])
            loss = sup(teacher(b[IMAGE])[0], b[LABEL])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        teachers[p] = teacher.eval()
    student = new_student(run)
    projectors = {p: build_projector(student, t, patch_size=run.patch_size)
                  for p, t in teachers.items()}
    cpu = torch.device("cpu")
    for _ in range(run.num_rounds):
        for p in sites:  # each site's round: the step of fedbrats.client.distill.LocalTrainer
            set_population(student, p)
            trainer = LocalTrainer(student, run, cpu, run.student_lr, 0,
                                   teacher=teachers[p].requires_grad_(False),
                                   projector=projectors[p])
            for _ in range(run.local_steps):
                trainer.step(next(streams[p]))
    return time.perf_counter() - t0


def measure_simulation(settings: PerfSettings, work: Path) -> dict[str, Any]:
    from fedbrats.simulation.phantoms import write_dataset
    from fedbrats.simulation.runner import run_simulation

    sites = POPULATIONS[: settings.sim_sites]
    data = work / "sim-data"
    if not data.exists():
        write_dataset(data, {p: 3 for p in sites}, shape=(48, 48, 48), seed=1, progress=False)
    run = _run_config("tiny", num_sites=settings.sim_sites)
    plain = _plain_loop(data, run, sites)
    inproc = _in_process_protocol(data, work / "in-process", run, sites)
    sim_dir = work / "sim-run"
    if sim_dir.exists():
        import shutil

        shutil.rmtree(sim_dir)
    result = run_simulation(sim_dir, data, num_sites=settings.sim_sites, preset="tiny",
                            stream=False)
    if result.returncode != 0:
        raise RuntimeError(f"the simulation failed (exit {result.returncode}); see {sim_dir}")
    audit = [json.loads(line) for line in (sim_dir / "audit.jsonl").read_text().splitlines()]
    up = [e["bytes"] for e in audit if e.get("phase") == "round" and "bytes" in e]
    return {
        "sites": list(sites), "preset": "tiny", "rounds": run.num_rounds,
        "teacher_steps_per_site": run.teacher_epochs * run.teacher_steps_per_epoch,
        "local_steps": run.local_steps,
        "simulation_seconds": result.seconds, "in_process_protocol_seconds": inproc,
        "plain_loop_seconds": plain,
        "ratio_simulation_over_protocol": result.seconds / inproc,
        "ratio_simulation_over_plain_loop": result.seconds / plain,
        "audit_update_bytes": up,
    }


def measure_phase2(settings: PerfSettings, work: Path, cores: int) -> dict[str, Any]:
    """Phase 2 at the preset's scale: ``phase2_rounds`` distillation rounds of the five sites
    of ``make demo`` (its phantoms) through Flower's simulation engine, against the same rounds
    with the site functions in this process (the teachers the simulation trained, the sites
    one after another, the server's mean in between; evaluation every ``eval-every`` rounds).

    Both run the sites one at a time with ``cores`` torch threads (the simulation gives each
    virtual site every core, so Ray runs one at a time), so that the ratio is the simulation's
    own cost: Ray, the SuperLink, the messages. The simulation as ``make demo`` runs it (one
    core per site, two at a time on two cores) is timed too."""
    from fedbrats.client.data import clear_site_data_cache
    from fedbrats.client.evaluate import evaluate_site
    from fedbrats.common.config import SiteConfig
    from fedbrats.common.networks.models import new_student
    from fedbrats.simulation.phantoms import case_counts, write_dataset
    from fedbrats.simulation.runner import run_simulation

    data = work / "demo-data"
    if not (data / "MET").exists():
        write_dataset(data, {p: max(n, 6) for p, n in case_counts(16).items()},
                      shape=(96, 96, 96), seed=0, progress=False)
    rounds, every = settings.phase2_rounds, max(1, settings.phase2_rounds // 2)
    overrides = {"num-rounds": rounds, "eval-every": every, "final-tta": False}
    run = _run_config(settings.preset, num_rounds=rounds, eval_every=every, final_tta=False)
    seconds: dict[str, float] = {}
    for name, cpus in (("one site at a time", float(cores)), ("as make demo", 1.0)):
        sim_dir = work / f"phase2-{int(cpus)}"
        if sim_dir.exists():
            import shutil

            shutil.rmtree(sim_dir)
        result = run_simulation(sim_dir, data, num_sites=5, preset=settings.preset,
                                overrides=overrides, cpus_per_site=cpus, stream=False)
        if result.returncode != 0:
            raise RuntimeError(f"the simulation failed (exit {result.returncode}); see {sim_dir}")
        seconds[name] = float(json.loads((sim_dir / "phases.json").read_text())["distillation"])
    sites = {p: SiteConfig(population=p, data_dir=data / p,
                           work_dir=work / f"phase2-{cores}" / "sites" / p) for p in POPULATIONS}
    clear_site_data_cache()  # a new process reads the sites' cases from their case cache
    with torch_threads(cores):
        t0 = time.perf_counter()
        state = dict(new_student(run).net.state_dict())
        for rnd in range(1, rounds + 1):
            state = _in_process_round(sites, run, state, rnd)
            if run.evaluates_round(rnd):
                for site in sites.values():
                    evaluate_site(site, run, state)
        inproc = time.perf_counter() - t0
    sim = seconds["one site at a time"]
    return {"preset": settings.preset, "rounds": rounds, "eval_every": every, "cores": cores,
            "simulation_seconds": sim, "simulation_demo_seconds": seconds["as make demo"],
            "in_process_seconds": inproc, "ratio": sim / inproc}


def _rounds(run_dir: Path) -> list[dict]:
    """The ``rounds.json`` entries of a run, in round order."""
    rounds = json.loads((run_dir / "rounds.json").read_text())
    return sorted(rounds, key=lambda r: r["round"])


def measure_deployment(work: Path, cases: int = 20, shape: Sequence[int] = (240, 240, 155),
                       rounds: int = 4, preset: str = "cpu-demo", threads: int = 2,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A distillation round of one site with ``cases`` phantoms of ``shape`` (BraTS size: 1 mm)
    in deployment against the same round in the simulation.

    Deployment: the rehearsal (:class:`~fedbrats.simulation.rehearsal.LocalFederation`: TLS,
    node authentication, a SuperLink and the site's SuperNode, a fresh ClientApp process per
    message). Simulation: ``fedbrats simulate``'s engine (one warm Ray actor). Both with the
    preset's settings and ``threads`` torch threads, ``rounds`` rounds, evaluated only in the
    last; the deployment reuses the simulation's finished teacher (phase 1 is not measured),
    and builds its own case cache. Each round's time is the server's ``train_seconds``
    (messages handed to Flower until every reply is in); the ratio compares the mean of rounds
    2.. (the first builds the caches in both)."""
    import shutil

    from fedbrats.client.teacher import TEACHER_FILE
    from fedbrats.simulation.phantoms import write_dataset
    from fedbrats.simulation.rehearsal import LocalFederation
    from fedbrats.simulation.runner import run_simulation

    if rounds < 2:
        raise ValueError(f"rounds must be at least 2 (the first is left out), got {rounds}")
    tag = "x".join(str(int(v)) for v in shape)
    data = work / f"deploy-data-{tag}-{cases}"
    stamp = data / "phantoms.json"
    if not stamp.exists():
        if data.exists():
            shutil.rmtree(data)
        write_dataset(data, {"GLI": cases}, shape=tuple(shape), seed=0, progress=False)
        stamp.write_text(json.dumps({"cases": cases, "shape": list(shape)}))
    settings = {"num-rounds": rounds, "eval-every": rounds, "final-tta": False,
                **dict(overrides or {})}
    sim_dir, fed_dir = work / "deploy-simulation", work / "deploy-federation"
    for d in (sim_dir, fed_dir):
        if d.exists():
            shutil.rmtree(d)
    sim = run_simulation(sim_dir, data, num_sites=1, preset=preset, overrides=settings,
                         cpus_per_site=float(threads), stream=False)
    if sim.returncode != 0:
        raise RuntimeError(f"the simulation failed (exit {sim.returncode}); see {sim_dir}")
    env = {"OMP_NUM_THREADS": str(threads)}
    with LocalFederation(fed_dir, {"GLI": data / "GLI"}, env=env) as fed:
        work_dir = fed.sites["GLI"].work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sim_dir / "sites" / "GLI" / TEACHER_FILE, work_dir / TEACHER_FILE)
        result = fed.run({"preset": preset, "num-sites": 1, "output-dir": str(fed_dir / "run"),
                          **settings}, timeout=7200)
    if result.returncode != 0 or not str(result.status).endswith("completed"):
        raise RuntimeError(f"the deployment run failed ({result.status}); see {result.log}")
    entries = {"simulation": _rounds(sim_dir), "deployment": _rounds(fed_dir / "run")}
    sim_s, dep_s = ([float(e["train_seconds"]) for e in entries[name]]
                    for name in ("simulation", "deployment"))
    starts = {name: [{k: e["train"]["GLI"].get(k)
                      for k in ("process_age_s", "first_step_s", "round_s")} for e in rounds]
              for name, rounds in entries.items()}
    run = _run_config(preset)
    later_sim, later_dep = statistics.mean(sim_s[1:]), statistics.mean(dep_s[1:])
    return {"preset": preset, "cases": cases, "shape": list(shape), "rounds": rounds,
            "threads": threads, "local_steps": run.local_steps, "settings": settings,
            "simulation_round_seconds": sim_s, "deployment_round_seconds": dep_s,
            "round_start": starts,
            "simulation_later_mean": later_sim, "deployment_later_mean": later_dep,
            "ratio": later_dep / later_sim}


# --------------------------------------------------------------------------------------------
# 3. Bytes
# --------------------------------------------------------------------------------------------


def _wire_bytes(obj) -> int:
    """Bytes of a Flower record as sent: its own serialised object plus its children's (arrays
    and their chunks), as the SuperLink's object store moves them."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(_wire_bytes(c) for c in children.values())


def _distinct_heads(state: Mapping[str, Any]) -> dict[str, Any]:
    """A new student's population heads are five identical copies, which the wire's deflate
    would compress away; trained heads differ. A little seeded noise on each makes them so."""
    import torch

    from fedbrats.common.networks.models import head_population

    gen = torch.Generator().manual_seed(0)
    return {k: (v + 1e-3 * torch.randn(v.shape, generator=gen)
                if head_population(k) and v.is_floating_point() else v)
            for k, v in state.items()}


def measure_bytes(students: Sequence[str]) -> dict[str, Any]:
    from flwr.app import ArrayRecord

    from fedbrats.common.networks.models import new_student
    from fedbrats.server.strategy import for_transfer

    out = {}
    for name in students:
        run = _run_config("cpu-demo", student_model=name)
        state = _distinct_heads(new_student(run).net.state_dict())
        size = sum(v.numel() * 4 for v in state.values())
        wire = _wire_bytes(ArrayRecord(state))  # the student sent, and the update returned
        # transfer-dtype float16: the copy the strategy sends, and a site returns
        half = _wire_bytes(for_transfer(ArrayRecord(state), "float16"))
        out[name] = {
            "float16_instruction_bytes": half,
            "ratio_float16_train_round_over_2x_float32": 2 * half / (2 * size),
            "parameters": sum(v.numel() for v in state.values()),
            "float32_bytes": size,
            "train_instruction_bytes": wire,
            "update_bytes": wire,
            "evaluate_instruction_bytes": wire,
            "ratio_train_round_over_2x_float32": 2 * wire / (2 * size),
            "ratio_with_evaluation_over_2x_float32": 3 * wire / (2 * size),
        }
    return out


# --------------------------------------------------------------------------------------------
# 4. Inference
# --------------------------------------------------------------------------------------------


def measure_inference(settings: PerfSettings, work: Path, run, student_state) -> dict[str, Any]:
    import torch
    from monai.inferers import sliding_window_inference

    from fedbrats.common.data.cases import discover_cases
    from fedbrats.common.inference.modelfile import load_student, student_payload
    from fedbrats.common.inference.predict import DEFAULT_OVERLAP, predict_case, prepare_case
    from fedbrats.common.networks.models import build_network, resolve_spec
    from fedbrats.simulation.phantoms import generate_case, write_case

    folder = work / "inference"
    shape = settings.inference_shape
    if not (folder / "GLI").exists():
        write_case(generate_case("GLI", 0, shape=shape, seed=0), folder)
    case = discover_cases(folder / "GLI")[0]
    path = work / "student.pt"
    torch.save(student_payload(run, student_state, 1), path)
    student = load_student(path)
    teachers = []
    for i in range(len(POPULATIONS)):
        torch.manual_seed(i)
        teachers.append(build_network(resolve_spec(run.teacher_model)).eval())

    def swi(net, x):
        return sliding_window_inference(x, roi_size=student.patch_size, sw_batch_size=2,
                                        predictor=net, overlap=DEFAULT_OVERLAP, mode="gaussian")

    times: dict[str, list[float]] = {"prepare": [], "student": [], "ensemble": [], "predict": []}
    with torch.no_grad():  # warm-up: the first call of a network pays for allocations
        x = prepare_case(student, case).image.as_tensor()[None].float()
        swi(student.network, x)
        swi(teachers[0], x)
    grid = None
    for _ in range(settings.inference_reps):
        t0 = time.perf_counter()
        prepared = prepare_case(student, case)
        times["prepare"].append(time.perf_counter() - t0)
        x = prepared.image.as_tensor()[None].float()
        grid = list(x.shape[2:])
        with torch.no_grad():
            t0 = time.perf_counter()
            torch.softmax(swi(student.network, x), dim=1)
            times["student"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.stack([torch.softmax(swi(t, x), dim=1) for t in teachers]).mean(0)
            times["ensemble"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predict_case(student, case)
        times["predict"].append(time.perf_counter() - t0)
    med = {k: _median(v) for k, v in times.items()}
    return {
        "input_shape": list(shape), "model_grid": grid, "spacing_mm": list(student.spacing),
        "patch": list(student.patch_size), "overlap": DEFAULT_OVERLAP,
        "student": run.student_model, "teacher": run.teacher_model,
        "seconds": med, "all_seconds": times, "reps": settings.inference_reps,
        "ratio_student_over_ensemble": med["student"] / med["ensemble"],
        "ratio_predict_over_direct": med["predict"] / med["student"],
    }


# --------------------------------------------------------------------------------------------
# 5. Memory of a site process
# --------------------------------------------------------------------------------------------

_PROBE = """
import json, sys
def peak():  # this process's own high-water mark (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"python": peak()}
import torch, monai, flwr.app  # what a site process imports
import fedbrats.client.app, fedbrats.client.distill, fedbrats.client.evaluate
out["imports"] = peak()
from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.client.data import load_site_data
from fedbrats.client.distill import distill_round
from fedbrats.client.evaluate import evaluate_site
from fedbrats.common.networks.models import new_student
spec = json.loads(sys.argv[1])
run = RunConfig(**spec["run"])
from pathlib import Path
site = SiteConfig(population="GLI", data_dir=Path(spec["data"]), work_dir=Path(spec["work"]))
load_site_data(site, run)
out["data"] = peak()
state, _ = distill_round(site, run, new_student(run).net.state_dict(), 1)
out["distill_round"] = peak()
evaluate_site(site, run, state)
out["evaluate"] = peak()
print(json.dumps(out))
"""


def measure_memory(site, run, threads: int) -> dict[str, Any]:
    """Peak resident set of a fresh process doing a site's round, after each phase.

    The child reads its own high-water mark (``VmHWM`` in /proc/self/status): on Linux its
    ``ru_maxrss`` starts from the parent's resident size at fork and would hide it."""
    from pathlib import Path as _P

    root = _P(__file__).resolve().parents[2]
    spec = {"run": dataclasses.asdict(run), "data": str(site.data_dir),
            "work": str(site.work_dir)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], cwd=str(root),
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr[-2000:]}")
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_mib_after": phases,
            "ratio_peak_over_imports": phases["evaluate"] / phases["imports"],
            "local_steps": run.local_steps}


# --------------------------------------------------------------------------------------------
# 6. Profile of one distillation round
# --------------------------------------------------------------------------------------------


def _short(path: str) -> str:
    for marker in ("site-packages/", str(Path(__file__).resolve().parents[2]) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def profile_round(site, run, student_state) -> tuple[dict[str, Any], dict]:
    """One ``distill_round`` timed plainly, one under cProfile (functions) and one under
    torch.profiler (operators); returns the profile and the plainly trained student."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from fedbrats.client.distill import PROJECTOR_FILE, distill_round

    def fresh() -> None:
        (site.work_dir / PROJECTOR_FILE).unlink(missing_ok=True)

    fresh()
    t0 = time.perf_counter()
    trained, _ = distill_round(site, run, student_state, 1)  # data already cached
    plain = time.perf_counter() - t0

    fresh()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(distill_round, site, run, student_state, 1)
    cp_total = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    entries = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        entries.append({"function": f"{_short(file)}:{line}({name})" if line else name,
                        "calls": nc, "self_s": tt, "cumulative_s": ct})
    by_self = sorted(entries, key=lambda e: -e["self_s"])[:15]

    def cum(pred: Callable[[str, str], bool]) -> float:
        return sum(ct for (file, _line, name), (_cc, _nc, _tt, ct, _c) in stats.stats.items()
                   if pred(file, name))

    phases = {
        "next batch (DataLoader + MONAI augmentation)": cum(
            lambda f, n: n == "__next__" and f.endswith("torch/utils/data/dataloader.py")),
        "network forward (teacher, student, projector)": cum(
            lambda f, n: n == "forward" and f.endswith("common/networks/models.py")),
        "distillation loss": cum(
            lambda f, n: n == "forward" and f.endswith("common/losses.py")),
        "backward": cum(lambda f, n: n == "backward" and f.endswith("torch/_tensor.py")),
        "optimizer step (Adam)": cum(lambda f, n: n == "step" and f.endswith("optim/adam.py")),
        "teacher and projector files": cum(
            lambda f, n: (n == "load_teacher" and f.endswith("client/teacher.py"))
            or (n == "_projector" and f.endswith("client/distill.py"))
            or (n == "save_atomic" and f.endswith("common/utils/files.py"))),
    }
    fresh()
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        distill_round(site, run, student_state, 1)
    ops = sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in tp.key_averages()) or 1.0
    top_ops = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total_self} for e in ops[:15]]
    fresh()
    return {"local_steps": run.local_steps, "round_seconds": plain,
            "cprofile_seconds": cp_total, "phases_cumulative_s": phases,
            "top_functions_by_self_time": by_self, "top_ops_by_self_cpu": top_ops}, trained


# --------------------------------------------------------------------------------------------
# The run and its report
# --------------------------------------------------------------------------------------------


def run_perf(settings: PerfSettings, out_dir: Path, work: Path, command: str,
             prefix: str = "perf", threads: int = 1) -> dict[str, Path]:
    """Every measurement, with ``threads`` torch threads; writes the report files."""
    with torch_threads(threads):
        return _run_perf(settings, out_dir, work, command, prefix, threads)


def _run_perf(settings: PerfSettings, out_dir: Path, work: Path, command: str, prefix: str,
              threads: int) -> dict[str, Path]:
    import torch

    from fedbrats.client.teacher import train_teacher
    from fedbrats.common.config import SiteConfig
    from fedbrats.common.networks.models import new_student
    from fedbrats.simulation.phantoms import write_dataset

    start = time.perf_counter()
    machine = machine_info()
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"site-{settings.site_shape}-{settings.site_cases}"
    if not (data / "GLI").exists():
        write_dataset(data, {"GLI": settings.site_cases}, shape=(settings.site_shape,) * 3,
                      seed=0, progress=False)
    run = _run_config(settings.preset, device="cpu")
    train_run = dataclasses.replace(run, patch_size=settings.patch_size or run.patch_size)
    site = SiteConfig(population="GLI", data_dir=data / "GLI", work_dir=work / "site")
    results: dict[str, Any] = {"settings": dataclasses.asdict(settings)}

    sections: dict[str, float] = {}
    results["section_seconds"] = sections

    @contextmanager
    def section(name: str) -> Iterator[None]:
        log.info("%s", name)
        t0 = time.perf_counter()
        yield
        sections[name] = time.perf_counter() - t0

    cores = os.cpu_count() or 1
    results["steps"] = {}
    for n in sorted({threads, cores}):
        with section(f"training steps on the CPU, {n} thread(s)"), torch_threads(n):
            results["steps"][f"cpu, {n} thread{'s' if n > 1 else ''}"] = measure_steps(
                site, train_run, settings.step_reps, torch.device("cpu"))
    if torch.cuda.is_available():
        with section("training steps on the GPU"):
            results["steps"]["cuda"] = measure_steps(site, dataclasses.replace(train_run,
                                                                               device="auto"),
                                                     settings.step_reps, torch.device("cuda"))
    # a finished teacher for the site (short schedule; only distill_round's cost matters here)
    prof_run = dataclasses.replace(train_run, teacher_epochs=1, teacher_steps_per_epoch=2)
    if settings.profile_steps:
        prof_run = dataclasses.replace(prof_run, local_steps=settings.profile_steps)
    with section("profile of one distillation round"):
        train_teacher(site, prof_run)
        state0 = {k: v.clone() for k, v in new_student(prof_run).net.state_dict().items()}
        results["profile"], trained = profile_round(site, prof_run, state0)
    with section("peak memory of a site process"):
        results["memory"] = measure_memory(site, prof_run, threads)
    with section("bytes per round"):
        names = ["student-tiny", "student-cpu", "student-gpu"]
        results["bytes"] = measure_bytes(sorted({*names, run.student_model}, key=names.index))
    with section("inference on one case"):
        results["inference"] = measure_inference(settings, work, run, trained)
    results["simulation"] = None
    if settings.simulation:
        with section("simulation against one process"):
            results["simulation"] = measure_simulation(settings, work)
    results["phase2"] = None
    if settings.phase2_rounds:
        with section("phase 2 at demo scale: simulation against one process"):
            results["phase2"] = measure_phase2(settings, work, cores)
    results["deployment"] = None
    if settings.deploy_cases:
        with section("deployment rounds against simulation rounds"):
            results["deployment"] = measure_deployment(work, cases=settings.deploy_cases,
                                                       preset=settings.preset, threads=cores)
    machine = {**machine, "load_average_end": machine_info()["load_average"]}
    return write_report(results, out_dir, command, time.perf_counter() - start, machine, prefix)


def summary_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """(figure, measured, against, ratio) rows of the headline table."""
    cpu = next(iter(results["steps"].values()))
    s = cpu["seconds"]
    rows = [
        ["distillation step / supervised step (same student, same batch)",
         f"{s['distillation'] * 1e3:.0f} ms", f"{s['supervised'] * 1e3:.0f} ms",
         f"{cpu['ratio_distillation_over_supervised']:.2f}"],
    ]
    if "distillation_kept" in s:
        rows.append(["the same with the teacher's outputs kept (teacher-cache) / a supervised step",
                     f"{s['distillation_kept'] * 1e3:.0f} ms", f"{s['supervised'] * 1e3:.0f} ms",
                     f"{cpu['ratio_kept_distillation_over_supervised']:.2f}"])
    sim = results.get("simulation")
    if sim:
        rows += [
            ["simulation wall time / same training steps in one plain loop",
             f"{sim['simulation_seconds']:.1f} s", f"{sim['plain_loop_seconds']:.1f} s",
             f"{sim['ratio_simulation_over_plain_loop']:.1f}"],
            ["simulation wall time / whole protocol in one process",
             f"{sim['simulation_seconds']:.1f} s", f"{sim['in_process_protocol_seconds']:.1f} s",
             f"{sim['ratio_simulation_over_protocol']:.1f}"],
        ]
    else:
        rows.append(["simulation wall time / same training steps in one plain loop",
                     "not run (--quick)", "-", "n/a"])
    p2 = results.get("phase2")
    if p2:
        rows.append([f"phase 2 at demo scale ({p2['preset']}, 5 sites, {p2['rounds']} rounds): "
                     "simulation / the same rounds in one process",
                     f"{p2['simulation_seconds']:.1f} s", f"{p2['in_process_seconds']:.1f} s",
                     f"{p2['ratio']:.2f}"])
    dep = results.get("deployment")
    if dep:
        rows.append([f"a deployment round / the same round in the simulation ({dep['preset']}, "
                     f"one site of {dep['cases']} {'x'.join(map(str, dep['shape']))} cases, "
                     "rounds 2..)", f"{dep['deployment_later_mean']:.1f} s",
                     f"{dep['simulation_later_mean']:.1f} s", f"{dep['ratio']:.2f}"])
    for name, b in results["bytes"].items():
        rows.append([f"bytes per site per round ({name}, sent + returned) / 2 x float32 size",
                     f"{2 * b['train_instruction_bytes']:,} B", f"{2 * b['float32_bytes']:,} B",
                     f"{b['ratio_train_round_over_2x_float32']:.3f}"])
        if "float16_instruction_bytes" in b:
            rows.append([f"the same with transfer-dtype float16 ({name})",
                         f"{2 * b['float16_instruction_bytes']:,} B",
                         f"{2 * b['float32_bytes']:,} B",
                         f"{b['ratio_float16_train_round_over_2x_float32']:.3f}"])
    inf = results["inference"]
    shape = "x".join(map(str, inf["input_shape"]))
    rows += [
        [f"inference, one {shape} case: student / five-teacher ensemble",
         f"{inf['seconds']['student']:.2f} s", f"{inf['seconds']['ensemble']:.2f} s",
         f"{inf['ratio_student_over_ensemble']:.3f}"],
        [f"inference, one {shape} case: predict_case / sliding_window_inference",
         f"{inf['seconds']['predict']:.2f} s", f"{inf['seconds']['student']:.2f} s",
         f"{inf['ratio_predict_over_direct']:.1f}"],
    ]
    mem = results["memory"]["peak_mib_after"]
    rows.append([f"peak memory of a site process ({results['settings']['preset']}) / "
                 "libraries only", f"{mem['evaluate']:.0f} MiB", f"{mem['imports']:.0f} MiB",
                 f"{results['memory']['ratio_peak_over_imports']:.2f}"])
    for dev, st in results["steps"].items():
        v = st["voxels_per_second"]
        rows.append([f"throughput ({dev}): distillation / teacher training (voxels/s)",
                     f"{v['distillation']:,.0f}", f"{v['teacher']:,.0f}",
                     f"{st['ratio_distillation_over_teacher_throughput']:.2f}"])
    return rows


SUMMARY_HEADER = ["figure", "measured", "against", "ratio"]


def plot_perf(results: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    rows = [r for r in summary_rows(results) if r[3] != "n/a"]
    labels = [r[0] for r in rows]
    ratios = [float(r[3]) for r in rows]
    phases = results["profile"]["phases_cumulative_s"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 0.45 * len(rows) + 4.5),
                                  gridspec_kw={"height_ratios": [len(rows), 4]})
    ax.barh(range(len(rows)), ratios, color="tab:blue")
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(ratios):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlabel("ratio (log scale; 1 = same cost)")
    ax.set_title("fedbrats costs, each against its baseline, measured side by side")
    names = list(phases)
    ax2.barh(range(len(names)), [phases[n] for n in names], color="tab:orange")
    ax2.set_yticks(range(len(names)), names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel(f"seconds in one distillation round of {results['profile']['local_steps']} "
                   "local steps (cProfile, cumulative)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Any], out_dir: Path, command: str, seconds: float,
                 machine: Mapping[str, Any], prefix: str = "perf") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{prefix}.json", "markdown": out_dir / f"{prefix}.md",
             "png": out_dir / f"{prefix}.png"}
    paths["json"].write_text(json.dumps({"command": command, "seconds": seconds,
                                         "machine": dict(machine), **results}, indent=1,
                                        default=float))
    plot_perf(results, paths["png"])
    preset = results["settings"]["preset"]
    lines = [
        "# Performance benchmark: what fedbrats costs",
        "",
        *machine_markdown(machine, command, seconds),
        "",
        "Each figure is a ratio of two things measured side by side in the same run, so that "
        "the load of other work on the machine cancels as far as possible.",
        "",
        "## Summary",
        "",
        md_table(SUMMARY_HEADER, summary_rows(results), ["l", "r", "r", "r"]),
        "",
        f"![ratios and where a distillation round's time goes]({paths['png'].name})",
        "",
    ]
    lines += _md_steps(results)
    lines += _md_simulation(results.get("simulation"))
    lines += _md_phase2(results.get("phase2"))
    lines += md_deployment(results.get("deployment"))
    lines += _md_bytes(results)
    lines += _md_inference(results["inference"])
    lines += _md_memory(results)
    lines += _md_profile(results["profile"], preset)
    lines += [f"Raw numbers: [`{paths['json'].name}`]({paths['json'].name}).", ""]
    paths["markdown"].write_text("\n".join(lines))
    return paths


def _md_steps(results: Mapping[str, Any]) -> list[str]:
    st = next(iter(results["steps"].values()))
    preset = results["settings"]["preset"]
    run = _run_config(preset)
    lines = [
        "## Training steps and throughput",
        "",
        f"Preset `{preset}`: student `{run.student_model}`, teacher `{run.teacher_model}`, "
        f"one batch of {st['batch']} crops of {'x'.join(map(str, st['crop']))} voxels from a "
        f"GLI site, the same batch for every step; median of {st['reps']} interleaved "
        "repetitions after a warm-up. The distillation step is `distill_round`'s loop body "
        "(teacher forward without gradients, student forward on the modality-dropped input, "
        "projector, supervised + logit + feature loss, backward, Adam); the supervised step "
        "is the same student on the same input with Dice + CE only; the teacher step trains "
        "the teacher network with Dice + CE (AdamW), as `train_teacher` does.",
        "",
    ]
    rows = []
    for dev, s in results["steps"].items():
        for k in ("supervised", "distillation", "teacher"):
            rows.append([dev, k, f"{s['seconds'][k] * 1e3:.0f}",
                         f"{s['voxels_per_second'][k]:,.0f}"])
    lines += [md_table(["device", "step", "ms per step", "voxels / s"], rows,
                       ["l", "l", "r", "r"]), ""]
    if not any(k.startswith("cuda") for k in results["steps"]):
        lines += ["No GPU on this machine (`torch.cuda.is_available()` is False): GPU "
                  "throughput not measured; the same command measures it where there is one.",
                  ""]
    return lines


def _md_simulation(sim: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Simulation against one process", ""]
    if sim:
        lines += [
            f"`run_simulation` (Flower's simulation engine on Ray, `tiny` preset, "
            f"{len(sim['sites'])} sites, {sim['rounds']} rounds, phantoms at 48^3) against, in "
            "this process: (a) the same training steps in one plain PyTorch loop "
            f"({sim['teacher_steps_per_site']} teacher steps per site, then "
            f"{sim['rounds']} x {sim['local_steps']} distillation steps per site, data loaded "
            "once); (b) the whole protocol with the site functions (site info, "
            "`train_teacher`, `distill_round` + the mean + `evaluate_site` every round, the "
            "final evaluation with the teacher and missing contrasts).",
            "",
            md_table(["run", "seconds"], [
                ["simulation (SuperLink, Ray, one process per message)",
                 f"{sim['simulation_seconds']:.1f}"],
                ["(a) plain loop, training steps only", f"{sim['plain_loop_seconds']:.1f}"],
                ["(b) whole protocol in one process", f"{sim['in_process_protocol_seconds']:.1f}"],
            ], ["l", "r"]),
            "",
            f"Ratios: simulation / (a) = {sim['ratio_simulation_over_plain_loop']:.1f}, "
            f"simulation / (b) = {sim['ratio_simulation_over_protocol']:.1f}. At this size the "
            "simulation's time is start-up: the SuperLink, Ray, and a fresh `flwr-clientapp` "
            "process (importing torch and MONAI, reading the site's data) for every message.",
            "",
        ]
    else:
        lines += ["Not run with `--quick` (it starts a SuperLink and Ray).", ""]
    return lines


def md_deployment(dep: Mapping[str, Any] | None) -> list[str]:
    """The markdown section of :func:`measure_deployment`'s result."""
    lines = ["## Deployment rounds against simulation rounds", ""]
    if not dep:
        return lines + ["Not run with `--quick`.", ""]
    shape = "x".join(map(str, dep["shape"]))
    lines += [
        f"One GLI site of {dep['cases']} phantoms of {shape} voxels (BraTS size, 1 mm), preset "
        f"`{dep['preset']}` ({dep['local_steps']} local steps a round), {dep['threads']} torch "
        f"threads, {dep['rounds']} rounds (evaluated in the last), the same settings "
        f"(`{config_text(dep['settings'])}`) in both. Deployment: the rehearsal (TLS, node "
        "authentication, a SuperLink and the site's SuperNode; Flower starts a fresh ClientApp "
        "process for every message), the simulation's finished teacher copied to the site (phase "
        "1 not measured), its own case cache built in round 1. Simulation: Flower's simulation "
        "engine (one Ray actor that stays up). A round's time is the server's `train_seconds` "
        "(`rounds.json`: from handing the messages to Flower to having the reply); at the site "
        "`process_age_s` is the ClientApp process's age when the message reached the handler "
        "(in deployment: its start and imports), `first_step_s` from there to the first training "
        "step and `round_s` the whole round at the site.",
        "",
    ]
    rows = []
    for name in ("simulation", "deployment"):
        for i, (sec, st) in enumerate(zip(dep[f"{name}_round_seconds"],
                                          dep["round_start"][name], strict=False)):
            rows.append([name, str(i + 1), f"{sec:.1f}",
                         f"{st['process_age_s']:.1f}" if name == "deployment" else "(actor)",
                         f"{st['first_step_s']:.2f}",
                         f"{st['round_s']:.1f}" if st.get("round_s") is not None else "n/a"])
    lines += [md_table(["engine", "round", "round (s)", "process age (s)", "first step (s)",
                        "at the site (s)"], rows, ["l", "r", "r", "r", "r", "r"]), ""]
    lines += [f"Rounds 2..{dep['rounds']}: deployment {dep['deployment_later_mean']:.1f} s, "
              f"simulation {dep['simulation_later_mean']:.1f} s, ratio **{dep['ratio']:.2f}**.",
              ""]
    return lines


def config_text(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def _md_phase2(p2: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Phase 2 at demo scale: the simulation's own cost", ""]
    if not p2:
        return lines + ["Not run with `--quick`.", ""]
    return lines + [
        f"`make demo`'s five sites and phantoms, preset `{p2['preset']}`, {p2['rounds']} "
        f"distillation rounds (evaluated every {p2['eval_every']}), the teachers trained first "
        "(not timed). Phase 2's wall time in the simulation (`phases.json`) against the same "
        "rounds with the site functions in this process (`distill_round` per site, the "
        "server's mean, `evaluate_site` on the evaluated rounds), both running one site at a "
        f"time with {p2['cores']} torch thread(s): the ratio is what Ray, the SuperLink and the "
        "messages add.",
        "",
        md_table(["run", "seconds"], [
            ["simulation, one site at a time (each virtual site gets every core)",
             f"{p2['simulation_seconds']:.1f}"],
            ["the same rounds in one process", f"{p2['in_process_seconds']:.1f}"],
            ["simulation as `make demo` runs it (one core per site, sites in parallel)",
             f"{p2['simulation_demo_seconds']:.1f}"],
        ], ["l", "r"]),
        "",
        f"Ratio: {p2['ratio']:.2f}.",
        "",
    ]


def _md_bytes(results: Mapping[str, Any]) -> list[str]:
    sim = results.get("simulation")
    lines = [
        "## Bytes per site and round",
        "",
        "A round sends each site the global student (train instruction) and gets its update "
        "back; the per-round evaluation sends the student once more. Bytes are those of the "
        "Flower `ArrayRecord` as it travels (`deflate()` of the record and of every array and "
        "chunk, as the SuperLink's object store moves them).",
        "",
    ]
    rows = []
    for name, b in results["bytes"].items():
        rows.append([name, f"{b['parameters']:,}", f"{b['float32_bytes']:,}",
                     f"{b['train_instruction_bytes']:,}", f"{b['update_bytes']:,}",
                     f"{b['evaluate_instruction_bytes']:,}",
                     f"{b['ratio_train_round_over_2x_float32']:.4f}",
                     f"{b['ratio_with_evaluation_over_2x_float32']:.3f}",
                     f"{b.get('float16_instruction_bytes', 0):,}",
                     f"{b.get('ratio_float16_train_round_over_2x_float32', float('nan')):.4f}"])
    lines += [md_table(["student", "parameters", "float32 bytes", "sent (train)", "returned",
                        "sent (evaluate)", "(sent + returned) / 2x float32",
                        "with evaluation / 2x float32", "sent, float16",
                        "float16 (sent + returned) / 2x float32"], rows, ["l"] + ["r"] * 9),
              "", "`transfer-dtype = \"float16\"` sends and returns the copies in float16 "
              "(integer arrays unchanged); the server keeps and aggregates float32.", ""]
    if sim and sim["audit_update_bytes"]:
        ups = sim["audit_update_bytes"]
        tiny = results["bytes"].get("student-tiny")
        lines += [f"In the simulation run, every update in `audit.jsonl` carried "
                  f"{min(ups):,}-{max(ups):,} bytes of array data"
                  + (f" (student-tiny float32 size {tiny['float32_bytes']:,})" if tiny else "")
                  + "; the teachers and their files were never sent.", ""]
    return lines


def _md_inference(inf: Mapping[str, Any]) -> list[str]:
    return [
        "## Inference on one case",
        "",
        f"One phantom case of {'x'.join(map(str, inf['input_shape']))} voxels "
        f"({'1 mm' if inf['input_shape'][0] >= 240 else 'phantom grid'}), segmented at the "
        f"model's grid ({inf['spacing_mm'][0]:g} mm: {'x'.join(map(str, inf['model_grid']))} "
        f"voxels after cropping to the brain), windows of {'x'.join(map(str, inf['patch']))}, "
        f"overlap {inf['overlap']}, Gaussian blending, median of {inf['reps']}. The student "
        f"`{inf['student']}` against five `{inf['teacher']}` teachers whose softmax outputs "
        "are averaged (both as MONAI `sliding_window_inference` on the preprocessed image); "
        "and `fedbrats.common.inference.predict.predict_case` (read the NIfTI files, check, "
        "preprocess, "
        "sliding-window inference, resample the probabilities back onto the 1 mm input grid, "
        "post-process) against `sliding_window_inference` of the same network alone.",
        "",
        md_table(["step", "seconds"], [
            ["read + preprocess (`prepare_case`)", f"{inf['seconds']['prepare']:.2f}"],
            ["student, sliding-window inference", f"{inf['seconds']['student']:.3f}"],
            ["five-teacher ensemble, sliding-window inference",
             f"{inf['seconds']['ensemble']:.3f}"],
            ["`predict_case`, end to end", f"{inf['seconds']['predict']:.2f}"],
        ], ["l", "r"]),
        "",
    ]


def _md_memory(results: Mapping[str, Any]) -> list[str]:
    mem = results["memory"]
    preset = results["settings"]["preset"]
    return [
        "## Peak memory of a site process",
        "",
        f"A fresh Python process imports what a site process imports (torch, MONAI, Flower, "
        f"the ClientApp), loads a GLI site of {results['settings']['site_cases']} phantom cases "
        f"at {results['settings']['site_shape']}^3 into its cache, runs `distill_round` "
        f"({mem['local_steps']} local steps, `{preset}` networks) and `evaluate_site`; "
        "its peak resident set (`VmHWM`) after each phase:",
        "",
        md_table(["after", "peak RSS (MiB)"],
                 [[k, f"{v:.0f}"] for k, v in mem["peak_mib_after"].items()], ["l", "r"]),
        "",
    ]


def _md_profile(prof: Mapping[str, Any], preset: str) -> list[str]:
    return [
        "## Where the time of a distillation round goes",
        "",
        f"One `distill_round` of {prof['local_steps']} local steps (`{preset}` preset, GLI "
        f"site): {prof['round_seconds']:.2f} s without a profiler, "
        f"{prof['cprofile_seconds']:.2f} s under cProfile.",
        "",
        md_table(["phase (cProfile, cumulative)", "seconds", "share"],
                 [[k, f"{v:.2f}", f"{v / prof['cprofile_seconds']:.0%}"]
                  for k, v in prof["phases_cumulative_s"].items()], ["l", "r", "r"]),
        "",
        "Top operators by self CPU time (`torch.profiler`):",
        "",
        md_table(["operator", "calls", "self s", "share"],
                 [[f"`{e['op']}`", e["calls"], f"{e['self_s']:.3f}", f"{e['share']:.1%}"]
                  for e in prof["top_ops_by_self_cpu"]], ["l", "r", "r", "r"]),
        "",
        "Top Python functions by self time (cProfile):",
        "",
        md_table(["function", "calls", "self s", "cumulative s"],
                 [[f"`{e['function']}`", e["calls"], f"{e['self_s']:.3f}",
                   f"{e['cumulative_s']:.3f}"] for e in prof["top_functions_by_self_time"]],
                 ["l", "r", "r", "r"]),
        "",
    ]


def _run(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    if args.simulation is not None:
        settings = dataclasses.replace(settings, simulation=args.simulation)
    out, work = resolve_dirs(args, "perf")
    extra = {}
    if args.simulation is not None:
        extra["simulation" if args.simulation else "no-simulation"] = True
    paths = run_perf(settings, out, work, command_line("perf", args, extra), threads=args.threads)
    results = json.loads(paths["json"].read_text())
    print(f"perf benchmark in {results['seconds'] / 60:.1f} min")
    print(md_table(SUMMARY_HEADER, summary_rows(results), ["l", "r", "r", "r"]))
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def register_perf(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "perf",
        help="cost ratios: distillation step, simulation, bytes, inference, memory, throughput",
        description=(
            "Measure what fedbrats costs, each figure against a baseline in the same run: a "
            "distillation step against a supervised step; Flower simulation wall time against "
            "the same work in one process; bytes per site and round against the student's "
            "float32 size; inference time of the student against the five-teacher ensemble and "
            "of predict_case against MONAI's sliding_window_inference (one 240x240x155 case); "
            "peak memory of a site process; voxels/s of teacher training and distillation (and "
            "on a GPU if there is one); and a profile of one distillation round. Writes "
            "OUT/perf.md, perf.json and perf.png. The full run takes a few minutes on two CPU "
            "cores; --quick takes seconds and skips the simulation."
        ),
    )
    add_common_arguments(p, "perf")
    p.add_argument("--simulation", dest="simulation", action="store_true", default=None,
                   help="also run the simulation comparison (default in the full run)")
    p.add_argument("--no-simulation", dest="simulation", action="store_false",
                   help="skip the simulation comparison (default with --quick)")
    p.set_defaults(func=_run)
    return p


__all__ = [
    "FULL",
    "QUICK",
    "PerfSettings",
    "fmt_mean_sd",
    "machine_info",
    "md_table",
    "mean_sd",
    "register_perf",
    "run_perf",
]
