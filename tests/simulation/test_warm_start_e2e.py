"""The protocol's options through Flower's simulation engine: the teachers' federated warm start
(``train.warm`` rounds averaged by the ServerApp, the teachers trained from the result, the
student starting from it), the labels-only FedAvg baseline beside the student, and a restart
that runs neither the warm start nor the finished rounds again."""

import json

import pytest
import torch

from fedbrats.simulation.phantoms import write_dataset
from fedbrats.simulation.runner import run_simulation

SITES = ("GLI", "SSA")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    write_dataset(root / "data", {p: 2 for p in SITES}, shape=(32, 32, 32), seed=2,
                  progress=False)
    overrides = {"teacher-warm-rounds": 2, "num-rounds": 1, "teacher-model": "student-tiny",
                 "student-init": "warm", "baseline": "fedavg"}
    first = run_simulation(root / "run", root / "data", num_sites=2, preset="tiny",
                           overrides=overrides, stream=False)
    audit_first = (root / "run" / "audit.jsonl").read_text().splitlines()
    sites_first = json.loads((root / "run" / "sites.json").read_text())
    second = run_simulation(root / "run", root / "data", num_sites=2, preset="tiny",
                            overrides={**overrides, "num-rounds": 2}, stream=False)
    return root / "run", first, second, audit_first, sites_first


def _phases(lines):
    return [json.loads(line) for line in lines]


def test_warm_start_rounds_ran_at_every_site_then_the_teachers(warm):
    run, first, _, audit, sites = warm
    assert first.returncode == 0
    entries = _phases(audit)
    warm_entries = [e for e in entries if e["phase"] == "warm"]
    assert sorted(e["site"] for e in warm_entries) == sorted(SITES * 2)  # 2 rounds x 2 sites
    # the sites sent back the teacher network of the warm start, nothing else
    saved = torch.load(run / "warm-start.pt", weights_only=True)
    assert saved["round"] == 2
    assert set(warm_entries[0]["arrays"]) == set(saved["state_dict"])
    first_teacher = next(i for i, e in enumerate(entries) if e["phase"] == "teacher")
    assert all(i < first_teacher for i, e in enumerate(entries) if e["phase"] == "warm")
    assert all(sites[s]["teacher_training"]["reused"] == 0 for s in SITES)


def test_restarted_run_does_not_warm_start_again(warm):
    run, _, second, audit_first, _ = warm
    assert second.returncode == 0
    entries = _phases((run / "audit.jsonl").read_text().splitlines())
    assert sum(e["phase"] == "warm" for e in entries) == sum(
        e["phase"] == "warm" for e in _phases(audit_first))
    sites = json.loads((run / "sites.json").read_text())
    assert all(sites[s]["teacher_training"]["reused"] == 1 for s in SITES)
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["config"]["teacher_warm_rounds"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]


def test_baseline_trained_on_labels_only_and_reported_beside_the_student(warm):
    run, _, _, _, _ = warm
    base = json.loads((run / "baseline" / "rounds.json").read_text())
    student = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in base] == [r["round"] for r in student] == [1, 2]
    for site in SITES:
        assert base[0]["train"][site]["logit"] == 0 and student[0]["train"][site]["logit"] > 0
    assert (run / "baseline" / "checkpoints" / "round-002.pt").exists()
    report = json.loads((run / "report.json").read_text())
    for site in SITES:
        assert 0 <= report["sites"][site]["baseline"]["WT"]["dice"] <= 1
    assert "## Dice: teacher, FedAvg baseline and student" in (run / "report.md").read_text()
