"""``fedbrats evaluate --metrics brats2025``: the official BraTS 2025 scorer beside fedbrats' own.

Hand-built cases on a 1 mm grid whose scores are worked out by hand, scored by both. Where the
definitions agree (global Dice, lesion counts, a perfect prediction) both give the hand value;
where they differ (the lesion-wise mean, the penalty HD95, an empty region in both) each gives
its own definition's hand value.

The official scorer runs in its own environment (see ``fedbrats.common.metrics.brats2025``): the
agreement test uses ``$FEDBRATS_BRATS2025_PYTHON`` when it is set, else creates the environment
(a minute or two from the package index), so it is in the slow set.
"""

from __future__ import annotations

import csv
import math
import os
import sys

import numpy as np
import pytest
from conftest import save_nifti

from fedbrats.common.cli import main
from fedbrats.common.data.labels import CONVENTIONS
from fedbrats.common.metrics.brats import HD95_MAX_MM
from fedbrats.common.metrics.brats2025 import (
    SCORER_ENV_VAR,
    ScorerUnavailable,
    find_scorer_python,
    install_scorer,
)
from fedbrats.common.metrics.evaluate import evaluate_folders

SHAPE = (40, 40, 40)


def cube(seg: np.ndarray, lo: tuple[int, int, int], size: int, label: int = 3) -> None:
    seg[tuple(slice(a, a + size) for a in lo)] = label


