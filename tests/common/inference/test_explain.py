"""Exact contrast Shapley values: the Shapley axioms on toy games, and fedbrats explain end to end
with a real (tiny, untrained) student on real NIfTI files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_volume, save_nifti

from fedbrats.common.cli import main
from fedbrats.common.config import PRESETS
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.inference.explain import (
    coalition_name,
    dice_per_region,
    exact_shapley,
    shapley_weight,
)
from fedbrats.common.inference.modelfile import student_payload
from fedbrats.common.networks.models import build_network, student_spec
from fedbrats.common.utils.files import save_atomic

RUN = dataclasses.replace(PRESETS["tiny"], patch_size=16)  # 16^3 windows: fast
PLAYERS = ("t1n", "t1c", "t2w", "t2f")


def all_coalitions(players):
    return [frozenset(c) for k in range(len(players) + 1)
            for c in itertools.combinations(players, k)]


# --------------------------------------------------------------------------------------------
# Toy value functions
# --------------------------------------------------------------------------------------------


def test_weights_are_the_standard_ones():
    assert [shapley_weight(k, 4) for k in range(4)] == pytest.approx([1 / 4, 1 / 12, 1 / 12, 1 / 4])
    # for one player, the weights over all coalitions of the others sum to 1
    for n in range(1, 7):
        assert sum(math.comb(n - 1, k) * shapley_weight(k, n) for k in range(n)) == pytest.approx(1)
    with pytest.raises(ValueError, match="coalition size"):
        shapley_weight(4, 4)


def test_efficiency_on_a_random_game():
    rng = np.random.default_rng(0)
    table = {s: {"WT": float(rng.normal(0, 100)), "ET": float(rng.uniform())}
             for s in all_coalitions(PLAYERS)}
    calls = []

    def value(s):
        calls.append(s)
        return table[s]

    res = exact_shapley(PLAYERS, value)
    assert sorted(map(sorted, calls)) == sorted(map(sorted, table))  # each coalition once
    for key in ("WT", "ET"):
        total = sum(res.values[p][key] for p in PLAYERS)
        assert total == pytest.approx(table[frozenset(PLAYERS)][key] - table[frozenset()][key])
        assert res.efficiency()[key]["ok"]


def test_symmetric_players_get_equal_values_and_a_null_player_zero():
    # t1c and t2f are interchangeable; t1n changes nothing
    def value(s):
        strength = {"t1c": 2.0, "t2f": 2.0, "t2w": 5.0}
        base = sum(strength.get(p, 0.0) for p in s)
        bonus = 3.0 if {"t1c", "t2f"} <= s else 0.0  # an interaction, shared equally
        return {"v": base + bonus + (1.0 if "t2w" in s and "t1c" in s else 0.0)
                     + (1.0 if "t2w" in s and "t2f" in s else 0.0)}

    res = exact_shapley(PLAYERS, value)
    assert res.values["t1c"]["v"] == pytest.approx(res.values["t2f"]["v"])
    assert res.values["t1n"]["v"] == 0.0


def test_additive_game_gives_each_player_its_own_contribution():
    w = {"t1n": 1.0, "t1c": -2.0, "t2w": 3.5, "t2f": 10.0}
    res = exact_shapley(PLAYERS, lambda s: {"v": sum(w[p] for p in s) + 7.0})
    for p in PLAYERS:
        assert res.values[p]["v"] == pytest.approx(w[p])
    assert res.v_empty == {"v": 7.0}


def test_a_hand_computed_game():
    # v = 1 when a plays together with b or c: phi_a = 2/3, phi_b = phi_c = 1/6
    res = exact_shapley("abc", lambda s: {"v": float("a" in s and bool(s & {"b", "c"}))})
    assert res.values["a"]["v"] == pytest.approx(2 / 3)
    assert res.values["b"]["v"] == pytest.approx(1 / 6) == res.values["c"]["v"]


def test_inconsistent_keys_are_refused():
    with pytest.raises(ValueError, match="returned keys"):
        exact_shapley("ab", lambda s: {"x": 1.0} if s else {"y": 0.0})


def test_coalition_names_and_dice():
    assert coalition_name(frozenset({"t2f", "t1c"}), PLAYERS) == "t1c+t2f"
    assert coalition_name(frozenset(), PLAYERS) == "none"
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0, 0, :2] = 3
    pred = np.zeros_like(gt)
    pred[0, 0, 0] = 1
    assert dice_per_region(pred, gt) == {"WT": 2 / 3, "TC": 2 / 3, "ET": 0.0}
    assert dice_per_region(pred * 0, gt * 0) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


# --------------------------------------------------------------------------------------------
# End to end on a real tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    torch.manual_seed(1)
    net = build_network(student_spec(RUN))
    path = tmp_path_factory.mktemp("model") / "student.pt"
    save_atomic(path, student_payload(RUN, net.state_dict(), server_round=2))
    return path


def write_case(folder, case_id, affine, skip=()):
    images, seg = make_volume((28, 24, 20), seed=3)
    for key, arr in images.items():
        if key not in skip:
            save_nifti(folder / case_id / f"{case_id}-{key}.nii.gz", arr, affine)
    save_nifti(folder / case_id / f"{case_id}-seg.nii.gz", seg, affine)
    return folder / case_id


def test_explain_with_ground_truth(tmp_path, student_file, capsys):
    case_dir = write_case(tmp_path, "BraTS-GLI-00007-000", np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "expl"
    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir),
               "--gt", str(case_dir / "BraTS-GLI-00007-000-seg.nii.gz"), "--out", str(out),
               "--device", "cpu", "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "efficiency sum(phi) = v(all) - v(empty): ok" in stdout
    data = json.loads((out / "BraTS-GLI-00007-000_shapley.json").read_text())
    assert data["measure"] == "dice" and data["contrasts"] == list(CONTRASTS)
    assert set(data["shapley"]) == set(CONTRASTS)
    assert all(set(v) == {"WT", "TC", "ET"} for v in data["shapley"].values())
    assert len(data["coalitions"]) == 16 and data["coalitions"]["none"] == data["v_empty"]
    assert data["coalitions"]["t1n+t1c+t2w+t2f"] == data["v_all"]
    for region in ("WT", "TC", "ET"):
        eff = data["efficiency"][region]
        assert eff["ok"]
        assert sum(data["shapley"][c][region] for c in CONTRASTS) == pytest.approx(
            data["v_all"][region] - data["v_empty"][region], abs=1e-9)
        assert all(0.0 <= data["coalitions"][c][region] <= 1.0 for c in data["coalitions"])
    assert (out / "BraTS-GLI-00007-000_shapley.png").stat().st_size > 5000


def test_explain_volumes_with_a_missing_contrast(tmp_path, student_file, capsys):
    case_dir = write_case(tmp_path, "BraTS-MET-00001-000", np.diag([-2.0, -2.0, 2.0, 1.0]),
                          skip=("t1c",))
    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir),
               "--out", str(tmp_path / "expl"), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "missing t1c" in stdout
    data = json.loads((tmp_path / "expl" / "BraTS-MET-00001-000_shapley.json").read_text())
    assert data["measure"] == "volume_mm3" and data["missing_contrasts"] == ["t1c"]
    assert data["shapley"]["t1c"] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    assert any(abs(v["WT"]) > 0 for v in data["shapley"].values())  # something matters
    voxel = 8.0  # 2 mm voxels: every volume is a whole number of voxels
    assert all(v["WT"] % voxel == 0 for v in data["coalitions"].values())
    assert all(data["efficiency"][r]["ok"] for r in ("WT", "TC", "ET"))


def test_explain_errors(tmp_path, student_file, capsys):
    site = tmp_path / "site"
    write_case(site, "BraTS-GLI-00001-000", np.diag([2.0, 2.0, 2.0, 1.0]))
    write_case(site, "BraTS-GLI-00002-000", np.diag([2.0, 2.0, 2.0, 1.0]))
    rc = main(["explain", "--model", str(student_file), "--input", str(site), "--no-progress"])
    assert rc == 2 and "expected one case, found 2" in capsys.readouterr().err

    case_dir = site / "BraTS-GLI-00001-000"
    other = save_nifti(tmp_path / "gt.nii.gz", np.zeros((8, 8, 8), np.uint8))
    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir),
               "--gt", str(other), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "shape (8, 8, 8) differs" in err and "gt.nii.gz" in err

    rc = main(["explain", "--model", str(tmp_path / "none.pt"), "--input", str(case_dir)])
    assert rc == 2 and "model file not found" in capsys.readouterr().err
    rc = main(["explain", "--model", str(student_file), "--input", str(tmp_path / "nope")])
    assert rc == 2 and "case folder not found" in capsys.readouterr().err
