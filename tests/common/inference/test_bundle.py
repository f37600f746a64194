"""``fedbrats export``: a student as a MONAI bundle that MONAI runs without fedbrats.

The bundle is run through MONAI's bundle API (``monai.bundle.run``, and its command line) in a
fresh Python in which importing fedbrats fails, and its segmentations are compared voxel for
voxel with ``fedbrats predict`` on the same cases (an anisotropic RAS case and an LPS one).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import RUN, lps, seeded_state, sphere_case, write_case

from fedbrats.common.cli import main
from fedbrats.common.data.cases import discover_cases
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.inference.bundle import export_bundle
from fedbrats.common.inference.modelfile import PostprocessThresholds, load_student, student_payload
from fedbrats.common.inference.predict import predict_case
from fedbrats.common.utils.files import save_atomic

# Run in the bundle's Python: fedbrats cannot be imported there.
RUNNER = """
import sys
sys.modules["fedbrats"] = None
from monai.bundle import run
run(config_file=sys.argv[1] + "/configs/inference.json", bundle_root=sys.argv[1],
    dataset_dir=sys.argv[2], output_dir=sys.argv[3], **dict(a.split("=") for a in sys.argv[4:]))
"""


def student_file(path, heads: str, ped_shift: float = 0.0):
    run = dataclasses.replace(RUN, student_heads=heads)
    state = seeded_state(run, ped_shift)
    # an ET threshold above what this random student predicts (about 40 ml), so that the
    # bundle's post-processing is seen to do what predict's does: every ET voxel becomes NETC
    save_atomic(path, student_payload(run, state, server_round=4,
                                      postprocess=PostprocessThresholds(60.0, 100_000.0)))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two BraTS case folders: anisotropic RAS, and the same anatomy stored LPS."""
    root = tmp_path_factory.mktemp("site")
    affine = np.diag([1.2, 1.0, 1.5, 1.0])
    images, seg = sphere_case((36, 40, 28), (1.2, 1.0, 1.5))
    write_case(root, "BraTS-GLI-00001-000", images, affine)
    images_lps, _, affine_lps = lps(images, seg, affine)
    write_case(root, "BraTS-GLI-00002-000", images_lps, affine_lps)
    return root


def run_bundle(bundle, dataset, out, *overrides):
    done = subprocess.run([sys.executable, "-c", RUNNER, str(bundle), str(dataset), str(out),
                           *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def read(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("heads", ["population", "shared"])
def test_the_bundle_segments_as_predict_does_without_fedbrats(tmp_path, site, heads):
    model = student_file(tmp_path / "student.pt", heads)
    bundle = export_bundle(model, tmp_path / "bundle")
    out = run_bundle(bundle, site, tmp_path / "preds")
    student = load_student(model)
    for case in discover_cases(site):
        expected = predict_case(student, case)
        assert expected.postprocessed.et_relabelled_mm3 > 0  # post-processing did something
        got_path = out / f"{case.case_id}.nii.gz"
        got = read(got_path)
        assert got.dtype == np.uint8 and got.shape == expected.labels.shape
        np.testing.assert_array_equal(got, expected.labels)
        np.testing.assert_allclose(nib.load(str(got_path)).affine, expected.affine, atol=1e-6)
        # a random student: background, NETC and SNFH all present, so a real comparison
        assert set(np.unique(got)) == {0, 1, 2}


def test_a_population_head_through_monai_command_line(tmp_path, site):
    model = student_file(tmp_path / "student.pt", "population", ped_shift=5.0)
    bundle = export_bundle(model, tmp_path / "bundle")
    case_dir = site / "BraTS-GLI-00001-000"
    (case,) = discover_cases(case_dir)
    by_head = {p: predict_case(load_student(model, population=p), case).labels
               for p in ("PED", "GLI")}
    assert not np.array_equal(by_head["PED"], by_head["GLI"])

    # MONAI's own command line, from the bundle's folder, choosing PED's head
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--bundle_root", ".", "--dataset_dir", str(case_dir), "--output_dir",
         str(tmp_path / "ped"), "--population", "PED"],
        cwd=bundle, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(read(tmp_path / "ped" / "BraTS-GLI-00001-000.nii.gz"),
                                  by_head["PED"])

    # exported with --population, the bundle's default head is that one
    main(["export", "--model", str(model), "--out", str(tmp_path / "b2"), "--population", "GLI"])
    run_bundle(tmp_path / "b2", case_dir, tmp_path / "gli")
    np.testing.assert_array_equal(read(tmp_path / "gli" / "BraTS-GLI-00001-000.nii.gz"),
                                  by_head["GLI"])


def test_metadata_says_what_a_monai_user_needs(tmp_path):
    model = student_file(tmp_path / "student.pt", "population")
    bundle = export_bundle(model, tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    fb = meta["fedbrats"]
    assert fb["channels"] == list(CONTRASTS) == list(
        meta["network_data_format"]["inputs"]["image"]["channel_def"].values())
    assert fb["label_convention"] == "brats2023"
    assert fb["regions"] == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    assert fb["spacing_mm"] == [float(RUN.spacing)] * 3 and fb["patch_size"] == [16] * 3
    assert fb["network"]["class"] == "monai.networks.nets.UNet"
    assert fb["network"]["monai_version"] == meta["monai_version"]
    assert fb["postprocess"] == {"min_component_mm3": 60.0, "et_min_mm3": 100_000.0}
    assert fb["round"] == 4 and len(fb["source_sha256"]) == 64
    assert torch.load(bundle / "models" / "model.pt", weights_only=True).keys() == \
        torch.load(model, weights_only=True)["state_dict"].keys()
    # the bundle's scripts are fedbrats' files, not copies that could drift
    from fedbrats.common.inference import postprocessing
    from fedbrats.common.networks import heads

    for name, module in (("postprocess.py", postprocessing), ("heads.py", heads)):
        assert (bundle / "scripts" / name).read_text() == open(module.__file__).read()


def test_export_errors(tmp_path, capsys):
    plain = student_file(tmp_path / "plain.pt", "shared")
    args = ["export", "--model", str(plain), "--out", str(tmp_path / "b")]
    assert main([*args, "--population", "GLI"]) == 2
    assert "single last block" in capsys.readouterr().out
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # the folder is there now
    assert "exists and is not an empty folder; pass --overwrite" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    (tmp_path / "torn.pt").write_bytes(plain.read_bytes()[:1000])
    assert main(["export", "--model", str(tmp_path / "torn.pt"), "--out", str(tmp_path / "c")]) == 2
    printed = capsys.readouterr().out
    assert "torn.pt" in printed and not (tmp_path / "c").exists()
