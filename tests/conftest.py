"""Shared fixtures: small, seeded, real NIfTI cases written with nibabel to tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDBRATS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with FEDBRATS_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def make_volume(
    shape=(24, 20, 16), seed: int = 0, labels=(1, 2, 3)
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A toy skull-stripped 'brain' (an ellipsoid) with a lesion made of ``labels``."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    r = np.sqrt(sum(((g - c) / (s * 0.45)) ** 2 for g, c, s in zip(grid, centre, shape)))
    brain = r < 1.0
    images = {}
    for i, key in enumerate(("t1n", "t1c", "t2w", "t2f")):
        img = (100 + 20 * i + 10 * rng.standard_normal(shape)).astype(np.float32)
        images[key] = np.where(brain, img, 0).astype(np.int16)
    seg = np.zeros(shape, dtype=np.uint8)
    lesion = np.sqrt(sum(((g - c) / 4.0) ** 2 for g, c in zip(grid, centre)))
    rings = list(labels)[::-1]  # outermost label first
    for k, lab in enumerate(rings):
        seg[lesion < 1.0 - k * 0.3] = lab
    return images, seg


@pytest.fixture
def brats2023_site(tmp_path) -> Path:
    """Two cases in the BraTS 2023 layout."""
    site = tmp_path / "site"
    for n in range(2):
        cid = f"BraTS-GLI-{n:05d}-000"
        images, seg = make_volume(seed=n)
        for key, arr in images.items():
            save_nifti(site / cid / f"{cid}-{key}.nii.gz", arr)
        save_nifti(site / cid / f"{cid}-seg.nii.gz", seg)
    return site
