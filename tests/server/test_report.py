"""Tests of fedbrats.server.report on a small hand-built run whose expected numbers are worked out
here.

The run: four sites (GLI, SSA, PED, MET), handed over out of contract order; PED's teacher failed
(None), SSA's student has a NaN HD95 for ET, MET's teacher lacks the ET region; three rounds, two
with a federated evaluation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.server.report import mean_metrics, order_sites, summarise, summary_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _region(dice, hd95, lesion_dice=None, lesion_hd95=None, tp=1, fn=0, fp=0):
    return {
        "dice": dice,
        "hd95": hd95,
        "lesion_dice": dice - 0.05 if lesion_dice is None else lesion_dice,
        "lesion_hd95": hd95 + 5.0 if lesion_hd95 is None else lesion_hd95,
        "tp": tp,
        "fn": fn,
        "fp": fp,
    }


# Dice values chosen so that the differences are easy to check by eye.
TEACHER = {
    "GLI": {"WT": 0.900, "TC": 0.800, "ET": 0.700},
    "SSA": {"WT": 0.850, "TC": 0.750, "ET": 0.650},
    "MET": {"WT": 0.700, "TC": 0.600},  # no ET region
}
STUDENT = {
    "GLI": {"WT": 0.912, "TC": 0.766, "ET": 0.700},  # +0.012, -0.034, +0.000
    "SSA": {"WT": 0.800, "TC": 0.760, "ET": 0.600},  # -0.050, +0.010, -0.050
    "PED": {"WT": 0.600, "TC": 0.500, "ET": 0.400},  # teacher failed
    "MET": {"WT": 0.750, "TC": 0.550, "ET": 0.500},  # +0.050, -0.050, (no teacher ET)
}
HD = {"WT": 4.0, "TC": 6.0, "ET": 8.0}


def _scores(dice_by_region, hd_shift=0.0):
    return {r: _region(d, HD[r] + hd_shift) for r, d in dice_by_region.items()}


@pytest.fixture
def run_input():
    sites = {}
    for name in ("MET", "GLI", "SSA", "PED"):  # deliberately not in contract order
        sites[name] = {
            "info": {"num_train": 6, "num_val": 2, "contrasts": ["t1n", "t1c", "t2w", "t2f"]},
            "teacher": _scores(TEACHER[name]) if name in TEACHER else None,
            "student": _scores(STUDENT[name], hd_shift=1.0),
        }
    sites["SSA"]["student"]["ET"]["hd95"] = float("nan")
    sites["SSA"]["info"]["contrasts"] = ["t1c", "t2w", "t2f"]
    sites["GLI"]["student_missing"] = {
        "t1c": {r: {"dice": d - 0.2} for r, d in STUDENT["GLI"].items()},
        "t2f": {r: {"dice": d - 0.1} for r, d in STUDENT["GLI"].items()},
    }
    rounds = []
    for n in (1, 2, 3):
        entry = {
            "round": n,
            "train": {
                s: {
                    "loss": 1.5 / n + 0.1 * i,
                    "supervised": 0.8 / n,
                    "logit": 0.3,
                    "feature": 0.1,
                    "num_steps": 12,
                }
                for i, s in enumerate(("GLI", "SSA", "PED", "MET"))
            },
        }
        if n >= 2:
            entry["evaluate"] = {
                s: {r: {"dice": 0.5 + 0.1 * n} for r in REGIONS} for s in ("GLI", "SSA", "MET")
            }
        rounds.append(entry)
    rounds[0]["train"]["MET"]["loss"] = float("nan")
    run = {
        "config": {"preset": "tiny", "num_rounds": 3, "strategy": "fedavg", "aggregation": "equal",
                   "final_tta": True},
        "started": "2025-01-01T10:00:00",
        "finished": "2025-01-01T10:05:30",
        "phase_seconds": {"teachers": 120.5, "distillation": 180.0, "evaluation": 29.5},
    }
    return run, sites, rounds


def _strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def written(tmp_path, run_input):
    run, sites, rounds = run_input
    paths = write_report(tmp_path / "run", run, sites, rounds)
    return paths, run_input


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table after ``heading``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    rows = []
    seen_table = False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            seen_table = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif seen_table:
            break
    return rows[2:]  # drop header and alignment rows


def test_the_report_says_how_the_final_models_segmented(run_input, tmp_path):
    run, sites, rounds = run_input
    md = write_report(tmp_path / "a", run, sites, rounds)["markdown"].read_text()
    assert "flip test-time augmentation" in md
    plain = {**run, "config": {**run["config"], "final_tta": False}}
    md = write_report(tmp_path / "b", plain, sites, rounds)["markdown"].read_text()
    assert "no test-time augmentation" in md and "flip test-time" not in md


def test_the_missing_contrast_table_says_which_contrasts_dropout_removed(run_input, tmp_path):
    run, sites, rounds = run_input
    cases = {
        "a": ({"modality_dropout": True, "dropout_prob": 0.1, "dropout_contrasts": "t1n,t1c"},
              "modality dropout removed only t1n, t1c (each with probability 0.1)"),
        "b": ({"modality_dropout": True, "dropout_prob": 0.25, "dropout_contrasts": "all"},
              "modality dropout removed every contrast (each with probability 0.25)"),
        "c": ({"modality_dropout": False}, "trained without modality dropout"),
    }
    for folder, (settings, sentence) in cases.items():
        with_dropout = {**run, "config": {**run["config"], **settings}}
        md = write_report(tmp_path / folder, with_dropout, sites, rounds)["markdown"].read_text()
        section = md.split("## Student with one contrast removed", 1)[1].split("## ", 1)[0]
        assert sentence in section
    md = write_report(tmp_path / "d", run, sites, rounds)["markdown"].read_text()
    assert "modality dropout" not in md  # an old run.json without the settings: no claim


def test_returns_paths_and_json_is_strict(written):
    paths, (run, _, rounds) = written
    assert set(paths) == {"json", "markdown", "dice_png", "curves_png"}
    assert all(Path(p).is_file() for p in paths.values())
    text = paths["json"].read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    report = _strict_loads(text)
    assert report["run"]["config"]["preset"] == "tiny"
    assert report["populations"] == ["GLI", "SSA", "PED", "MET"]
    assert list(report["sites"]) == ["GLI", "SSA", "PED", "MET"]
    assert list(report["summary"]["populations"]) == ["GLI", "SSA", "PED", "MET"]
    assert len(report["rounds"]) == len(rounds) == 3
    # NaN inputs became null
    assert report["sites"]["SSA"]["student"]["ET"]["hd95"] is None
    assert report["rounds"][0]["train"]["MET"]["loss"] is None
    assert report["sites"]["PED"]["teacher"] is None


def test_summary_differences_are_student_minus_teacher(written):
    paths, _ = written
    summary = _strict_loads(paths["json"].read_text())["summary"]
    pops = summary["populations"]
    assert pops["GLI"]["WT"]["dice"]["difference"] == pytest.approx(0.012)
    assert pops["GLI"]["TC"]["dice"]["difference"] == pytest.approx(-0.034)
    assert pops["SSA"]["WT"]["dice"]["difference"] == pytest.approx(-0.050)
    assert pops["MET"]["WT"]["dice"]["difference"] == pytest.approx(0.050)
    for name in ("GLI", "SSA", "MET"):
        for region, t in TEACHER[name].items():
            cell = pops[name][region]["dice"]
            assert cell["teacher"] == pytest.approx(t)
            assert cell["student"] == pytest.approx(STUDENT[name][region])
            assert cell["difference"] == pytest.approx(STUDENT[name][region] - t)
            # the other metrics: HD95 is teacher HD + 1 for the student, lesion Dice follows Dice
            assert pops[name][region]["lesion_dice"]["difference"] == pytest.approx(
                STUDENT[name][region] - t
            )
            if not (name == "SSA" and region == "ET"):
                assert pops[name][region]["hd95"]["difference"] == pytest.approx(1.0)
                assert pops[name][region]["lesion_hd95"]["difference"] == pytest.approx(1.0)
    # NaN student HD95 and a missing teacher region give no difference
    assert pops["SSA"]["ET"]["hd95"] == {"teacher": 8.0, "student": None, "difference": None}
    assert pops["MET"]["ET"]["dice"]["teacher"] is None
    assert pops["MET"]["ET"]["dice"]["difference"] is None
    assert pops["MET"]["ET"]["dice"]["student"] == pytest.approx(0.5)


def test_equal_weight_mean(written):
    paths, _ = written
    mean = _strict_loads(paths["json"].read_text())["summary"]["mean"]
    wt = mean["WT"]["dice"]
    # teachers: GLI, SSA, MET; students: all four; paired differences: GLI, SSA, MET
    assert wt["teacher"] == pytest.approx((0.900 + 0.850 + 0.700) / 3)
    assert wt["student"] == pytest.approx((0.912 + 0.800 + 0.600 + 0.750) / 4)
    assert wt["difference"] == pytest.approx((0.012 - 0.050 + 0.050) / 3)
    assert (wt["n_teacher"], wt["n_student"], wt["n_paired"]) == (3, 4, 3)
    et = mean["ET"]["dice"]
    assert et["teacher"] == pytest.approx((0.700 + 0.650) / 2)
    assert et["difference"] == pytest.approx((0.0 - 0.050) / 2)
    assert mean["ET"]["hd95"]["student"] == pytest.approx((9.0 + 9.0 + 9.0) / 3)


def test_equal_weight_mean_complete_sites_equals_difference_of_means(run_input, tmp_path):
    run, sites, rounds = run_input
    complete = {k: v for k, v in sites.items() if k in ("GLI", "SSA")}
    summary = summarise(complete)
    tc = summary["mean"]["TC"]["dice"]
    assert tc["teacher"] == pytest.approx((0.800 + 0.750) / 2)
    assert tc["student"] == pytest.approx((0.766 + 0.760) / 2)
    assert tc["difference"] == pytest.approx(tc["student"] - tc["teacher"])


def test_markdown_tables(written):
    paths, _ = written
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# ")
    for fact in (
        "tiny",
        "fedavg",
        "equal",
        "3 completed of 3",
        "3 min 00 s",
        "29.5 s",
        "5 min 30 s",
    ):
        assert fact in md, fact
    rows = _table_rows(md, "Dice: teacher vs student")
    labels = [r[0] for r in rows]
    assert [lab.split()[0] for lab in labels[:-1]] == ["GLI", "SSA", "PED", "MET"]
    assert "mean (equal weight)" in labels[-1]
    assert len(rows[0]) == 1 + 3 * len(REGIONS)
    gli, ssa, ped, met, mean = rows
    assert gli[1:4] == ["0.900", "0.912", "+0.012"]
    assert gli[4:7] == ["0.800", "0.766", "-0.034"]
    assert gli[9] == "+0.000"
    assert ssa[3] == "-0.050" and ssa[6] == "+0.010"
    assert ped[1] == "—" and ped[2] == "0.600" and ped[3] == "—"
    assert met[7] == "—" and met[8] == "0.500" and met[9] == "—"
    assert mean[1] == f"{(0.900 + 0.850 + 0.700) / 3:.3f}"
    assert mean[3] == f"{(0.012 - 0.050 + 0.050) / 3:+.3f}"
    # lesion-wise Dice and HD95 tables
    lesion = _table_rows(md, "Lesion-wise Dice")
    assert lesion[0][1:4] == ["0.850", "0.862", "+0.012"]
    hd = _table_rows(md, "HD95 (mm)")
    assert hd[0][1:4] == ["4.00", "5.00", "+1.00"]
    assert hd[1][8:10] == ["—", "—"]  # SSA ET student HD95 was NaN
    assert "lower is better" in md
    # per-round loss table: one row per round, one column per site
    loss = _table_rows(md, "Training loss per round")
    assert [r[0] for r in loss] == ["1", "2", "3"]
    assert loss[0][1] == "1.5000" and loss[0][4] == "—"
    # per-round Dice: only the rounds the sites evaluated (round 1 was not, as with eval-every)
    dice = _table_rows(md, "Student WT Dice per round")
    assert [r[0] for r in dice] == ["2", "3"]
    assert dice[0][1:] == ["0.700"] * 3 and dice[1][1:] == ["0.800"] * 3
    assert "population_dice.png" in md and "training_curves.png" in md
    assert "nan" not in md.lower().replace("non", "")


def test_pngs(written):
    paths, _ = written
    for key in ("dice_png", "curves_png"):
        data = Path(paths[key]).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert 5_000 < len(data) < 150_000, (key, len(data))


def test_empty_rounds_and_sparse_sites(tmp_path):
    sites = {
        "GLI": {"teacher": None, "student": None},
        "MEN": {"teacher": {"WT": {"dice": float("nan")}}, "student": {"WT": {"dice": 0.5}}},
        "site-x": {"student": {"TC": {"dice": np.float32(0.25)}}},
        "SSA": {},
    }
    paths = write_report(tmp_path, {}, sites, [])
    report = _strict_loads(paths["json"].read_text())
    assert report["populations"] == ["GLI", "SSA", "MEN", "site-x"]
    assert report["rounds"] == []
    men = report["summary"]["populations"]["MEN"]["WT"]["dice"]
    assert men == {"teacher": None, "student": 0.5, "difference": None}
    assert report["summary"]["populations"]["site-x"]["TC"]["dice"]["student"] == 0.25
    md = paths["markdown"].read_text()
    assert "No distillation rounds" in md
    for key in ("dice_png", "curves_png"):
        assert Path(paths[key]).read_bytes().startswith(PNG_SIGNATURE)


def test_order_sites():
    assert order_sites(["zz", "MET", "aa", "GLI", "men"]) == ["GLI", "men", "MET", "aa", "zz"]


def test_mean_metrics_hand_example():
    cases = [
        {
            "WT": {"dice": 0.8, "hd95": 2.0, "tp": 1, "fn": 0, "fp": 1},
            "ET": {
                "dice": float("nan"),
                "hd95": 374.0,
                "tp": 0,
                "fn": 1,
                "fp": 0,
                "lesions": [{"dice": 0.1}],
            },
        },
        {
            "WT": {"dice": 0.6, "hd95": float("nan"), "tp": 2, "fn": 1, "fp": 0},
            "ET": {"dice": 0.5, "hd95": 4.0, "tp": 1, "fn": 0, "fp": 2},
        },
        {"WT": {"dice": 1.0, "hd95": 6.0, "tp": 1, "fn": 0, "fp": 0}},
    ]
    out = mean_metrics(cases)
    assert out["WT"]["dice"] == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    assert out["WT"]["hd95"] == pytest.approx((2.0 + 6.0) / 2)  # NaN ignored
    assert (out["WT"]["tp"], out["WT"]["fn"], out["WT"]["fp"]) == (4, 1, 1)
    assert isinstance(out["WT"]["tp"], int)
    assert out["ET"]["dice"] == pytest.approx(0.5)
    assert out["ET"]["hd95"] == pytest.approx((374.0 + 4.0) / 2)
    assert (out["ET"]["tp"], out["ET"]["fn"], out["ET"]["fp"]) == (1, 1, 2)
    assert "lesions" not in out["ET"]
    assert mean_metrics([]) == {}
    assert math.isnan(mean_metrics([{"TC": {"dice": float("nan")}}])["TC"]["dice"])


def test_summary_table(written):
    paths, (_, sites, _) = written
    report = _strict_loads(paths["json"].read_text())
    from_report = summary_table(report)
    from_sites = summary_table(sites)
    assert from_report == from_sites == summary_table(paths["json"])
    for name in ("GLI", "SSA", "PED", "MET"):
        assert f"| {name} " in from_report
    assert "+0.012" in from_report and "-0.034" in from_report
    assert "mean (equal weight)" in from_report
    full = summary_table({p: {"teacher": None, "student": None} for p in POPULATIONS})
    assert all(f"| {p} " in full for p in POPULATIONS)


def test_import_does_not_load_matplotlib():
    code = "import sys, fedbrats.server.report; assert 'matplotlib' not in sys.modules"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
