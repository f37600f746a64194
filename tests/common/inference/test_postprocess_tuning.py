"""Post-processing tuned by the federation: the grid, the scores a site computes (lesion-wise
Dice of its post-processed cases, by hand), the server's choice (equal weight, per population,
ties to the defaults), and the thresholds per population in the student file."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedbrats.common.config import PRESETS, ConfigError, load_run_config
from fedbrats.common.inference.modelfile import (
    PostprocessThresholds,
    load_student,
    student_payload,
)
from fedbrats.common.inference.postprocess_tuning import (
    choose,
    decode_grid,
    encode_grid,
    grid_points,
    score_points,
)
from fedbrats.common.networks.models import build_network, student_spec
from fedbrats.common.utils.files import save_atomic

DEFAULT = PostprocessThresholds()


def test_the_grid_holds_the_defaults_and_travels_as_json():
    points = grid_points()
    assert len(points) == 30 and DEFAULT in points
    assert decode_grid(encode_grid(points)) == points
    assert grid_points({"min_component_mm3": (0,), "et_min_mm3": (0,)})[-1] == DEFAULT
    for bad in ("[]", "{}", "[{\"min_component_mm3\": -1, \"et_min_mm3\": 0}]", "x"):
        with pytest.raises(ValueError, match="post-processing grid"):
            decode_grid(bad)


def _case():
    """A 1 mm grid: one true lesion (a 10^3 cube with an ET core) that the prediction finds,
    and a 3^3 = 27 mm^3 speck the prediction adds far away."""
    gt = np.zeros((40, 40, 40), np.uint8)
    gt[5:15, 5:15, 5:15] = 2
    gt[8:12, 8:12, 8:12] = 3
    pred = gt.copy()
    pred[30:33, 30:33, 30:33] = 2
    return pred, gt, (1.0, 1.0, 1.0)


def test_a_site_scores_each_point_with_the_lesion_wise_dice_by_hand():
    points = [PostprocessThresholds(0, 0), PostprocessThresholds(25, 0),
              PostprocessThresholds(50, 0), PostprocessThresholds(50, 100)]
    scores = score_points([_case()], "GLI", points)
    assert scores.shape == (4, 3)
    # without removal (and at 25 < 27 mm^3) the speck is a false-positive WT lesion: the WT
    # lesion-wise Dice is the mean of 1 (the found lesion) and 0 (the speck)
    np.testing.assert_allclose(scores[0], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(scores[1], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(scores[2], [1.0, 1.0, 1.0])  # removed at 50 mm^3
    # ET (64 mm^3) under 100 mm^3 becomes NETC: ET and TC are lost
    np.testing.assert_allclose(scores[3, 0], 1.0)
    assert scores[3, 2] == 0.0
    assert np.isnan(score_points([], "GLI", points)).all()


def test_the_server_keeps_the_best_equal_weight_mean_and_each_populations_own_best():
    points = [DEFAULT, PostprocessThresholds(0, 0), PostprocessThresholds(200, 50)]
    # rows: points; columns: WT, TC, ET (the ranking is their mean)
    scores = {"GLI": np.array([[0.8] * 3, [0.9] * 3, [0.7] * 3]),
              "SSA": np.array([[0.6] * 3, [0.5] * 3, [0.8] * 3])}
    glob = choose(scores, points, "global")
    # means over the sites: default 0.70, (0, 0) 0.70, (200, 50) 0.75
    assert glob.chosen == points[2] and glob.by_population == {}
    assert glob.site_scores["GLI"] == pytest.approx({"default": 0.8, "tuned": 0.7,
                                                     "gain": -0.1})
    per = choose(scores, points, "population")
    assert per.by_population == {"GLI": points[1], "SSA": points[2]}
    assert per.site_scores["SSA"]["gain"] == pytest.approx(0.2)
    # a tie goes to the defaults; a site without scores (no validation case) is left out
    tied = {"GLI": np.array([[0.5] * 3, [0.5] * 3, [0.4] * 3]),
            "MET": np.full((3, 3), np.nan)}
    assert choose(tied, points, "global").chosen == DEFAULT
    assert set(choose(tied, points, "global").site_scores) == {"GLI"}
    with pytest.raises(ValueError, match="no site returned"):
        choose({"MET": np.full((3, 3), np.nan)}, points)
    with pytest.raises(ValueError, match="expected one of global, population"):
        choose(scores, points, "off")


def test_thresholds_per_population_in_the_student_file(tmp_path):
    run = PRESETS["tiny"]
    torch.manual_seed(0)
    state = build_network(student_spec(run)).state_dict()
    by_pop = {"SSA": PostprocessThresholds(200, 50), "MET": PostprocessThresholds(0, 0)}
    path = tmp_path / "student.pt"
    save_atomic(path, student_payload(run, state, 2, PostprocessThresholds(100, 100), by_pop))
    assert load_student(path, population="SSA").postprocess == by_pop["SSA"]
    assert load_student(path, population="MET").postprocess == by_pop["MET"]
    assert load_student(path, population="GLI").postprocess == PostprocessThresholds(100, 100)
    assert load_student(path).postprocess == PostprocessThresholds(100, 100)


def test_the_run_setting():
    assert load_run_config({"preset": "tiny"}).postprocess_tuning == "off"
    run = load_run_config({"preset": "tiny", "postprocess-tuning": "population"})
    assert dataclasses.asdict(run)["postprocess_tuning"] == "population"
    with pytest.raises(ConfigError, match="postprocess-tuning: expected off or global or "
                                          "population"):
        load_run_config({"preset": "tiny", "postprocess-tuning": "always"})