def gli_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case_id: (prediction, ground truth)}``, ET lesions only (so WT = TC = ET)."""
    empty = np.zeros(SHAPE, dtype=np.uint8)
    gt = empty.copy()
    cube(gt, (5, 5, 5), 6)  # lesion A: 216 voxels
    cube(gt, (25, 5, 5), 6)  # lesion B: 216 voxels, far from A
    pred = empty.copy()
    cube(pred, (5, 5, 5), 6)  # A found exactly
    cube(pred, (5, 28, 28), 4)  # a 64 mm^3 false positive (above the 50 mm^3 threshold)
    return {
        "BraTS-GLI-00001-000": (pred, gt),  # one found, one missed, one spurious
        "BraTS-GLI-00002-000": (gt.copy(), gt),  # perfect
        "BraTS-GLI-00003-000": (empty.copy(), gt),  # everything missed
        "BraTS-GLI-00004-000": (empty.copy(), empty.copy()),  # no tumour, none predicted
    }


def write(folder, cases, labels="brats2023"):
    table = CONVENTIONS[labels].from_internal
    lut = np.zeros(256, dtype=np.uint8)
    for internal, value in table.items():
        lut[internal] = value
    for case_id, (pred, gt) in cases.items():
        save_nifti(folder / "pred" / f"{case_id}.nii.gz", lut[pred])
        save_nifti(folder / "gt" / case_id / f"{case_id}-seg.nii.gz", lut[gt])


@pytest.fixture(scope="module")
def scorer_python(tmp_path_factory):
    if os.environ.get(SCORER_ENV_VAR):
        return os.environ[SCORER_ENV_VAR]
    return str(install_scorer(tmp_path_factory.mktemp("scorer") / "venv"))


@pytest.mark.slow
def test_official_and_own_scores_agree_where_the_definitions_do(tmp_path, scorer_python, capsys):
    write(tmp_path, gli_cases())
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "GLI",
                              metrics=("brats2023", "brats2025"), scorer_python=scorer_python)
    assert not result.failed and not result.warnings
    assert set(result.official_versions) == {"brats-evaluation", "panoptica"}
    s = result.per_case
    for region in ("WT", "TC", "ET"):
        partial, perfect = s["BraTS-GLI-00001-000"][region], s["BraTS-GLI-00002-000"][region]
        missed, none = s["BraTS-GLI-00003-000"][region], s["BraTS-GLI-00004-000"][region]
        # Global Dice: 2 * 216 / (280 + 432), in both.
        assert partial["dice"] == pytest.approx(432 / 712, abs=1e-6)
        assert partial["brats2025_dice"] == pytest.approx(432 / 712, abs=1e-6)
        # Lesions: A matched, B missed, the cube spurious, in both.
        assert (partial["lesion_tp"], partial["lesion_fn"], partial["lesion_fp"]) == (1, 1, 1)
        assert (partial["brats2025_tp"], partial["brats2025_fn"], partial["brats2025_fp"]) == (
            1, 1, 1)  # fmt: skip
        # The lesion-wise mean differs by definition: BraTS 2023 over TP + FN + FP (1 / 3);
        # BraTS 2025 over the matched lesions only (A's Dice 1; misses are in the counts).
        assert partial["lesion_dice"] == pytest.approx(1 / 3)
        assert partial["brats2025_lesion_dice"] == pytest.approx(1.0)
        assert partial["brats2025_lesion_hd95"] == pytest.approx(0.0)
        # A perfect prediction: Dice 1, HD95 0, NSD 1 in both.
        assert perfect["dice"] == perfect["brats2025_dice"] == 1.0
        assert perfect["hd95"] == perfect["brats2025_hd95"] == 0.0
        assert perfect["brats2025_nsd"] == 1.0 and perfect["brats2025_tp"] == 2
        # Everything missed: Dice 0 in both; the penalty HD95 is 374 mm (2023), 373 mm (2025).
        assert missed["dice"] == missed["brats2025_dice"] == 0.0
        assert missed["hd95"] == HD95_MAX_MM == 374.0 and missed["brats2025_hd95"] == 373.0
        assert missed["brats2025_fn"] == 2 and missed["brats2025_tp"] == 0
        # No tumour and none predicted: 1 under the 2023 rule, undefined (NaN) for panoptica.
        assert none["dice"] == 1.0 and math.isnan(none["brats2025_dice"])

    # The command line writes the official columns beside fedbrats' own, and both tables.
    out = tmp_path / "out"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
            "--challenge", "GLI", "--metrics", "brats2025", "--scorer-python", scorer_python,
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "official BraTS 2025 scorer (brats-evaluation 0.0.10" in printed
    with open(out / "per_case.csv", newline="") as f:
        rows = {(r["case_id"], r["region"]): r for r in csv.DictReader(f)}
    assert float(rows[("BraTS-GLI-00001-000", "ET")]["brats2025_dice"]) == pytest.approx(
        432 / 712, abs=1e-5)  # fmt: skip
    with open(out / "summary.csv", newline="") as f:
        summary = {(r["region"], r["metric"]): r for r in csv.DictReader(f)}
    assert summary[("ET", "brats2025_fn")]["total"] == "3"  # B in case 1, A and B in case 3


@pytest.mark.slow
def test_paediatric_labels_reach_the_official_scorer_in_its_own_values(tmp_path, scorer_python):
    """PED's official configuration reads BraTS 2024 PED values (1 ET, 2 NETC, 4 oedema): a
    prediction without its ET scores ET 0 and TC, WT 1 only if the values were mapped."""
    gt = np.zeros(SHAPE, dtype=np.uint8)
    cube(gt, (8, 8, 8), 8, label=2)  # oedema
    cube(gt, (10, 10, 10), 4, label=1)  # NETC
    cube(gt, (11, 11, 11), 2, label=3)  # ET
    pred = np.where(gt == 3, 1, gt).astype(np.uint8)  # ET called NETC
    write(tmp_path, {"BraTS-PED-00001-000": (pred, gt)}, labels="brats2024-ped")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", "PED", labels="brats2024-ped",
                              metrics=("brats2023", "brats2025"), scorer_python=scorer_python)
    scores = result.per_case["BraTS-PED-00001-000"]
    for region, dice in (("WT", 1.0), ("TC", 1.0), ("ET", 0.0)):
        assert scores[region]["dice"] == scores[region]["brats2025_dice"] == dice


def test_a_missing_scorer_is_named_with_how_to_install_it(tmp_path, monkeypatch, capsys):
    save_nifti(tmp_path / "gt" / "BraTS-GLI-00001-000-seg.nii.gz", np.zeros((8, 8, 8), np.uint8))
    save_nifti(tmp_path / "pred" / "BraTS-GLI-00001-000.nii.gz", np.zeros((8, 8, 8), np.uint8))
    base = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
            "--challenge", "GLI", "--metrics", "brats2025", "--out", str(tmp_path / "o")]

    monkeypatch.setenv(SCORER_ENV_VAR, str(tmp_path / "no-such-python"))
    assert main(base) == 2
    printed = capsys.readouterr().out
    assert f"{SCORER_ENV_VAR} {tmp_path / 'no-such-python'} not found" in printed
    assert "make brats2025" in printed and "rich<14" in printed
    assert not (tmp_path / "o").exists()  # refused before anything was scored

    # This environment (fedbrats') cannot hold the package: its Python is named as unable to.
    with pytest.raises(ScorerUnavailable, match="cannot import brats_evaluation"):
        find_scorer_python(sys.executable)
    assert main([*base, "--scorer-python", sys.executable]) == 2
    assert "--scorer-python: " in capsys.readouterr().out


def test_unknown_metric_set_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path), "--challenge", "GLI",
              "--metrics", "brats2024"])
    assert e.value.code == 2
    assert "unknown metrics brats2024; expected brats2023 or brats2025" in capsys.readouterr().err
