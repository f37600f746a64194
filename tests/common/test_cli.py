"""The console script: fast help, and the README's first command end to end on a small grid."""

import subprocess
import sys

import pytest

from fedbrats.common.cli import build_parser, main
from fedbrats.common.data.cases import discover_cases
from fedbrats.common.data.contract import POPULATIONS
from fedbrats.common.data.verify import verify_site


def test_help_imports_no_heavy_library():
    code = (
        "import sys, fedbrats.common.cli\n"
        "fedbrats.common.cli.build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'monai', 'nibabel', 'scipy', 'flwr', 'matplotlib') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", ["synth", "snapshot", "verify-data"])
def test_every_subcommand_has_full_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: fedbrats {command}" in out
    # every option is documented
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_synth_writes_a_data_set_that_passes_the_data_contract(tmp_path, capsys):
    out = tmp_path / "phantoms"
    rc = main(["synth", "--out", str(out), "--cases", "2", "--shape", "48", "--no-progress"])
    assert rc == 0
    for pop in POPULATIONS:
        cases = discover_cases(out / pop)
        assert cases and all(c.population == pop for c in cases)
        assert all(r.ok for r in verify_site(out / pop)), pop
    # the whole tree is one site folder too: discovery finds every case
    assert len(discover_cases(out)) >= 2 * len(POPULATIONS)


def test_verify_data_exit_codes(tmp_path, brats2023_site, capsys):
    assert main(["verify-data", str(brats2023_site)]) == 0
    assert "2 cases: 2 usable, 0 unusable" in capsys.readouterr().out
    assert main(["verify-data", str(brats2023_site), "--labels", "brats2021"]) == 1
    out = capsys.readouterr().out
    assert "UNUSABLE" in out and "--labels brats2023" in out
    assert main(["verify-data", str(tmp_path / "missing")]) == 2
    assert "site folder not found" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("num-round=3", "did you mean 'num-rounds'"),
        ("num-rounds=x", "expected a number, got 'x'"),
        ("output-dir=it's", "may not contain a single quote"),
        ("num-rounds", "expects KEY=VALUE"),
    ],
)
def test_simulate_refuses_a_bad_setting_before_generating_data(tmp_path, capsys, setting, message):
    data, out = tmp_path / "data", tmp_path / "run"
    code = main(["simulate", "--data", str(data), "--out", str(out), "--set", setting])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not data.exists() and not out.exists()
