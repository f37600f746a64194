"""The MONAI preprocessing pipeline and the cached dataset, on real NIfTI files."""

import numpy as np
import pytest
import torch
from conftest import make_volume, save_nifti

from fedbrats.common.data.cases import discover_cases
from fedbrats.common.data.transforms import (
    IMAGE,
    INPUT_LABEL,
    LABEL,
    Compose,
    build_dataset,
    first_sample,
    normalise_probabilities,
    preprocessing,
    to_input_grid,
)


def _lps_anisotropic_case(tmp_path, missing=()):
    """A case stored LPS (x and y flipped) with 1 x 1 x 2 mm voxels and a zero margin."""
    images, seg = make_volume(shape=(40, 36, 20))
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = (40.0, 36.0, -20.0)
    cid = "BraTS-MET-00001-000"
    for key, arr in images.items():
        if key not in missing:
            save_nifti(tmp_path / cid / f"{cid}-{key}.nii.gz", arr, affine)
    save_nifti(tmp_path / cid / f"{cid}-seg.nii.gz", seg, affine)
    return discover_cases(tmp_path)[0], images, seg


def test_preprocessing_reorients_crops_resamples_and_normalises(tmp_path):
    case, images, seg = _lps_anisotropic_case(tmp_path)
    out = Compose(preprocessing(spacing=(2.0, 2.0, 2.0)))({"case": case})
    image, label = out[IMAGE], out[LABEL]
    affine = image.affine.numpy()
    # RAS with the configured 2 mm spacing
    assert np.allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    assert image.shape[0] == 4 and label.shape[0] == 1
    assert image.shape[1:] == label.shape[1:]
    # cropped to the brain: the toy brain spans 90% of each axis, 40 x 36 x 40 mm -> 36 x 32.4 x
    # 36 mm, i.e. 18 x 16 x 18 voxels of 2 mm
    assert image.shape[1:] == (18, 16, 18)
    # z-scored inside the brain, per contrast
    for c in range(4):
        inside = image[c][image[c] != 0]
        assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    # labels are still 0-3 and the tumour volume (in mm^3) is about the same
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3}
    before = np.count_nonzero(seg) * 1 * 1 * 2
    after = int(torch.count_nonzero(label)) * 8
    assert abs(after - before) / before < 0.25
    assert out["present"].tolist() == [True] * 4


def test_orientation_flips_data_not_just_metadata(tmp_path):
    # An asymmetric marker: after reorienting LPS -> RAS, the marker must be at the other end of x.
    shape = (12, 10, 8)
    arr = np.full(shape, 50, np.int16)
    arr[0, :, :] = 500  # first slab along i; with x flipped it is the patient's far right (R end)
    seg = np.zeros(shape, np.uint8)
    seg[0, 4:6, 3:5] = 1
    cid = "BraTS-GLI-00009-000"
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    for key in ("t1n", "t1c", "t2w", "t2f"):
        save_nifti(tmp_path / cid / f"{cid}-{key}.nii.gz", arr, affine)
    save_nifti(tmp_path / cid / f"{cid}-seg.nii.gz", seg, affine)
    out = Compose(preprocessing(spacing=None))({"case": discover_cases(tmp_path)[0]})
    assert float(out[IMAGE][0, -1].mean()) > float(out[IMAGE][0, 0].mean())
    assert out[LABEL][0, -1].any() and not out[LABEL][0, 0].any()


def test_missing_contrast_is_a_zero_channel(tmp_path):
    case, *_ = _lps_anisotropic_case(tmp_path, missing=("t1c",))
    out = Compose(preprocessing(spacing=(2.0, 2.0, 2.0)))({"case": case})
    assert out["present"].tolist() == [True, False, True, True]
    assert not out[IMAGE][1].any()
    assert out[IMAGE][0].any()


def test_cache_means_no_rereading(brats2023_site):
    cases = discover_cases(brats2023_site)
    ds = build_dataset(cases, spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16))
    for case in cases:  # the files are gone: every later epoch must come from the cache
        for _, path in case.files():
            path.unlink()
    for _epoch in range(2):
        for i in range(len(ds)):
            sample = first_sample(ds[i])
            assert sample[IMAGE].shape == (4, 16, 16, 16)
            assert sample[LABEL].shape == (1, 16, 16, 16)


def test_random_crops_are_biased_toward_tumour(tmp_path):
    # a brain with a small lesion; 8^3 patches: without a bias few would contain tumour
    images, seg = make_volume(shape=(40, 40, 40))
    small = np.zeros_like(seg)
    small[18:22, 18:22, 18:22] = 1
    cid = "BraTS-GLI-00003-000"
    for key, arr in images.items():
        save_nifti(tmp_path / cid / f"{cid}-{key}.nii.gz", arr)
    save_nifti(tmp_path / cid / f"{cid}-seg.nii.gz", small)
    ds = build_dataset(discover_cases(tmp_path), spacing=None, patch_size=(8, 8, 8))
    ds.transform.set_random_state(seed=0)
    hits = sum(bool(first_sample(ds[0])[LABEL].any()) for _ in range(60))
    lesion_fraction = small.sum() / (40 * 40 * 40 * 0.45**3 * 4.19)  # lesion / brain volume
    assert lesion_fraction < 0.01
    assert hits / 60 > 0.5  # 2/3 of the crops are centred on tumour


def test_bad_case_in_dataset_names_the_case(brats2023_site):
    cases = discover_cases(brats2023_site)
    save_nifti(cases[1].images["t1c"], np.zeros((24, 20, 16), np.int16))
    with pytest.raises(Exception, match="BraTS-GLI-00001-000, t1c file.*empty image"):
        build_dataset(cases, spacing=None)


