"""A site's teacher and distillation round, and the server's run folder, without Flower.

Real phantom NIfTI files, the tiny preset, the same functions the ClientApp and ServerApp call.
"""

import dataclasses
import json
import logging

import pytest
import torch

import fedbrats.client.evaluate as evaluate_module
import fedbrats.client.teacher as teacher_module
from fedbrats.client.data import SiteError, load_site_data
from fedbrats.client.distill import PROJECTOR_FILE, distill_round
from fedbrats.client.evaluate import evaluate_site
from fedbrats.client.scoring import evaluate_model
from fedbrats.client.teacher import TEACHER_FILE, load_teacher, train_teacher
from fedbrats.common.config import PRESETS, RunConfig, SiteConfig
from fedbrats.common.data.labels import to_internal
from fedbrats.common.metrics.brats import evaluate_case
from fedbrats.common.networks.models import new_student
from fedbrats.server.state import RunFolder
from fedbrats.simulation.phantoms import write_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, {"MET": 3}, shape=(48, 48, 48), seed=5, progress=False)
    return root


def _site(data_root, tmp_path) -> SiteConfig:
    return SiteConfig(population="MET", data_dir=data_root / "MET", work_dir=tmp_path / "site")


RUN = dataclasses.replace(PRESETS["tiny"], teacher_epochs=2, num_rounds=4, kd_trust="none")
"""Distillation terms at full weight unless a test sets kd-trust (the presets trust by region)."""


