"""``fedbrats simulate`` on the sites' own data (--site, --sites-file): phantom cases rewritten with
nibabel in the layouts real sites have (a BraTS 2021-named folder with labels 1, 2, 4; a manifest
with other file names and a missing contrast; a BraTS 2024 PED folder with its labels), checked
before any process starts, then run end to end through Flower's simulation engine."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedbrats.common.cli import main
from fedbrats.common.config import (
    ConfigError,
    load_run_config,
    simulation_sites,
    site_from_node_config,
)
from fedbrats.simulation.phantoms import write_dataset
from fedbrats.simulation.sites import (
    check_sites_data,
    parse_site_arg,
    read_sites_file,
    sim_sites_setting,
)

NAMES_2021 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
TO_2021 = {0: 0, 1: 1, 2: 2, 3: 4}  # ET is 4
TO_2024_PED = {0: 0, 1: 2, 2: 4, 3: 1}  # NETC 2, oedema 4, ET 1


def _relabel(img: nib.Nifti1Image, table: dict[int, int]) -> nib.Nifti1Image:
    seg = np.asarray(img.dataobj).astype(np.uint8)
    out = np.zeros_like(seg)
    for src, dst in table.items():
        out[seg == src] = dst
    return nib.Nifti1Image(out, img.affine, img.header)


def _files(case_dir: Path) -> dict[str, Path]:
    return {p.name.split("-")[-1].split(".")[0]: p for p in case_dir.glob("*.nii.gz")}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sim-sites")
    write_dataset(root / "ph", {"GLI": 3, "PED": 3, "MEN": 3}, shape=(48, 48, 48), seed=1,
                  progress=False)
    for i, case in enumerate(sorted((root / "ph" / "GLI").iterdir())):  # BraTS 2021 names
        cid = f"BraTS2021_{i:05d}"
        (root / "gli2021" / cid).mkdir(parents=True)
        for key, path in _files(case).items():
            img = nib.load(path)
            if key == "seg":
                img = _relabel(img, TO_2021)
            nib.save(img, root / "gli2021" / cid / f"{cid}_{NAMES_2021[key]}.nii.gz")
    for case in sorted((root / "ph" / "PED").iterdir()):  # BraTS 2024 PED: same names
        (root / "ped2024" / case.name).mkdir(parents=True)
        for key, path in _files(case).items():
            img = nib.load(path)
            nib.save(_relabel(img, TO_2024_PED) if key == "seg" else img,
                     root / "ped2024" / case.name / path.name)
    rows = ["case_id,t1n,t1c,t2w,t2f,seg"]  # a manifest of other names; case 0 lacks t2w
    (root / "men" / "scans").mkdir(parents=True)
    for i, case in enumerate(sorted((root / "ph" / "MEN").iterdir())):
        cells = []
        for key in ("t1n", "t1c", "t2w", "t2f", "seg"):
            if i == 0 and key == "t2w":
                cells.append("")
                continue
            name = f"scans/patient{i}_{key}.nii.gz"
            nib.save(nib.load(_files(case)[key]), root / "men" / name)
            cells.append(name)
        rows.append(",".join([f"patient{i}", *cells]))
    (root / "men" / "cases.csv").write_text("\n".join(rows) + "\n")
    return root


def _site_args(root: Path) -> list[str]:
    return ["--site", f"GLI={root / 'gli2021'},labels=brats2021",
            "--site", f"MEN={root / 'men'},manifest={root / 'men' / 'cases.csv'}",
            "--site", f"PED={root / 'ped2024'},labels=brats2024-ped"]


def test_site_arguments_and_sites_file(tmp_path):
    assert parse_site_arg("GLI=/d/gli, labels=brats2021") == {
        "population": "GLI", "data-dir": "/d/gli", "labels": "brats2021"}
    for bad in ("GLI", "=/d", "GLI=/d,label=brats2021", "GLI=/d,manifest="):
        with pytest.raises(ConfigError, match="--site"):
            parse_site_arg(bad)
    f = tmp_path / "sites.toml"
    f.write_text('[[site]]\npopulation = "MEN"\ndata-dir = "men"\nmanifest = "men/c.csv"\n'
                 '[[site]]\npopulation = "SSA"\ndata-dir = "/abs/ssa"\nlabels = "brats2021"\n')
    sites = read_sites_file(f)
    assert sites[0] == {"population": "MEN", "data-dir": str(tmp_path / "men"),
                        "manifest": str(tmp_path / "men" / "c.csv")}
    assert sites[1]["data-dir"] == "/abs/ssa"
    text = sim_sites_setting(sites)
    assert [s["labels"] for s in simulation_sites(text)] == ["brats2023", "brats2021"]
    with pytest.raises(ConfigError, match="no such file"):
        read_sites_file(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[site]\npopulation = 3\n")
    with pytest.raises(ConfigError, match=r"\[\[site\]\]"):
        read_sites_file(tmp_path / "bad.toml")


def test_sim_sites_setting_is_checked_and_maps_partitions(tmp_path):
    for text, match in (("[", "JSON list"), ("[]", "non-empty"),
                        ('[{"population": "XYZ", "data-dir": "/d"}]', "XYZ"),
                        ('[{"population": "GLI"}]', "data-dir are required"),
                        ('[{"population": "GLI", "data-dir": "/d", "labels": "b"}]', "'b'"),
                        ('[{"population": "GLI", "data-dir": "/d", "path": "/d"}]', "'path'"),
                        ('[{"population": "GLI", "data-dir": "/a"}, '
                         '{"population": "gli", "data-dir": "/b"}]', "twice")):
        with pytest.raises(ConfigError, match=match):
            simulation_sites(text)
    two = json.dumps([{"population": "MEN", "data-dir": "/d/men", "manifest": "/d/men.csv"},
                      {"population": "SSA", "data-dir": "/d/ssa", "labels": "brats2021"}])
    with pytest.raises(ConfigError, match="num-sites"):  # the default is 5 sites
        load_run_config({"sim-sites": two})
    run = load_run_config({"sim-sites": two, "num-sites": 2, "output-dir": str(tmp_path)})
    men = site_from_node_config({"partition-id": 0}, run)
    ssa = site_from_node_config({"partition-id": 1}, run)
    assert (men.population, men.data_dir, men.manifest) == ("MEN", Path("/d/men"),
                                                            Path("/d/men.csv"))
    assert (ssa.population, ssa.labels, ssa.manifest) == ("SSA", "brats2021", None)
    assert ssa.work_dir == tmp_path / "sites" / "SSA"
    with pytest.raises(ConfigError, match="partition-id 2"):
        site_from_node_config({"partition-id": 2}, run)


def test_every_sites_data_is_checked_before_anything_starts(sites, tmp_path, capsys):
    good = simulation_sites(sim_sites_setting(
        [parse_site_arg(a) for a in _site_args(sites)[1::2]]))
    assert check_sites_data(good) == []
    # the BraTS 2021 folder read with the 2023 convention: the label 4 is named, with the fix
    wrong = [dict(good[0], labels="brats2023")]
    (msg,) = check_sites_data(wrong)
    assert "site GLI" in msg and "BraTS2021_00000" in msg and "brats2021" in msg
    # a torn file: the case, the file and what was found
    broken = tmp_path / "broken" / "BraTS2021_00000"
    broken.mkdir(parents=True)
    for f in (sites / "gli2021" / "BraTS2021_00000").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "BraTS2021_00000_t2.nii.gz").write_bytes(b"not a nifti")
    rc = main(["simulate", "--out", str(tmp_path / "run"), "--preset", "tiny",
               "--site", f"GLI={broken.parent},labels=brats2021",
               "--site", f"PED={sites / 'ped2024'},labels=brats2024-ped"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing was started" in err
    assert "BraTS2021_00000_t2.nii.gz" in err and "not a gzip file" in err
    assert not (tmp_path / "run").exists()
    (broken / "BraTS2021_00000_t2.nii.gz").write_bytes(
        (sites / "gli2021" / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz").read_bytes())
    (msg,) = check_sites_data([dict(good[0], **{"data-dir": str(broken.parent)})])
    assert "1 case(s) with a segmentation; a site needs at least 2" in msg


def test_a_data_folder_that_does_not_exist_is_an_error_unless_synth(tmp_path, capsys):
    typo = tmp_path / "typo"
    assert main(["simulate", "--data", str(typo), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--data {typo} does not exist" in err and "--synth" in err
    assert not typo.exists() and not (tmp_path / "run").exists()
    assert main(["simulate", "--data", str(tmp_path), "--site", "GLI=/x"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["simulate", "--sites", "3", "--site", "GLI=/x", "--site", "SSA=/y"]) == 2
    assert "name 2 sites" in capsys.readouterr().err


def test_three_sites_of_their_own_data_run_end_to_end(sites, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "--out", str(out), "--preset", "tiny", "--verbose",
               *_site_args(sites), "--set", "num-rounds=2", "--set", "final-tta=false"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["sites"]) == ["GLI", "PED", "MEN"]  # in population order
    for pop in ("GLI", "MEN", "PED"):
        assert 0.0 <= report["sites"][pop]["student"]["WT"]["dice"] <= 1.0
        assert (out / "sites" / pop / "teacher.pt").is_file()
    info = {pop: v["info"] for pop, v in json.loads((out / "sites.json").read_text()).items()}
    assert info["MEN"]["num_cases"] == 3 and info["MEN"]["contrast.t2w"] == 2  # the manifest's
    for pop in ("GLI", "PED"):  # read with their own label conventions
        assert info[pop]["num_usable"] == 3 and info[pop]["num_unusable"] == 0
