"""End to end through Flower's real simulation engine (Ray): 3 sites, tiny grid and networks,
one teacher epoch, two distillation rounds; then a restart that resumes and adds a round."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_server_mean

from fedbrats.common.config import PRESETS
from fedbrats.simulation.phantoms import write_dataset
from fedbrats.simulation.runner import run_simulation

SITES = ("GLI", "SSA", "PED")  # partitions 0, 1, 2


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_dataset(root / "data", {p: 3 for p in SITES}, shape=(48, 48, 48), seed=1,
                  progress=False)
    result = run_simulation(root / "run", root / "data", num_sites=3, preset="tiny",
                            overrides={"keep-site-updates": True,
                                       "postprocess-tuning": "population",
                                       "personalise": True}, stream=False)
    return root, result


def _audit(run_dir):
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]


def test_run_finishes_and_report_covers_every_site(sim):
    _, result = sim
    assert result.returncode == 0 and result.report is not None
    report = json.loads((result.output_dir / "report.json").read_text())
    assert list(report["sites"]) == list(SITES)
    for site in SITES:
        for who in ("student", "teacher"):
            scores = report["sites"][site][who]
            assert set(scores) == {"WT", "TC", "ET"}
            assert 0.0 <= scores["WT"]["dice"] <= 1.0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:  # the server's time from sending a round to its replies
        assert 0 < r["train_seconds"] < 600, r
        assert r.get("evaluate_seconds") is None or r["evaluate_seconds"] > 0
    for site in SITES:  # how long each site's round took to start (README, "Each site")
        train = report["rounds"][1]["train"][site]
        assert 0 < train["first_step_s"] < 600 and train["process_age_s"] > 0
        assert train["first_step_s"] < train["round_s"] < report["rounds"][1]["train_seconds"]
        assert (result.output_dir / "sites" / site / "case-cache").is_dir()
    assert (result.output_dir / "population_dice.png").stat().st_size > 1000
    assert "| GLI" in result.report.read_text()


def test_post_processing_is_tuned_by_the_sites_scores_and_written_into_the_student(sim):
    """(Before the restart test below, which runs again without these settings.) Every site
    scored the grid on its validation cases; only the scores came back; each
    population's best thresholds are in student.pt and the report."""
    from fedbrats.common.inference.modelfile import load_student
    from fedbrats.common.inference.postprocess_tuning import grid_points

    _, result = sim
    out = result.output_dir
    chosen = json.loads((out / "postprocess.json").read_text())
    assert chosen["mode"] == "population" and chosen["grid_points"] == len(grid_points())
    assert set(chosen["by_population"]) == set(SITES)
    sites = json.loads((out / "sites.json").read_text())
    for site in SITES:
        pp = sites[site]["postprocess"]
        assert pp["tuned"] >= pp["default"] - 1e-12  # the default is on the grid
        assert pp["gain"] == pytest.approx(pp["tuned"] - pp["default"])
        assert "postprocess_grid" not in sites[site]  # the raw grid is not kept
        student = load_student(out / "student.pt", population=site)
        assert student.postprocess.to_dict() == chosen["by_population"][site]
    assert "## Post-processing tuned by the federation" in result.report.read_text()


def test_each_site_keeps_its_own_fine_tuned_model_and_reports_it(sim):
    from fedbrats.common.inference.modelfile import load_student

    _, result = sim
    out = result.output_dir
    sites = json.loads((out / "sites.json").read_text())
    for site in SITES:
        personal = out / "sites" / site / "personal-student.pt"
        assert load_student(personal, population=site).round == 2
        assert set(sites[site]["personal"]) == set(sites[site]["personal_base"]) == \
            {"WT", "TC", "ET"}
        assert sites[site]["personal_steps"] >= 0
    assert not (out / "personal-student.pt").exists()  # nothing of it at the server
    assert "## The sites' own models (`personalise`)" in result.report.read_text()


def test_server_and_sites_ran_the_app_bundles_code(sim):
    _, result = sim
    code = json.loads((result.output_dir / "report.json").read_text())["run"]["code"]
    repo = Path(__file__).resolve().parents[2]
    assert set(code["sites"]) == set(SITES)  # each site says where its code came from
    where = Path(code["server"])
    # Flower's unpacked app bundle ($FLWR_HOME/apps/<fab>), not the checkout it came from
    assert where.parent.name == "apps" and where != repo, where
    assert (where / "fedbrats_bundle.py").is_file() and (where / "client" / "app.py").is_file()
    # the sites too: the Ray actors that run them get the ClientApp pickled from the engine
    assert all(Path(c) == where for c in code["sites"].values()), code["sites"]


