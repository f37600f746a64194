"""Grad-CAM of the student (MONAI's GradCAM and GradCAMpp on a region score): the score by
hand, the map lying on the lesion for a network whose answer is known, the same map for the same
anatomy stored RAS and LPS, and ``fedbrats explain --gradcam``."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import (  # noqa: F401
    assert_same_grid,
    lps,
    sphere_case,
    student,
    student_file,
    write_case,
)
from torch import nn

from fedbrats.common.cli import main
from fedbrats.common.data.cases import discover_cases
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.inference.gradcam import (
    GradCamError,
    _region_score_module,
    default_layer,
    gradcam_paths,
    region_gradcam,
)

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])
CASE = "BraTS-GLI-00001-000"


def test_the_region_score_is_the_mean_log_odds_over_the_mask_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3, 3, 2)
    mask = torch.zeros(1, 3, 3, 3, 2, dtype=torch.bool)
    mask[0, 0, :2] = True  # WT on 12 voxels
    mask[0, 2, 0, 0, 0] = True  # ET on one

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    score = _region_score_module()(Fixed(), mask)(torch.zeros(1))
    p = logits[0].softmax(0)
    wt = torch.log(p[1:].sum(0) / p[0])  # log-odds of {1, 2, 3} against background
    et = torch.log(p[3] / p[:3].sum(0))
    assert score.shape == (1, 3)
    assert score[0, 0].item() == pytest.approx(wt[:2].mean().item(), rel=1e-5)
    assert score[0, 2].item() == pytest.approx(et[0, 0, 0].item(), rel=1e-5)
    assert score[0, 1].item() == 0.0  # an empty mask scores 0


class T1cEnhancement(nn.Module):
    """A network whose answer is known: ET where T1c is bright (a smoothed T1c), background
    elsewhere; `features` is the layer Grad-CAM explains."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv3d(4, 2, 3, padding=1)
        self.head = nn.Conv3d(2, 4, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.features.weight[0, CONTRASTS.index("t1c")] = 1 / 27  # mean T1c
            self.features.weight[1, CONTRASTS.index("t2w")] = 1 / 27  # an unrelated channel
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, -5.0, -5.0, -1.0]))
            self.head.weight[3, 0] = 1.0  # ET logit = mean T1c - 1

    def forward(self, x):
        return self.head(self.features(x))


def test_the_map_lies_on_the_lesion_for_a_network_whose_answer_is_known(tmp_path, student):
    images, lesion = sphere_case((32, 32, 12), (1.5, 1.5, 4.0))
    case = discover_cases(write_case(tmp_path / "in", CASE, images, AFFINE))[0]
    known = dataclasses.replace(student, network=T1cEnhancement().eval())
    for method in ("gradcam", "gradcampp"):
        [et] = region_gradcam(known, case, ["ET"], layer="features", method=method)
        assert et.cam.shape == lesion.shape and et.cam.dtype == np.float32
        assert 0.0 <= et.cam.min() and et.cam.max() <= 1.0
        inside, outside = et.cam[lesion > 0].mean(), et.cam[lesion == 0].mean()
        assert inside > 0.5 and outside < 0.2 * inside, (method, inside, outside)
    nothing = T1cEnhancement()
    with torch.no_grad():
        nothing.head.bias[3] = -100.0  # no ET, so no tumour at all
    with pytest.raises(GradCamError, match=f"case {CASE}: the student predicts no TC"):
        region_gradcam(dataclasses.replace(student, network=nothing.eval()), case, ["TC"],
                       layer="features")


def test_the_same_anatomy_stored_lps_gets_the_same_map(tmp_path, student):
    images, seg = sphere_case((32, 32, 12), (1.5, 1.5, 4.0))
    ras = discover_cases(write_case(tmp_path / "ras", CASE, images, AFFINE))[0]
    flipped, _, lps_affine = lps(images, seg, AFFINE)
    other = discover_cases(write_case(tmp_path / "lps", CASE, flipped, lps_affine))[0]
    known = dataclasses.replace(student, network=T1cEnhancement().eval())
    [a] = region_gradcam(known, ras, ["WT"], layer="features")
    [b] = region_gradcam(known, other, ["WT"], layer="features")
    assert a.cam.max() > 0.5
    np.testing.assert_allclose(b.cam[::-1, ::-1], a.cam, atol=1e-4)
    [c] = region_gradcam(student, ras, ["WT"])  # the student's own default layer
    assert c.layer == default_layer(student) == "model.1.submodule.2"
    assert c.cam.shape == seg.shape


def test_explain_gradcam_writes_a_map_and_a_picture_per_region(tmp_path, student_file, capsys):
    images, _ = sphere_case((32, 32, 12), (1.5, 1.5, 4.0))
    case_dir = write_case(tmp_path / "in", CASE, images, AFFINE)
    out = tmp_path / "out"
    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(out), "--gradcam", "--no-postprocess", "--device", "cpu", "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert (out / f"{CASE}_shapley.json").exists()  # beside the Shapley values
    written = [r for r in ("WT", "TC", "ET") if gradcam_paths(CASE, r, out)["nifti"].exists()]
    assert written and all(f"Grad-CAM of {r} (gradcam, layer model.1.submodule.2" in stdout
                           for r in written)
    for region in written:
        paths = gradcam_paths(CASE, region, out)
        assert_same_grid(paths["nifti"], case_dir / f"{CASE}-t1c.nii.gz")
        cam = np.asarray(nib.load(paths["nifti"]).dataobj)
        assert cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
        assert paths["png"].stat().st_size > 5000

    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(tmp_path / "pp"), "--gradcam", "--region", written[0], "--gradcam-method",
               "gradcampp", "--layer", "model.1.submodule.1.submodule.1.submodule", "--device",
               "cpu", "--no-progress", "--no-postprocess"])
    assert rc == 0, capsys.readouterr().out
    assert [p.name for p in sorted((tmp_path / "pp").glob("*_gradcam_*.nii.gz"))] == [
        f"{CASE}_gradcam_{written[0]}.nii.gz"]

    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir), "--list-layers",
               "--device", "cpu"])
    listing = capsys.readouterr().out
    assert rc == 0 and "model.1.submodule.2\n" in listing
    assert "(default for --gradcam: model.1.submodule.2)" in listing

    rc = main(["explain", "--model", str(student_file), "--input", str(case_dir), "--out",
               str(out), "--gradcam", "--layer", "decoder.9", "--device", "cpu",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--layer 'decoder.9': the student (UNet) has no such module" in err
    assert "model.1.submodule.2" in err
