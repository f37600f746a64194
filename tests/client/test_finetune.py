"""A site's own model: volume-stratified folds, early stopping on the held-out fold, the
personalised student file, and ``fedbrats finetune``. Real phantoms, the tiny preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrats.client.finetune import (
    FinetuneError,
    FinetuneSettings,
    _fit,
    finetune_site,
    personal_payload,
    stratified_folds,
    tumour_volume_mm3,
)
from fedbrats.common.cli import main
from fedbrats.common.config import PRESETS, SiteConfig
from fedbrats.common.data.cases import discover_cases
from fedbrats.common.inference.modelfile import load_student, student_payload
from fedbrats.common.networks.models import build_network, student_spec
from fedbrats.common.utils.files import save_atomic
from fedbrats.simulation.phantoms import write_dataset

RUN = dataclasses.replace(PRESETS["tiny"], device="cpu")
QUICK = FinetuneSettings(folds=3, max_steps=6, eval_every=2, patience=2)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    write_dataset(root, {"SSA": 6}, shape=(40, 40, 40), seed=2, progress=False)
    return root / "SSA"


@pytest.fixture(scope="module")
def student_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "student.pt"
    save_atomic(path, student_payload(RUN, build_network(student_spec(RUN)).state_dict(), 3))
    return path


class _Case:
    def __init__(self, case_id):
        self.case_id = case_id


def test_folds_are_stratified_by_volume_and_balanced():
    cases = [_Case(f"c{i:02d}") for i in range(11)]
    volumes = [float(v) for v in (5, 90, 20, 70, 40, 10, 80, 30, 60, 50, 100)]
    folds = stratified_folds(cases, volumes, 3, seed=1)
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert sorted(c.case_id for f in folds for c in f) == sorted(c.case_id for c in cases)
    by_id = {c.case_id: v for c, v in zip(cases, volumes)}
    ranks = {cid: r for r, cid in enumerate(sorted(by_id, key=by_id.get))}
    for fold in folds:  # one case from each block of three neighbours by volume
        blocks = sorted(ranks[c.case_id] // 3 for c in fold)
        assert len(set(blocks)) == len(blocks)
    assert [[c.case_id for c in f] for f in stratified_folds(cases, volumes, 3, seed=1)] == \
        [[c.case_id for c in f] for f in folds]  # seeded
    with pytest.raises(FinetuneError, match="4 folds of 3 training cases"):
        stratified_folds(cases[:3], volumes[:3], 4, 0)


def test_tumour_volume_in_mm3(site_dir):
    import nibabel as nib

    case = discover_cases(site_dir)[0]
    seg = nib.load(str(case.seg))
    voxel = float(np.prod(seg.header.get_zooms()[:3]))
    assert tumour_volume_mm3(case) == pytest.approx(
        np.count_nonzero(np.asarray(seg.dataobj)) * voxel)


def test_early_stopping_keeps_the_best_step_of_the_held_out_curve(site_dir, tmp_path):
    from fedbrats.common.data.transforms import build_dataset, kept_cases, training_dataset
    from fedbrats.common.networks.models import new_student

    site = SiteConfig("SSA", site_dir, tmp_path)
    cases = discover_cases(site_dir)
    spacing = (RUN.spacing,) * 3
    train = training_dataset(kept_cases(cases[:4], spacing, tmp_path / "c"), (RUN.patch_size,) * 3)
    held = build_dataset(cases[4:], spacing, None, cache_dir=tmp_path / "c")
    start = new_student(RUN, "SSA").net.state_dict()
    fit = _fit(RUN, site, start, train, dataclasses.replace(QUICK, patience=10), torch.device(
        "cpu"), held_ds=held, seed=0)
    steps = [p["step"] for p in fit.curve]
    assert steps == [0, 2, 4, 6]
    best = max(fit.curve, key=lambda p: p["dice"])  # the first of equal maxima
    assert fit.best_step == best["step"]
    if fit.best_step == 0:  # the student itself kept
        assert all(torch.equal(fit.state[k], v) for k, v in start.items())


def test_finetune_a_site_and_write_a_student_file_of_the_same_format(site_dir, student_file,
                                                                      tmp_path):
    site = SiteConfig("SSA", site_dir, tmp_path / "work")
    base = torch.load(student_file, weights_only=True)
    state = load_student(student_file).network.state_dict()
    result = finetune_site(RUN, site, state, QUICK)
    assert result.num_train + result.num_val == 6 and len(result.folds) == 3
    held = sorted(c["case_id"] for f in result.folds for c in f["held_out"])
    assert len(held) == result.num_train == len(set(held))  # each training case held out once
    assert result.steps == int(np.median([f["best_step"] for f in result.folds]))
    assert set(result.global_scores) == set(result.personal_scores) == {"WT", "TC", "ET"}
    path = tmp_path / "personal.pt"
    save_atomic(path, personal_payload(RUN, result, base, site, QUICK))
    personal = load_student(path, population="SSA")
    assert personal.round == 3 and personal.spec == load_student(student_file).spec
    record = json.loads(torch.load(path, weights_only=True)["personalised"])
    assert record["population"] == "SSA" and record["steps"] == result.steps
    # the other populations' heads are the federated student's
    others = [k for k in state if ".population_heads.GLI." in k]
    assert others and all(torch.equal(personal.network.state_dict()[k], state[k])
                          for k in others)


def test_too_few_cases_say_so(tmp_path, student_file):
    write_dataset(tmp_path, {"MET": 2}, shape=(40, 40, 40), seed=3, progress=False)
    with pytest.raises(FinetuneError, match="2 labelled case\\(s\\); fine-tuning needs at least 3"):
        finetune_site(RUN, SiteConfig("MET", tmp_path / "MET", tmp_path / "w"),
                      load_student(student_file).network.state_dict(), QUICK)
    with pytest.raises(ValueError, match="folds: expected an integer >= 2"):
        FinetuneSettings(folds=1)


def test_the_command(site_dir, student_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(student_file), "--site", str(site_dir), "--out",
               str(out), "--folds", "2", "--max-steps", "4", "--eval-every", "2", "--device",
               "cpu"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "# SSA: the federated student fine-tuned on the site's cases" in stdout
    assert (out / "student.pt").exists() and (out / "finetune.json").exists()
    assert load_student(out / "student.pt").round == 3
    assert main(["finetune", "--model", str(student_file), "--site", str(tmp_path / "none"),
                 "--out", str(out), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err
