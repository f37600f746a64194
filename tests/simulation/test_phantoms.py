"""The five-population phantoms: what makes each population what it is, contrast physics,
determinism, and the BraTS 2023 files they are written as."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS
from fedbrats.simulation import phantoms
from fedbrats.simulation.phantoms import (
    POPULATION_TABLE,
    PhantomCase,
    case_counts,
    default_spacing,
    generate_case,
    write_dataset,
)

SHAPE = (64, 64, 64)  # 3 mm voxels: fast, still anatomically recognisable
SEEDS = (0, 1, 2)
REPO = Path(__file__).resolve().parents[2]
FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


@pytest.fixture(scope="module")
def cases() -> dict[str, list[PhantomCase]]:
    """Index 0 of every population for a few seeds, generated once for the module."""
    return {p: [generate_case(p, 0, SHAPE, seed=s) for s in SEEDS] for p in POPULATIONS}


def core(seg):
    return (seg == 1) | (seg == 3)


def touches_outside(case: PhantomCase) -> int:
    """Tumour-core voxels with a face neighbour outside the skull-stripped brain."""
    return int((core(case.seg) & ndimage.binary_dilation(~case.brain_mask)).sum())


def z_blur_ratio(case: PhantomCase) -> float:
    """Gradient energy along z over that along x, inside the brain, on T1n."""
    v = case.images["t1n"].astype(np.float32)
    inner = ndimage.binary_erosion(case.brain_mask, iterations=2)
    gx = np.diff(v, axis=0)[inner[1:] & inner[:-1]]
    gz = np.diff(v, axis=2)[inner[:, :, 1:] & inner[:, :, :-1]]
    return float((gz**2).mean() / (gx**2).mean())


# ---------------------------------------------------------------------------- the table


def test_table_has_every_population():
    assert set(POPULATION_TABLE) == set(POPULATIONS)
    for p in POPULATION_TABLE.values():
        assert p.lesions[0] >= 1 and p.lesions[0] <= p.lesions[1]
        assert 0 < p.radius_mm[0] < p.radius_mm[1]


def test_case_counts_are_brats_like():
    counts = case_counts(40)
    assert counts["GLI"] == 40 == max(counts.values())
    assert counts["SSA"] == min(counts.values())
    assert all(n >= 2 for n in counts.values())
    assert min(case_counts(8).values()) == 2
    assert case_counts(5, balanced=True) == {p: 5 for p in POPULATIONS}
    assert case_counts(1) == {p: 1 for p in POPULATIONS}


def test_default_spacing():
    assert default_spacing((240, 240, 155)) == (1.0, 1.0, 1.0)
    assert default_spacing((96, 96, 96)) == pytest.approx((2.0, 2.0, 2.0))
    assert default_spacing(128) == pytest.approx((1.5, 1.5, 1.5))
    assert default_spacing((512, 512, 512)) == (1.0, 1.0, 1.0)  # never finer than BraTS


# ---------------------------------------------------------------------------- populations


def test_met_has_several_lesions_some_tiny(cases):
    extra = [generate_case("MET", i, SHAPE, seed=s) for s in SEEDS for i in (1, 2)]
    n_components, sizes = [], []
    for case in cases["MET"] + extra:
        lab, n = ndimage.label(case.seg > 0, structure=FULL)
        n_components.append(n)
        sizes.extend(np.bincount(lab.ravel())[1:].tolist())
    assert max(n_components) >= 3
    assert sum(n >= 2 for n in n_components) >= 2
    assert min(sizes) < 50


def test_men_is_extra_axial(cases):
    for men in cases["MEN"]:
        assert touches_outside(men) >= 20, "meningioma must sit on the brain surface"
    assert sum(touches_outside(g) for g in cases["GLI"]) < 0.2 * sum(
        touches_outside(m) for m in cases["MEN"]
    )
    for men in cases["MEN"]:
        seg = men.seg
        assert (seg == 3).sum() > 5 * (seg == 1).sum(), "meningiomas enhance homogeneously"


def test_ped_brains_are_smaller_with_little_enhancement(cases):
    ped = np.mean([c.brain_mask.sum() for c in cases["PED"]])
    gli = np.mean([c.brain_mask.sum() for c in cases["GLI"]])
    assert ped < 0.85 * gli
    et = sum((c.seg == 3).sum() for c in cases["PED"])
    tumour = sum((c.seg > 0).sum() for c in cases["PED"])
    assert et < 0.2 * tumour


def test_ped_tumours_are_infratentorial_or_midline(cases):
    for case in cases["PED"]:
        for lesion in case.info["lesions"]:
            x, _, z = lesion["centre_mni"]
            assert abs(x) < 25 and z < 20


def test_ssa_is_blurred_along_z(cases):
    ssa = np.mean([z_blur_ratio(c) for c in cases["SSA"]])
    gli = np.mean([z_blur_ratio(c) for c in cases["GLI"]])
    assert ssa < 0.7 * gli


def test_gli_is_large_with_necrotic_core_inside_enhancing_rim(cases):
    checked = 0
    for case in cases["GLI"]:
        seg = case.seg
        voxel_ml = np.prod(case.spacing) / 1000.0
        assert core(seg).sum() * voxel_ml > 5.0, "glioblastoma cores are several cm across"
        assert {1, 2, 3} <= set(np.unique(seg).tolist())
        lab, n = ndimage.label(seg > 0, structure=FULL)
        assert n == 1
        if any(lesion["cyst"] for lesion in case.info["lesions"]):
            continue  # a tumour cyst (NETC too) may bulge beyond the rim
        checked += 1
        # necrosis is enclosed: what surrounds NETC is NETC or ET, not oedema or brain
        netc = seg == 1
        shell = ndimage.binary_dilation(netc) & ~netc
        assert np.isin(seg[shell], (1, 3)).mean() > 0.9
    assert checked >= 2


def test_met_oedema_out_of_proportion(cases):
    ratios = [(c.seg == 2).sum() / max(core(c.seg).sum(), 1) for c in cases["MET"]]
    assert np.median(ratios) > 2.0


# ---------------------------------------------------------------------------- contrast physics


def test_tissue_contrasts(cases):
    for case in cases["GLI"] + cases["MET"]:
        healthy = case.brain_mask & (case.seg == 0)
        csf = healthy & (case.tissue["csf"] > 0.8)
        wm = healthy & (case.tissue["wm"] > 0.8)
        gm = healthy & (case.tissue["gm"] > 0.7)
        assert csf.sum() > 20 and wm.sum() > 20 and gm.sum() > 20
        m = {k: {t: case.images[k][r].mean() for t, r in (("csf", csf), ("gm", gm), ("wm", wm))}
             for k in CONTRASTS}
        assert m["t1n"]["csf"] < m["t1n"]["gm"] < m["t1n"]["wm"]  # T1: CSF dark, WM bright
        assert m["t2w"]["csf"] > m["t2w"]["gm"] > m["t2w"]["wm"]  # T2: CSF brightest
        assert m["t2f"]["csf"] < m["t2f"]["wm"] < m["t2f"]["gm"]  # FLAIR: CSF suppressed


def test_lesion_contrasts(cases):
    for case in cases["GLI"]:
        seg, im = case.seg, case.images
        wm = case.brain_mask & (seg == 0) & (case.tissue["wm"] > 0.8)
        et, oed, netc = seg == 3, seg == 2, seg == 1

        def rel(key, region, im=im, wm=wm):
            return im[key][region].mean() / im[key][wm].mean()

        assert rel("t1c", et) > 1.3 * rel("t1n", et)  # enhancement
        assert np.percentile(im["t1c"][et], 75) > 1.2 * im["t1c"][wm].mean()  # thin rims: PV
        assert rel("t2f", oed) > 1.4  # oedema bright on FLAIR
        assert rel("t2w", oed) > 1.4 and rel("t1n", oed) < 1.0
        assert rel("t1n", netc) < 0.7 and rel("t2w", netc) > 1.5  # necrosis


# ---------------------------------------------------------------------------- mechanics


def test_dtypes_affine_and_mask(cases):
    for case in (c for group in cases.values() for c in group[:1]):
        assert set(case.images) == set(CONTRASTS)
        for img in case.images.values():
            assert img.dtype == np.int16 and img.shape == SHAPE
            assert img.min() >= 0
            assert not img[~case.brain_mask].any(), "skull-stripped: 0 outside the brain"
        assert case.seg.dtype == np.uint8
        assert set(np.unique(case.seg).tolist()) <= {0, 1, 2, 3}
        assert not case.seg[~case.brain_mask].any()
        np.testing.assert_allclose(case.spacing, default_spacing(SHAPE))
        assert case.affine.shape == (4, 4)
        assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
        assert case.case_id == f"BraTS-{case.population}-00000-000"


def test_deterministic_and_varied():
    a = generate_case("MET", 3, (48, 48, 48), seed=5)
    b = generate_case("MET", 3, (48, 48, 48), seed=5)
    for key in CONTRASTS:
        np.testing.assert_array_equal(a.images[key], b.images[key])
    np.testing.assert_array_equal(a.seg, b.seg)
    c = generate_case("MET", 4, (48, 48, 48), seed=5)
    d = generate_case("MET", 3, (48, 48, 48), seed=6)
    for other in (c, d):
        assert not np.array_equal(a.images["t1n"], other.images["t1n"])
        assert not np.array_equal(a.brain_mask, other.brain_mask)


def test_write_dataset_brats2023_layout(tmp_path):
    shape = (48, 48, 40)
    dirs = write_dataset(tmp_path, {"MEN": 1, "GLI": 2}, shape=shape, seed=3, progress=False)
    assert [d.relative_to(tmp_path).as_posix() for d in dirs] == [
        "GLI/BraTS-GLI-00000-000",
        "GLI/BraTS-GLI-00001-000",
        "MEN/BraTS-MEN-00000-000",
    ]
    # a case depends on (seed, population, index) only, not on what else was written
    expected = generate_case("GLI", 1, shape, seed=3)
    cid = "BraTS-GLI-00001-000"
    for key in (*CONTRASTS, "seg"):
        img = nib.load(str(tmp_path / "GLI" / cid / f"{cid}-{key}.nii.gz"))
        np.testing.assert_allclose(img.affine, expected.affine)
        np.testing.assert_allclose(img.header.get_zooms(), default_spacing(shape))
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        data = np.asarray(img.dataobj)
        if key == "seg":
            assert data.dtype == np.uint8
            np.testing.assert_array_equal(data, expected.seg)
        else:
            assert data.dtype == np.int16
            np.testing.assert_array_equal(data, expected.images[key])


def test_missing_template_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(phantoms, "template_dir", lambda: tmp_path)
    phantoms._template.cache_clear()
    try:
        with pytest.raises(phantoms.TemplateMissingError, match="nilearn"):
            phantoms._template()
    finally:
        monkeypatch.undo()
        phantoms._template.cache_clear()


@pytest.mark.slow
def test_full_brats_grid():
    case = generate_case("GLI", 0, (240, 240, 155), seed=0)
    assert case.seg.shape == (240, 240, 155)
    assert case.spacing == (1.0, 1.0, 1.0)
    assert {1, 2, 3} <= set(np.unique(case.seg).tolist())
    assert case.brain_mask.sum() > 1.0e6  # >1 l of brain at 1 mm


# ---------------------------------------------------------------------------- render and CLI


def test_render_orientation():
    from fedbrats.common.inference.render import _views

    vol = np.zeros((10, 12, 8))
    vol[9, 11, 7] = 1  # patient right, anterior, superior corner
    (axial, _), (coronal, _), (sagittal, _) = _views(vol, (9, 11, 7), (1.0, 1.0, 1.0))
    assert axial[0, 0] == 1  # radiological: right on the viewer's left, anterior up
    assert coronal[0, 0] == 1  # superior up
    assert sagittal[0, 0] == 1  # anterior on the left, superior up


def test_render_case(tmp_path):
    from fedbrats.common.inference.render import render_dataset

    write_dataset(tmp_path / "data", {"MET": 1}, shape=(48, 48, 48), seed=1, progress=False)
    (png,) = render_dataset(tmp_path / "data", tmp_path / "img")
    assert png.name == "phantom-MET.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_synth_and_errors(tmp_path, capsys):
    from fedbrats.simulation.cli import register_snapshot, register_synth

    parser = argparse.ArgumentParser(prog="fedbrats")
    sub = parser.add_subparsers(dest="command")
    register_synth(sub)
    register_snapshot(sub)
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path), "--cases", "1", "--populations", "ped,SSA",
         "--shape", "40,40,36", "--no-progress"]
    )
    assert args.func(args) == 0
    assert "40x40x36" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PED", "SSA"]
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--shape", "31"])
    assert "at least 32" in capsys.readouterr().err
    args = parser.parse_args(["snapshot", str(tmp_path / "missing")])
    assert args.func(args) == 2


def test_cli_module_imports_light():
    code = ("import sys, fedbrats.simulation.cli; "
            "print('numpy' in sys.modules, 'nibabel' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]