def _back_to_input_grid(ds, i: int) -> np.ndarray:
    """The cached model-grid label as one-hot probabilities, brought back to the file's grid."""
    item = ds[i]
    onehot = torch.nn.functional.one_hot(item[LABEL][0].long(), 4).permute(3, 0, 1, 2).float()
    return normalise_probabilities(to_input_grid(onehot, item[IMAGE], ds.transform)).argmax(0)


def test_evaluation_items_keep_the_label_on_the_file_grid(tmp_path):
    case, _, seg = _lps_anisotropic_case(tmp_path)
    item = build_dataset([case], spacing=(2.0, 2.0, 2.0))[0]
    assert np.array_equal(item[INPUT_LABEL][0].numpy(), seg)  # as stored: LPS, 1 x 1 x 2 mm
    assert np.allclose(np.asarray(item[INPUT_LABEL].affine)[:3, :3], np.diag([-1.0, -1.0, 2.0]))
    training = first_sample(build_dataset([case], spacing=(2.0, 2.0, 2.0), patch_size=(8,) * 3)[0])
    assert INPUT_LABEL not in training


def test_to_input_grid_undoes_reorientation_crop_and_resampling(tmp_path):
    case, _, seg = _lps_anisotropic_case(tmp_path)
    # same grid: only the reorientation (LPS -> RAS) and the brain crop to undo, exactly
    back = _back_to_input_grid(build_dataset([case], spacing=None), 0)
    assert back.shape == seg.shape
    assert np.array_equal(back, seg)
    # a 3 mm model grid: back on the 1 x 1 x 2 mm grid, close to the label but not equal
    back = _back_to_input_grid(build_dataset([case], spacing=(3.0, 3.0, 3.0)), 0)
    assert back.shape == seg.shape
    wt_back, wt = back > 0, seg > 0
    dice = 2 * (wt_back & wt).sum() / (wt_back.sum() + wt.sum())
    assert 0.8 < dice < 1.0


# -- the cases kept on disk between processes ----------------------------------------------------


def test_cases_kept_on_disk_are_not_preprocessed_again_in_a_new_process(tmp_path, monkeypatch,
                                                                        caplog):
    import os

    import fedbrats.common.data.transforms as transforms

    case, _, seg = _lps_anisotropic_case(tmp_path / "data")
    kept = tmp_path / "kept"
    reads = []
    real_load = transforms.load_case
    monkeypatch.setattr(transforms, "load_case", lambda *a, **k: reads.append(1) or
                        real_load(*a, **k))

    def build(**kwargs):
        return (build_dataset([case], (2.0,) * 3, (8,) * 3, cache_dir=kept, **kwargs),
                build_dataset([case], (2.0,) * 3, None, cache_dir=kept, **kwargs))

    train, val = build()
    assert len(reads) == 2  # the training and the evaluation form of the case
    assert len(list(kept.glob("*.pt"))) == 2
    # a new process: both read from disk, and the evaluation item still undoes its steps
    train, val = build()
    assert len(reads) == 2
    assert first_sample(train[0])[IMAGE].shape == (4, 8, 8, 8)
    assert np.array_equal(_back_to_input_grid(val, 0),
                          _back_to_input_grid(build_dataset([case], (2.0,) * 3), 0))
    assert np.array_equal(val[0][INPUT_LABEL][0].numpy(), seg)
    reads.clear()
    # another setting, or a file written again: preprocessed again
    build_dataset([case], (3.0,) * 3, None, cache_dir=kept)
    assert len(reads) == 1
    t1c = case.images["t1c"]
    os.utime(t1c, ns=(t1c.stat().st_atime_ns, t1c.stat().st_mtime_ns + 10**9))
    build()
    assert len(reads) == 3
    # a torn cache file is preprocessed again, not a crash
    for f in kept.glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    reads.clear()
    train, val = build()
    assert len(reads) == 2 and first_sample(train[0])[IMAGE].shape == (4, 8, 8, 8)
    assert any("torn cache file" in r.getMessage() for r in caplog.records)


def test_a_batch_of_a_kept_case_and_a_new_one_collates(tmp_path):
    """MONAI reads a kept item back with every tensor and array as a MetaTensor; one computed
    in this process has plain ones. A batch of one of each (a case added to a site, a changed
    file) failed to collate ("'Tensor' object has no attribute 'meta'"). Both now have the same
    types."""
    from monai.data import DataLoader, MetaTensor

    from fedbrats.common.data.cases import discover_cases
    from fedbrats.common.data.transforms import kept_cases, training_dataset
    from fedbrats.simulation.phantoms import write_dataset

    write_dataset(tmp_path / "data", {"SSA": 2}, shape=(32, 32, 32), seed=1, progress=False)
    cases = discover_cases(tmp_path / "data" / "SSA")
    kept_cases(cases[:1], (4.0,) * 3, tmp_path / "cache")[0]  # the first case is kept
    both = kept_cases(cases, (4.0,) * 3, tmp_path / "cache")
    read_back, computed = both[0], both[1]
    assert {k: type(v) for k, v in read_back.items()} == {k: type(v) for k, v in computed.items()}
    assert isinstance(read_back[IMAGE], MetaTensor) and not isinstance(read_back["present"],
                                                                        MetaTensor)
    batch = next(iter(DataLoader(training_dataset(both, (16, 16, 16)), batch_size=2)))
    assert batch[IMAGE].shape == (2, 4, 16, 16, 16)
