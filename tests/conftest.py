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


def assert_server_mean(ckpt: dict, updates: dict, before: dict | None = None) -> None:
    """``ckpt`` (a checkpoint's state dict) is what the server computes from the sites'
    ``updates`` ({population: state dict}): every shared float array the equal-weight mean over
    the sites, each population head (the student's last block per population) the mean over
    its own population's sites; a head with no site among them is as it was in ``before``."""
    from fedbrats.common.networks.models import head_population

    for key, value in ckpt.items():
        if not value.is_floating_point():
            continue
        owner = head_population(key)
        own = [u for pop, u in updates.items() if owner in (None, pop)]
        if not own:
            if before is not None:
                assert np.array_equal(value.numpy(), before[key].numpy()), key
            continue
        mean = np.mean([u[key].double().numpy() for u in own], axis=0)
        np.testing.assert_allclose(value.double().numpy(), mean, rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def record_recovery(fault: str, seconds: float, what: str) -> None:
    """A fault test's measured time to recover: printed, and appended as a JSON line to the
    file named by ``$FEDBRATS_RECOVERY_LOG`` when set (``docs/bench/faults.py`` collects
    them into ``docs/bench/faults.md``)."""
    import json
    import time

    print(f"recovery: {fault}: {seconds:.1f} s ({what})")
    log = os.environ.get("FEDBRATS_RECOVERY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"fault": fault, "seconds": round(seconds, 1), "what": what,
                                 "when": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
