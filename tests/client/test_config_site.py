"""Run settings and the site's plain functions, without Flower."""

import tomllib
from pathlib import Path

import pytest
import torch

from fedbrats.client.data import split_cases
from fedbrats.client.distill import modality_dropout, student_input
from fedbrats.common.config import ConfigError, load_run_config, site_from_node_config
from fedbrats.common.data.cases import Case


def _pyproject_config():
    root = Path(__file__).resolve().parents[2]
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_config_is_the_cpu_demo_preset():
    run = load_run_config(_pyproject_config())
    assert run.preset == "cpu-demo" and run.teacher_model == "teacher-cpu"


def test_every_run_setting_can_be_given_to_flwr_run():
    """`flwr run -c` (and so `fedbrats simulate --set`) accepts only keys that the app's
    [tool.flwr.app.config] has: each run setting needs its key there."""
    import dataclasses

    from fedbrats.common.config import RunConfig

    keys = set(_pyproject_config())
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    assert sorted(fields - keys) == [] and sorted(keys - fields) == []
    unset = load_run_config(_pyproject_config())
    assert unset == load_run_config({})  # an empty key keeps the preset's value


def test_preset_then_overrides():
    run = load_run_config({**_pyproject_config(), "preset": "tiny", "num-rounds": 5})
    assert (run.teacher_model, run.num_rounds, run.local_steps) == ("teacher-tiny", 5, 2)
    assert load_run_config({"modality-dropout": "false"}).modality_dropout is False
    # the final evaluation uses flip TTA unless asked not to; the tests' preset never does
    assert load_run_config({}).final_tta is True
    assert load_run_config({"final-tta": "false"}).final_tta is False
    assert load_run_config({"preset": "tiny"}).final_tta is False


def test_eval_every_picks_the_evaluated_rounds_and_always_the_last():
    run = load_run_config({"num-rounds": 12, "eval-every": 5})
    assert [r for r in range(1, 13) if run.evaluates_round(r)] == [5, 10, 12]
    every = load_run_config({"num-rounds": 3, "eval-every": 1})
    assert [r for r in range(1, 4) if every.evaluates_round(r)] == [1, 2, 3]


@pytest.mark.parametrize("cfg,match", [
    ({"num-round": 3}, "did you mean 'num-rounds'"),
    ({"preset": "cpu"}, "unknown preset 'cpu'"),
    ({"strategy": "fedsgd"}, "run setting strategy: expected fedavg or fedprox or fedadam"),
    ({"patch-size": 30}, "patch-size: expected a multiple of 8"),
    ({"num-rounds": 2.5}, "expected an integer"),
    ({"student-model": "studnt-cpu"}, "student-model"),
    ({"kd-mask": "confident"}, "kd-mask: expected none or teacher-correct"),
    ({"kd-mask": "teacher-correct"}, "kd-mask: expected none with kd-trust region"),
    ({"eval-every": 0}, "eval-every: expected an integer >= 1, got 0"),
])
def test_bad_settings_are_named(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(cfg)


def test_site_from_node_config():
    run = load_run_config({"preset": "tiny", "output-dir": "out", "data-root": "d"})
    sim = site_from_node_config({"partition-id": 3, "num-partitions": 5}, run)
    assert sim.population == "MEN" and sim.data_dir == Path("d/MEN")
    assert sim.work_dir == Path("out/sites/MEN")
    dep = site_from_node_config(
        {"population": "met", "data-dir": "/x", "work-dir": "/w", "labels": "brats2021"}, run)
    assert dep.population == "MET" and dep.labels == "brats2021"
    with pytest.raises(ConfigError, match="missing work-dir"):
        site_from_node_config({"population": "MET", "data-dir": "/x"}, run)
    with pytest.raises(ConfigError, match="partition-id 7 has no site"):
        site_from_node_config({"partition-id": 7}, run)


def test_split_is_deterministic_and_never_empty():
    cases = [Case(f"c{i}", {}) for i in range(7)]
    train, val = split_cases(cases, 0.34, seed=0)
    assert len(val) == 2 and len(train) == 5
    assert (train, val) == split_cases(list(reversed(cases)), 0.34, seed=0)
    assert split_cases(cases[:2], 0.9, seed=0)[0]  # one case is kept for training
    with pytest.raises(Exception, match="at least 2 usable cases"):
        split_cases(cases[:1], 0.34, seed=0)


def test_modality_dropout_keeps_at_least_one_contrast():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(64, 4, 2, 2, 2)
    out = modality_dropout(x, 0.9, gen)
    kept = out[:, :, 0, 0, 0]
    assert (kept.sum(1) >= 1).all()  # never an empty input
    assert (kept == 0).any()  # and contrasts were really dropped
    assert torch.equal(modality_dropout(x, 0.0, gen), x)


def test_modality_dropout_removes_only_the_droppable_contrasts():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(256, 4, 2, 2, 2)
    kept = modality_dropout(x, 0.9, gen, channels=(0, 1))[:, :, 0, 0, 0]
    assert (kept[:, 2:] == 1).all()  # T2 and FLAIR always there
    assert (kept[:, 0] == 0).any() and (kept[:, 1] == 0).any()
    assert ((kept[:, 0] == 0) & (kept[:, 1] == 0)).any()  # both may go: two others are left
    only_flair = modality_dropout(x, 0.99, gen, channels=(0, 1, 2))[:, :, 0, 0, 0]
    assert (only_flair.sum(1) >= 1).all() and (only_flair[:, 3] == 1).all()


def test_dropout_contrasts_setting_and_the_student_input():
    run = load_run_config({})
    assert run.dropout_contrasts == "t1n,t1c,t2w" and run.dropout_channels == (0, 1, 2)
    assert load_run_config({"dropout-contrasts": "all"}).dropout_channels == (0, 1, 2, 3)
    assert load_run_config({"dropout-contrasts": "t2f, t1c"}).dropout_channels == (1, 3)
    for bad in ("flair", "t1c,t1c", "t1n,"):
        with pytest.raises(ConfigError, match="run setting dropout-contrasts: expected"):
            load_run_config({"dropout-contrasts": bad})
    x = torch.ones(256, 4, 2, 2, 2)
    seen = student_input(x, load_run_config({"dropout-prob": 0.5}), torch.Generator())
    assert (seen[:, 3] == 1).all() and (seen[:, :3] == 0).any()
    off = load_run_config({"modality-dropout": "false", "dropout-prob": 0.5})
    assert student_input(x, off, torch.Generator()) is x