def test_no_teacher_weights_left_any_site(sim):
    _, result = sim
    student_keys = set(torch.load(result.output_dir / "student.pt",
                                  weights_only=True)["state_dict"])
    entries = _audit(result.output_dir)
    assert {e["phase"] for e in entries} == {"info", "teacher", "round", "evaluate", "final"}
    for e in entries:
        assert "error" not in e, e
        if e["phase"] == "round":
            assert set(e["arrays"]) == student_keys  # the student, and only the student
        else:
            assert e["arrays"] == {} and e["bytes"] == 0  # facts and metrics only
    # the teacher is a different network: none of its parameter names was ever sent
    teacher = torch.load(result.output_dir / "sites" / "GLI" / "teacher.pt", weights_only=True)
    assert not set(teacher["state_dict"]) & student_keys


def test_aggregate_is_the_equal_weight_mean_of_site_updates(sim):
    """Shared weights: the mean over the sites; a population's head (the presets' student has
    one per population): its own site's update; MEN's and MET's heads, with no site here, never
    move."""
    _, result = sim
    before = None
    for rnd in (1, 2):
        updates = {s: torch.load(result.output_dir / "updates" / f"round-{rnd:03d}" / f"{s}.pt",
                                 weights_only=True) for s in SITES}
        ckpt = torch.load(result.output_dir / "checkpoints" / f"round-{rnd:03d}.pt",
                          weights_only=True)["state_dict"]
        assert_server_mean(ckpt, updates, before)
        before = ckpt
        # the sites really differed, so this is not a trivial mean
        assert any(not torch.equal(updates["GLI"][k], updates["SSA"][k]) for k in ckpt
                   if ckpt[k].is_floating_point())


def test_final_student_stands_alone(sim):
    _, result = sim
    d = torch.load(result.output_dir / "student.pt", weights_only=True)
    assert d["format"] == "fedbrats-student/1"
    assert d["channels"] == ["t1n", "t1c", "t2w", "t2f"]
    from fedbrats.common.networks.models import ModelSpec, TappedModel

    model = TappedModel.from_spec(ModelSpec.from_dict(json.loads(d["spec"])))
    model.net.load_state_dict(d["state_dict"])
    logits, _ = model(torch.zeros(1, 4, 32, 32, 32))
    assert logits.shape == (1, 4, 32, 32, 32)


def test_no_process_left_behind(sim):
    root, _ = sim
    out = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_restart_resumes_from_the_last_round_and_reuses_teachers(sim, capfd):
    """Started again through `fedbrats simulate`, as a person would: the terminal shows the
    progress display, not Flower's or Ray's output (which goes to flwr-run.log)."""
    from fedbrats.common.cli import main

    root, first = sim
    teacher_mtime = (first.output_dir / "sites" / "SSA" / "teacher.pt").stat().st_mtime
    log_size = (first.output_dir / "flwr-run.log").stat().st_size
    code = main(["simulate", "--out", str(root / "run"), "--data", str(root / "data"),
                 "--preset", "tiny", "--sites", "3", "--set", "num-rounds=3"])
    shown = capfd.readouterr()
    assert code == 0, shown.err[-3000:]
    result = first
    terminal = shown.out + shown.err
    assert "phase 1: teachers done in" in terminal
    assert "phase 2: distillation done in" in terminal and "(3/3 rounds)" in terminal
    rounds = json.loads((first.output_dir / "rounds.json").read_text())
    evaluated = [r["round"] for r in rounds if r.get("evaluate")]
    assert 3 in evaluated  # the last round is always evaluated
    for rnd in evaluated:  # every evaluated round's WT Dice, site by site
        wt = "  ".join(f"{s} {r['evaluate'][s]['WT']['dice']:.3f}" for r in rounds
                       if r["round"] == rnd for s in r["evaluate"])
        assert f"round {rnd}/" in terminal and wt in terminal, terminal[:3000]
    assert "final evaluation" in terminal and "report:" in terminal
    for noise in ("INFO", "WARNING", "FutureWarning", "raylet", "Successfully installed"):
        assert noise not in terminal, noise
    assert (first.output_dir / "flwr-run.log").stat().st_size > log_size  # they went here
    rounds = json.loads((result.output_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3]
    sites = json.loads((result.output_dir / "sites.json").read_text())
    assert all(sites[s]["teacher_training"]["reused"] == 1 for s in SITES)
    assert (first.output_dir / "sites" / "SSA" / "teacher.pt").stat().st_mtime == teacher_mtime
    # round 3 started from round 2's student: only one new round was trained
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt", "round-003.pt"]
    assert PRESETS["tiny"].num_rounds == 2