def test_teacher_is_trained_once_then_reused(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    first = train_teacher(site, RUN)
    path = site.work_dir / TEACHER_FILE
    assert first["reused"] == 0 and first["epochs"] == 2 and 0 <= first["WT_dice"] <= 1
    stamp = path.stat().st_mtime_ns

    again = train_teacher(site, RUN)
    assert again["reused"] == 1 and again["WT_dice"] == first["WT_dice"]
    assert path.stat().st_mtime_ns == stamp  # not written again

    # other teacher settings: a new teacher; the student's settings do not matter
    train_teacher(site, dataclasses.replace(RUN, num_rounds=9, student_lr=0.5))
    assert path.stat().st_mtime_ns == stamp
    retrained = train_teacher(site, dataclasses.replace(RUN, teacher_lr=1e-4))
    assert retrained["reused"] == 0 and path.stat().st_mtime_ns != stamp


def test_teacher_of_an_older_training_recipe_is_retrained(data_root, tmp_path, monkeypatch):
    import fedbrats.common.config

    site = _site(data_root, tmp_path)
    config = fedbrats.common.config
    monkeypatch.setattr(config, "TEACHER_RECIPE", config.TEACHER_RECIPE - 1)
    assert train_teacher(site, RUN)["reused"] == 0
    assert train_teacher(site, RUN)["reused"] == 1
    monkeypatch.undo()  # the current code: the stored teacher came from the old recipe
    assert train_teacher(site, RUN)["reused"] == 0


def test_interrupted_teacher_resumes_from_its_last_epoch(data_root, tmp_path, caplog,
                                                        monkeypatch):
    site = _site(data_root, tmp_path)
    path = site.work_dir / TEACHER_FILE
    real_save = teacher_module.save_atomic
    calls = []

    def crash_at_second_save(target, obj):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("the site went down during epoch 2")
        real_save(target, obj)

    monkeypatch.setattr(teacher_module, "save_atomic", crash_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(site, RUN)
    monkeypatch.setattr(teacher_module, "save_atomic", real_save)
    after_crash = torch.load(path, weights_only=True)
    assert after_crash["epoch"] == 1 and not after_crash["finished"]
    with pytest.raises(SiteError, match="no finished teacher"):
        load_teacher(site, RUN, torch.device("cpu"))

    with caplog.at_level(logging.INFO, logger="fedbrats.client.teacher"):
        metrics = train_teacher(site, RUN)
    assert "resuming the teacher at epoch 2" in caplog.text
    assert "teacher epoch 1/2" not in caplog.text  # epoch 1 was not trained again
    assert metrics["reused"] == 0 and 0 <= metrics["WT_dice"] <= 1
    resumed = torch.load(path, weights_only=True)
    assert resumed["finished"] and resumed["epoch"] == 2
    assert json.loads(resumed["history"])[0] == json.loads(after_crash["history"])[0]


def test_torn_teacher_file_is_trained_again(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    path = site.work_dir / TEACHER_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 half a file")
    assert train_teacher(site, RUN)["reused"] == 0
    assert load_teacher(site, RUN, torch.device("cpu")) is not None


def test_distill_round_updates_the_student_and_keeps_the_projector_at_the_site(data_root,
                                                                             tmp_path):
    site = _site(data_root, tmp_path)
    with pytest.raises(SiteError, match="phase 1"):
        distill_round(site, RUN, new_student(RUN).net.state_dict(), server_round=1)
    train_teacher(site, RUN)
    start = {k: v.clone() for k, v in new_student(RUN).net.state_dict().items()}
    state, metrics = distill_round(site, RUN, start, server_round=1)
    assert set(state) == set(start)
    assert all(state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in start.items())
    assert any(not torch.equal(state[k], v) for k, v in start.items())
    assert metrics["num_steps"] == RUN.local_steps
    assert {"supervised", "logit", "feature", "loss"} <= set(metrics)
    assert (site.work_dir / PROJECTOR_FILE).exists()
    # the same round from the same site state gives the same update (seeded per site and round)
    (site.work_dir / PROJECTOR_FILE).unlink()
    again, _ = distill_round(site, RUN, start, server_round=1)
    assert all(torch.allclose(again[k].float(), v.float(), atol=1e-6) for k, v in state.items())

    scores = evaluate_site(site, RUN, state, with_teacher=True)
    assert scores["num_val"] == 1 and scores["teacher"] is not None
    assert set(scores["student"]) == {"WT", "TC", "ET"}


def test_evaluation_scores_on_the_grid_of_the_site_files(data_root, tmp_path):
    import nibabel as nib
    import numpy as np

    site = _site(data_root, tmp_path)
    run = dataclasses.replace(RUN, spacing=6.0)  # the files' voxels are 4 mm: another grid
    data = load_site_data(site, run)
    seen = []

    def record(pred, gt):
        seen.append((pred, gt))
        return {"WT": {"dice": 0.5}}

    model = new_student(run)
    evaluate_model(model, data.val_ds, site, run, torch.device("cpu"), score=record)
    [(pred, gt)] = seen
    seg = nib.load(data.val_cases[0].seg)
    assert pred.shape == gt.shape == seg.shape
    assert np.array_equal(gt, to_internal(np.asarray(seg.dataobj), "brats2023"))
    # the default scores are evaluate_case on that grid, with the files' voxel size
    zooms = tuple(float(z) for z in seg.header.get_zooms())
    assert zooms == (4.0, 4.0, 4.0)
    assert tuple(data.val_ds[0]["image"].shape[1:]) != seg.shape  # the model grid is coarser
    scores = evaluate_model(model, data.val_ds, site, run, torch.device("cpu"))
    assert scores == evaluate_case(pred, gt, zooms, "MET")


def test_final_tta_runs_every_model_on_the_8_flipped_copies(data_root, tmp_path, monkeypatch):
    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    state = new_student(RUN).net.state_dict()
    windows = []
    real_new_student, real_load_teacher = evaluate_module.new_student, evaluate_module.load_teacher

    def counted(model):  # the real models, with a hook that counts the windows they see
        model.register_forward_hook(lambda _m, args, _out: windows.append(args[0].shape[0]))
        return model

    monkeypatch.setattr(evaluate_module, "new_student",
                        lambda *a: counted(real_new_student(*a)))
    monkeypatch.setattr(evaluate_module, "load_teacher", lambda *a: counted(real_load_teacher(*a)))
    evaluate_site(site, RUN, state, with_teacher=True)
    plain = sum(windows)
    windows.clear()
    scores = evaluate_site(site, RUN, state, with_teacher=True, tta=True)
    assert plain > 0 and sum(windows) == 8 * plain  # student and teacher, 8 passes each
    assert set(scores["student"]) == set(scores["teacher"]) == {"WT", "TC", "ET"}


def test_fedprox_term_keeps_the_update_closer_to_the_global_student(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    run = dataclasses.replace(RUN, local_steps=4, student_lr=0.05, lr_schedule="constant")
    train_teacher(site, run)
    start = {k: v.clone() for k, v in new_student(run).net.state_dict().items()}

    def drift(mu):
        (site.work_dir / PROJECTOR_FILE).unlink(missing_ok=True)
        state, _ = distill_round(site, run, start, server_round=1, proximal_mu=mu)
        return sum(float(((state[k].float() - v.float()) ** 2).sum())
                   for k, v in start.items() if v.is_floating_point())

    assert drift(1e3) < drift(0.0)


def test_round_learning_rate_schedule():
    run = dataclasses.replace(RunConfig(), num_rounds=5, student_lr=1e-2)
    lrs = [run.round_lr(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    flat = dataclasses.replace(run, lr_schedule="constant")
    assert {flat.round_lr(r) for r in range(1, 6)} == {1e-2}


# --------------------------------------------------------------------------------------------
# The server's run folder
# --------------------------------------------------------------------------------------------


def _folder(tmp_path, **changes) -> RunFolder:
    return RunFolder(dataclasses.replace(PRESETS["tiny"], output_dir=str(tmp_path / "run"),
                                         **changes))


def test_latest_checkpoint_skips_a_torn_file(tmp_path):
    folder = _folder(tmp_path)
    assert folder.latest_checkpoint() is None
    for rnd in (1, 2):
        folder.save_checkpoint(rnd, {"w": torch.full((2,), float(rnd))},
                               {"m": {"w": torch.zeros(2)}})
    ckpt = folder.latest_checkpoint()
    assert ckpt.round == 2 and torch.equal(ckpt.state_dict["w"], torch.tensor([2.0, 2.0]))
    assert set(ckpt.strategy_state) == {"m"}
    (folder.path / "checkpoints" / "round-003.pt").write_bytes(b"torn")
    assert folder.latest_checkpoint().round == 2


def test_a_full_disk_while_writing_a_checkpoint_loses_only_that_round(tmp_path, monkeypatch):
    """A write that runs out of space half-way (ENOSPC) leaves the checkpoints before it as
    they were and no torn file behind; the error names the file; resuming takes the round
    before; the next write, with space again, succeeds."""
    import errno

    folder = _folder(tmp_path)
    folder.save_checkpoint(1, {"w": torch.ones(4)})
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    target = folder.path / "checkpoints" / "round-002.pt"
    with pytest.raises(OSError, match=f"writing {target} failed \\(No space left on device\\)"
                       ) as raised:
        folder.save_checkpoint(2, {"w": torch.full((4,), 2.0)})
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (folder.path / "checkpoints").iterdir()) == ["round-001.pt"]
    assert folder.latest_checkpoint().round == 1
    monkeypatch.setattr(torch, "save", real_save)
    folder.save_checkpoint(2, {"w": torch.full((4,), 2.0)})
    assert folder.latest_checkpoint().round == 2


def test_resume_with_another_student_is_refused(tmp_path):
    folder = _folder(tmp_path)
    folder.check_and_write_config()
    folder.save_checkpoint(1, {"w": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="student with student-model 'student-tiny'"):
        _folder(tmp_path, student_model="student-cpu").check_and_write_config()
    with pytest.raises(RuntimeError, match="student-heads 'population', but the run asks for "
                                           "'shared'"):
        _folder(tmp_path, student_heads="shared").check_and_write_config()
    _folder(tmp_path, num_rounds=7).check_and_write_config()  # other settings: allowed
    assert json.loads((folder.path / "config.json").read_text())["num_rounds"] == 7


def test_labels_only_round_needs_no_teacher(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    run = dataclasses.replace(RUN, logit_weight=0.0, feature_weight=0.0)
    start = new_student(run).net.state_dict()
    state, metrics = distill_round(site, run, start, server_round=1)
    assert not (site.work_dir / TEACHER_FILE).exists()
    assert not (site.work_dir / PROJECTOR_FILE).exists()
    assert metrics["logit"] == 0 and metrics["feature"] == 0 and metrics["supervised"] > 0
    assert any(not torch.equal(state[k], v) for k, v in start.items())


def test_teacher_correct_kd_mask_changes_the_logit_term(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    start = new_student(RUN).net.state_dict()
    _, plain = distill_round(site, RUN, start, server_round=1)
    masked_run = dataclasses.replace(RUN, kd_mask="teacher-correct")
    _, masked = distill_round(site, masked_run, start, server_round=1)
    assert masked["supervised"] > 0 and masked["logit"] >= 0
    assert masked["logit"] != pytest.approx(plain["logit"], rel=1e-3)


def test_kd_trust_weights_the_distillation_by_the_teachers_lead(data_root, tmp_path,
                                                                monkeypatch):
    import fedbrats.client.distill as distill_module

    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    start = new_student(RUN).net.state_dict()
    trusting = dataclasses.replace(RUN, kd_trust="site")
    _, metrics = distill_round(site, trusting, start, server_round=1)
    assert 0.0 <= metrics["kd_trust"] <= 1.0
    _, plain = distill_round(site, RUN, start, server_round=1)
    assert "kd_trust" not in plain
    # a teacher far behind the student: no distillation at all, the labels alone train
    monkeypatch.setattr(distill_module, "teacher_trust", lambda *a: 0.0)
    state, untrusted = distill_round(site, trusting, start, server_round=1)
    labels_only = dataclasses.replace(RUN, logit_weight=0.0, feature_weight=0.0)
    same, _ = distill_round(site, labels_only, start, server_round=1)
    assert untrusted["kd_trust"] == 0.0
    assert all(torch.allclose(state[k].float(), same[k].float(), atol=1e-6) for k in state)


def test_teacher_trust_is_half_for_a_teacher_equal_to_the_student(data_root, tmp_path):
    from fedbrats.client.distill import teacher_trust
    from fedbrats.client.teacher import load_teacher

    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    model = load_teacher(site, RUN, torch.device("cpu"))
    assert teacher_trust(site, RUN, model, model, torch.device("cpu")) == pytest.approx(0.5)


def test_kd_trust_region_weights_each_region_and_scores_the_teacher_once(data_root, tmp_path,
                                                                         monkeypatch):
    import fedbrats.client.distill as distill_module

    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    start = new_student(RUN).net.state_dict()
    regional = dataclasses.replace(RUN, kd_trust="region")
    scored = []
    real_val_dice = distill_module._val_dice
    def counted(s, r, model, d):
        scored.append(model)
        return real_val_dice(s, r, model, d)

    monkeypatch.setattr(distill_module, "_val_dice", counted)
    _, metrics = distill_round(site, regional, start, server_round=1)
    assert len(scored) == 2  # the teacher and the sent student
    weights = [metrics[f"kd_trust_{r}"] for r in ("WT", "TC", "ET")]
    assert all(0.0 <= w <= 1.0 for w in weights)
    assert metrics["kd_trust"] == pytest.approx(sum(weights) / 3)
    stored = json.loads((site.work_dir / distill_module.TEACHER_VAL_FILE).read_text())
    assert set(stored["dice"]) == {"WT", "TC", "ET"}
    # the next round scores only the student: the teacher's Dice is read back
    distill_round(site, regional, start, server_round=2)
    assert len(scored) == 3
    # a retrained teacher (another file) is scored again
    regional = dataclasses.replace(regional, teacher_lr=1e-4)
    train_teacher(site, regional)
    distill_round(site, regional, start, server_round=3)
    assert len(scored) == 5
    # no trust in any region: the labels alone train, as in a labels-only round
    monkeypatch.setattr(distill_module, "region_trust",
                        lambda *a: {"WT": 0.0, "TC": 0.0, "ET": 0.0})
    state, untrusted = distill_round(site, regional, start, server_round=1)
    assert untrusted["logit"] == 0.0 and untrusted["kd_trust"] == 0.0
    labels_only = dataclasses.replace(regional, logit_weight=0.0, feature_weight=0.0)
    same, _ = distill_round(site, labels_only, start, server_round=1)
    assert all(torch.allclose(state[k].float(), same[k].float(), atol=1e-6) for k in state)


def test_trust_weight_by_hand():
    from fedbrats.client.distill import trust_weight

    assert trust_weight(0.8, 0.8) == pytest.approx(0.5)
    assert trust_weight(0.85, 0.8) == pytest.approx(1.0)
    assert trust_weight(0.9, 0.8) == 1.0
    assert trust_weight(0.75, 0.8) == pytest.approx(0.0)
    assert trust_weight(0.82, 0.8) == pytest.approx(0.7)


def test_with_a_head_per_population_a_site_trains_and_scores_with_its_own(data_root, tmp_path):
    from fedbrats.common.networks.models import head_population

    site = _site(data_root, tmp_path)
    run = dataclasses.replace(RUN, student_heads="population", kd_trust="region")
    train_teacher(site, run)
    start = new_student(run).net.state_dict()
    state, metrics = distill_round(site, run, start, server_round=1)
    moved = {head_population(k) for k, v in state.items() if not torch.equal(v, start[k])}
    assert moved == {None, "MET"}  # the body and MET's head; every other head exactly as sent
    assert metrics["supervised"] > 0
    # the site scores with its own head: a copy of the state whose MET head is another
    # population's scores differently, one whose GLI head is changed scores the same
    scores = evaluate_site(site, run, state)["student"]
    swapped = {k: (state[k.replace(".MET.", ".GLI.")] if head_population(k) == "MET" else v)
               for k, v in state.items()}
    other = {k: (v * 0 if head_population(k) == "GLI" and v.is_floating_point() else v)
             for k, v in state.items()}
    assert evaluate_site(site, run, other)["student"] == scores
    assert evaluate_site(site, run, swapped)["student"] != scores
