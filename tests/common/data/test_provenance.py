"""The synthetic-data guard: phantoms carry a provenance mark in their NIfTI headers;
``verify-data`` shows it, a site that declares its data real refuses marked cases (naming them),
and the run report counts them per site. Real NIfTI files throughout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
from conftest import make_volume, save_nifti

from fedbrats.common.config import ConfigError, SiteConfig, load_run_config, simulation_sites
from fedbrats.common.config import site_from_node_config
from fedbrats.common.data.cases import check_site, discover_cases
from fedbrats.common.data.provenance import SYNTHETIC_MARK, header_mark, synthetic_description
from fedbrats.common.data.verify import format_reports, verify_site
from fedbrats.simulation.phantoms import write_dataset


def _real_case(site: Path, n: int) -> str:
    """A case written as a converter would: no mark (an ordinary descrip)."""
    cid = f"BraTS-MEN-{90 + n:05d}-000"
    images, seg = make_volume(shape=(24, 24, 24), seed=n)
    for key, arr in {**images, "seg": seg}.items():
        path = save_nifti(site / cid / f"{cid}-{key}.nii.gz", arr)
        img = nib.load(str(path))
        img.header["descrip"] = b"TE=2.5;Time=101520.000"
        nib.save(nib.Nifti1Image(img.get_fdata().astype(arr.dtype), img.affine, img.header),
                 str(path))
    return cid


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """A MEN folder of 2 phantoms and 2 unmarked cases."""
    root = tmp_path_factory.mktemp("provenance")
    write_dataset(root, {"MEN": 2}, shape=(24, 24, 24), seed=5, progress=False)
    site = root / "MEN"
    for n in range(2):
        _real_case(site, n)
    return site


def test_every_phantom_file_carries_the_mark_and_a_real_file_does_not(mixed):
    phantom = sorted(mixed.glob("BraTS-MEN-00000-000/*.nii.gz"))
    assert len(phantom) == 5  # four contrasts and the segmentation
    for path in phantom:
        mark = header_mark(nib.load(str(path)).header)
        assert mark == f"{SYNTHETIC_MARK} phantom BraTS-MEN-00000-000 seed=5", path
    real = next(mixed.glob("BraTS-MEN-00090-000/*-t1n.nii.gz"))
    assert header_mark(nib.load(str(real)).header) is None
    assert len(synthetic_description("x" * 200)) == 80  # the field's size


def test_verify_data_shows_the_mark(mixed):
    reports = verify_site(mixed)
    marks = {r.case_id: r.synthetic for r in reports}
    assert marks["BraTS-MEN-00001-000"].startswith(SYNTHETIC_MARK)
    assert marks["BraTS-MEN-00091-000"] is None
    text = format_reports(reports)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("BraTS")}
    assert " synthetic " in rows["BraTS-MEN-00000-000"]
    assert " synthetic " not in rows["BraTS-MEN-00090-000"]
    assert "2 cases are synthetic" in text
    assert f"BraTS-MEN-00001-000: {SYNTHETIC_MARK} phantom BraTS-MEN-00001-000 seed=5" in text


def _site(folder: Path, tmp_path: Path, kind: str) -> SiteConfig:
    return SiteConfig("MEN", folder, tmp_path / "work", data_kind=kind)


def test_a_site_that_declares_real_data_refuses_marked_cases_by_name(mixed, tmp_path):
    from fedbrats.client.data import SiteError, site_cases, site_info

    run = load_run_config({"preset": "tiny"})
    for call in (lambda s: site_info(s, run), site_cases):
        with pytest.raises(SiteError) as e:
            call(_site(mixed, tmp_path, "real"))
        msg = str(e.value)
        assert "site MEN: data-kind is 'real', but 2 case(s)" in msg and str(mixed) in msg
        assert "BraTS-MEN-00000-000 (fedbrats-synthetic phantom" in msg
        assert "BraTS-MEN-00001-000" in msg and "BraTS-MEN-0009" not in msg
        assert "data-kind = 'any'" in msg

    facts = site_info(_site(mixed, tmp_path, "any"), run)  # the default takes and counts them
    assert (facts["num_cases"], facts["num_synthetic"]) == (4, 2)
    assert len(site_cases(_site(mixed, tmp_path, "any"))) == 4


def test_a_real_site_of_unmarked_cases_is_taken(tmp_path):
    from fedbrats.client.data import site_cases, site_info

    site = tmp_path / "MEN"
    for n in range(3):
        _real_case(site, n)
    facts = site_info(_site(site, tmp_path, "real"), load_run_config({"preset": "tiny"}))
    assert (facts["num_usable"], facts["num_synthetic"]) == (3, 0)
    assert len(site_cases(_site(site, tmp_path, "real"))) == 3


def test_data_kind_in_node_config_sim_sites_and_site_arguments(tmp_path):
    from fedbrats.simulation.sites import check_sites_data, parse_site_arg

    run = load_run_config({"preset": "tiny"})
    node = {"population": "MEN", "data-dir": str(tmp_path), "work-dir": str(tmp_path / "w")}
    assert site_from_node_config(node, run).data_kind == "any"
    assert site_from_node_config({**node, "data-kind": "real"}, run).data_kind == "real"
    with pytest.raises(ConfigError, match="data-kind: 'fake' is not one of any, real"):
        site_from_node_config({**node, "data-kind": "fake"}, run)
    with pytest.raises(ConfigError, match=r"site 1 \(MEN\): data-kind 'fake'"):
        simulation_sites('[{"population": "MEN", "data-dir": "/x", "data-kind": "fake"}]')

    write_dataset(tmp_path / "data", {"GLI": 2}, shape=(24, 24, 24), seed=1, progress=False)
    arg = parse_site_arg(f"GLI={tmp_path / 'data' / 'GLI'},data-kind=real")
    assert arg["data-kind"] == "real"
    [spec] = simulation_sites(json.dumps([arg]))
    sim = load_run_config({"preset": "tiny", "num-sites": 1, "sim-sites": json.dumps([arg])})
    assert site_from_node_config({"partition-id": 0}, sim).data_kind == "real"
    [problem] = check_sites_data([spec])
    assert "data-kind is 'real', but 2 case(s)" in problem
    assert "BraTS-GLI-00000-000" in problem
    assert check_sites_data([{**spec, "data-kind": "any"}]) == []


def test_the_report_counts_synthetic_cases_per_site():
    from fedbrats.server.report import _sites_markdown

    sites = {"GLI": {"info": {"num_train": 6, "num_val": 2, "num_synthetic": 8}},
             "MEN": {"info": {"num_train": 3, "num_val": 1, "num_synthetic": 0}}}
    summary = {"order": ["GLI", "MEN"], "failed": {"teacher": [], "student": []}}
    text = "\n".join(_sites_markdown(sites, summary))
    assert "synthetic cases" in text
    rows = [line for line in text.splitlines() if line.startswith("| GLI") or
            line.startswith("| MEN")]
    assert [r.split("|")[4].strip() for r in rows] == ["8", "0"]
