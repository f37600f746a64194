"""``fedbrats bench quality`` and ``fedbrats bench perf`` in their --quick sizes: the results
files exist, with the right rows and columns and finite numbers (timings themselves are not
checked). Plus the pieces that need no training: the aggregation mean, the summary tables."""

import json
import math
import re

import pytest
import torch

from fedbrats.common.cli import main
from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.simulation.bench.perf import fmt_mean_sd, md_table, mean_sd
from fedbrats.simulation.bench.quality import (
    METHODS,
    QUICK,
    SUBSETS,
    method_summary,
    method_table,
    weighted_mean,
)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``."""
    assert heading in markdown, heading
    block: list[str] = []
    for ln in markdown.split(heading, 1)[1].splitlines()[1:]:
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            break
    assert block, f"no table after {heading}"
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block[2:]]


# --------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-quality")
    rc = main(["bench", "quality", "--quick", "--out", str(root / "out"), "--work",
               str(root / "work")])
    assert rc == 0
    return root / "out"


def test_quality_writes_report_json_and_charts(quality):
    for name in ("quality.md", "quality.json", "quality.png", "quality-subsets.png",
                 "quality-teachers.png"):
        assert (quality / name).stat().st_size > 500, name
    assert (quality / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_json_has_every_method_population_region_and_subset(quality):
    data = json.loads((quality / "quality.json").read_text())
    assert data["command"] == f"fedbrats bench quality --quick --out {quality} --work " \
        f"{quality.parent / 'work'}"
    assert {"cpu", "cores", "ram_gib", "torch", "flwr", "gpu", "date"} <= set(data["machine"])
    assert len(data["seeds"]) == len(QUICK.seeds)
    for seed in data["seeds"]:
        assert set(seed["scores"]) == set(METHODS)
        for method, per_pop in seed["scores"].items():
            assert set(per_pop) == set(POPULATIONS), method
            for pop, regions in per_pop.items():
                assert set(regions) == set(REGIONS)
                for region, m in regions.items():
                    assert 0.0 <= m["dice"] <= 1.0 and _finite(m["hd95"]), (method, pop, region)
                    assert _finite(m["lesion_dice"]) and _finite(m["lesion_hd95"])
        assert set(seed["cross"]) == set(POPULATIONS)
        assert all(set(row) == set(POPULATIONS) for row in seed["cross"].values())
        assert len(seed["subsets"]) == 15 and set(seed["subsets"]) == {"+".join(s)
                                                                        for s in SUBSETS}
        for per_pop in seed["subsets"].values():
            for regions in per_pop.values():
                assert all(0.0 <= regions[r]["dice"] <= 1.0 for r in REGIONS)
    assert set(data["headline"]) == set(METHODS)


def test_quality_markdown_tables_have_the_right_rows_and_columns(quality):
    md = (quality / "quality.md").read_text()
    assert "`fedbrats bench quality --quick" in md and "GPU: " in md and "torch 2." in md
    for region in REGIONS:
        for title in ("Dice", "HD95 (mm)"):
            rows = _table_rows(md, f"### {region} {title}")
            assert [r[0] for r in rows] == list(METHODS.values())
            for row in rows:
                assert len(row) == 1 + len(POPULATIONS) + 4  # mean, worst, worst pop., gap
                numbers = [row[i] for i in (*range(1, 7), 7, 9)]
                assert all(re.fullmatch(r"\d+\.\d+( ± \d+\.\d+)?", v) for v in numbers), row
                assert row[8].split()[0] in POPULATIONS
    lesion = _table_rows(md, "### MET lesion-wise")
    assert len(lesion) == len(METHODS) and all(len(r) == 7 for r in lesion)
    cross = _table_rows(md, "## Local teachers on every population")
    assert [r[0] for r in cross] == list(POPULATIONS)
    subsets = _table_rows(md, "## The student with missing contrasts")
    assert [r[0] for r in subsets] == ["+".join(s) for s in SUBSETS]
    assert all(re.fullmatch(r"\d\.\d\d / \d\.\d\d / \d\.\d\d", c) for r in subsets for c in r[1:])
    assert "not through Flower" in md and "held-out" in md


# --------------------------------------------------------------------------------------------
# Perf
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perf(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-perf")
    rc = main(["bench", "perf", "--quick", "--out", str(root / "out"), "--work",
               str(root / "work")])
    assert rc == 0
    return root / "out"


def test_perf_writes_report_json_and_chart(perf):
    for name in ("perf.md", "perf.json", "perf.png"):
        assert (perf / name).stat().st_size > 500, name


def test_perf_figures_are_finite_ratios(perf):
    data = json.loads((perf / "perf.json").read_text())
    for steps in data["steps"].values():
        assert _finite(steps["ratio_distillation_over_supervised"])
        assert steps["ratio_distillation_over_supervised"] > 0
        assert all(_finite(v) and v > 0 for v in steps["voxels_per_second"].values())
    assert set(data["bytes"]) >= {"student-tiny", "student-gpu"}
    for b in data["bytes"].values():
        # a record carries the float32 arrays plus a little framing
        assert 1.0 <= b["ratio_train_round_over_2x_float32"] < 1.2
    inf = data["inference"]
    assert _finite(inf["ratio_student_over_ensemble"]) and _finite(inf["ratio_predict_over_direct"])
    mem = data["memory"]["peak_mib_after"]
    assert list(mem) == ["python", "imports", "data", "distill_round", "evaluate"]
    assert all(_finite(v) and v > 0 for v in mem.values())
    assert mem["evaluate"] >= mem["imports"] >= mem["python"]
    assert data["simulation"] is None  # --quick skips it
    prof = data["profile"]
    assert len(prof["top_ops_by_self_cpu"]) > 5 and len(prof["top_functions_by_self_time"]) > 5
    assert prof["phases_cumulative_s"]["backward"] > 0


def test_perf_markdown_summary_rows(perf):
    md = (perf / "perf.md").read_text()
    rows = _table_rows(md, "## Summary")
    figures = [r[0] for r in rows]
    for start in ("distillation step / supervised step", "simulation wall time",
                  "bytes per site per round (student-tiny", "inference, one 32x32x32 case: "
                  "student / five-teacher ensemble", "inference, one 32x32x32 case: predict_case",
                  "peak memory of a site process", "throughput (cpu, 1 thread)"):
        assert any(f.startswith(start) for f in figures), start
    for row in rows:
        assert len(row) == 4
        if row[3] != "n/a":
            assert _finite(float(row[3])), row
    assert "No GPU on this machine" in md
    assert "Top operators by self CPU time" in md and "Top Python functions" in md


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_weighted_mean_of_state_dicts():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    equal = weighted_mean([a, b], [1, 1])
    assert torch.allclose(equal["w"], torch.tensor([2.0, 4.0]))
    assert equal["w"].dtype == torch.float32
    assert int(equal["n"]) == 3  # integer buffers are taken from the first state
    cases = weighted_mean([a, b], [3, 1])
    assert torch.allclose(cases["w"], torch.tensor([1.0, 3.0]))


def test_mean_sd_and_formatting():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([5.0]) == (5.0, 0.0)
    assert math.isnan(mean_sd([float("nan")])[0])
    assert fmt_mean_sd([0.5, 0.7], 2) == "0.60 ± 0.14"
    assert fmt_mean_sd([0.5], 3) == "0.500"
    assert fmt_mean_sd([], 3) == "n/a"
    assert md_table(["a", "b"], [[1, "x|y"]], ["l", "r"]).splitlines() == [
        "| a | b |", "|:---|---:|", "| 1 | x\\|y |"]


def _fake_results(values_by_seed):
    """Results of seeds where every method scores ``values[pop]`` as WT Dice."""
    out = []
    for values in values_by_seed:
        scores = {m: {p: {"WT": {"dice": values[p], "hd95": 10 * (1 - values[p])}}
                      for p in POPULATIONS} for m in METHODS}
        out.append({"scores": scores})
    return out


def test_worst_population_and_gap_over_seeds():
    seeds = [dict(GLI=0.9, SSA=0.5, PED=0.7, MEN=0.8, MET=0.6),
             dict(GLI=0.9, SSA=0.7, PED=0.5, MEN=0.8, MET=0.6)]
    s = method_summary(_fake_results(seeds), "student", "WT", "dice", True)
    assert s["worst"] == [0.5, 0.5] and s["worst_population"] == ["SSA", "PED"]
    assert s["gap"] == pytest.approx([0.4, 0.4])
    assert s["mean"] == pytest.approx([0.7, 0.7])
    hd = method_summary(_fake_results(seeds), "student", "WT", "hd95", False)
    assert hd["worst"] == pytest.approx([5.0, 5.0])  # the highest distance is the worst
    table = method_table(_fake_results(seeds), "WT", "dice", True, 3)
    row = table.splitlines()[2].split(" | ")
    assert row[2] == "0.600 ± 0.141"  # SSA over the two seeds
    assert "SSA 1/2" in table  # the seeds disagree on the worst population
