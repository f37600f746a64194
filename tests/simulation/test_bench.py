"""``fedbrats bench quality`` and ``fedbrats bench perf`` in their --quick sizes: the results
files exist, with the right rows and columns and finite numbers (timings themselves are not
checked). Plus the pieces that need no training: the aggregation mean, the summary tables."""

import dataclasses
import json
import math
import re

import pytest
import torch

from fedbrats.common.cli import main
from fedbrats.common.data.contract import POPULATIONS, REGIONS
from fedbrats.simulation.bench.perf import fmt_mean_sd, md_table, mean_sd
from fedbrats.simulation.bench.quality import (
    DISTILLATION_VARIANTS,
    FULL,
    METHODS,
    QUICK,
    SUBSETS,
    PartStore,
    compute_matched_rounds,
    weighted_mean,
)
from fedbrats.simulation.bench.quality_report import Group, method_table, targets


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
    args = ["bench", "quality", "--quick", "--out", str(root / "out"), "--work",
            str(root / "work")]
    assert main(args) == 0
    parts = sorted((root / "out" / "quality-parts").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    assert main(args) == 0  # again: every part is found, nothing runs
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps
    return root / "out"


def _parts(quality) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())
            for p in (quality / "quality-parts" / "f1" / "seed-0").glob("*.json")}


def test_quality_writes_report_json_charts_and_one_part_per_method(quality):
    for name in ("quality.md", "quality.json", "quality.png", "quality-curves.png"):
        assert (quality / name).stat().st_size > 500, name
    assert (quality / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert set(_parts(quality)) == set(METHODS)


def test_quality_parts_have_every_population_region_and_the_settings(quality):
    parts = _parts(quality)
    assert {p["group"] for p in parts.values()} == {QUICK.group()}
    assert all(p["key"] == QUICK.key(0, m) for m, p in parts.items())
    for method, part in parts.items():
        assert part["preset"] == "tiny" and part["fraction"] == 1 and part["seed"] == 0
        assert set(part["scores"]) == set(POPULATIONS), method
        for pop, regions in part["scores"].items():
            assert set(regions) == set(REGIONS)
            for region, m in regions.items():
                assert 0.0 <= m["dice"] <= 1.0 and _finite(m["hd95"]), (method, pop, region)
                v = m["volume_ratio"]  # nan where the case has none of the region
                assert _finite(m["lesion_dice"]) and (math.isnan(v) or v >= 0)
    assert set(parts["teacher"]["cross"]) == set(POPULATIONS)
    assert set(parts["student"]["subsets"]) == {"+".join(s) for s in SUBSETS}
    run = QUICK.run(0)
    for method in ("fedavg", "student", "fedavg_cm"):  # a point every round at this size
        assert len(parts[method]["curve"]) >= run.num_rounds, method
    assert len(parts["fedavg_cm"]["curve"]) == compute_matched_rounds(run)
    assert parts["warm_student"]["changes"]["teacher_warm_rounds"] >= 1
    assert parts["no_feature_kd"]["changes"] == {"feature_weight": 0.0, "student_heads": "shared"}


def test_quality_json_has_the_headline_and_the_targets(quality):
    data = json.loads((quality / "quality.json").read_text())
    assert data["command"] == f"fedbrats bench quality --quick --out {quality} --work " \
        f"{quality.parent / 'work'}"
    assert {"cpu", "cores", "ram_gib", "torch", "flwr", "gpu", "date"} <= set(data["machine"])
    (group,) = data["groups"]
    assert set(group["headline"]) == set(METHODS)
    assert set(group["targets"]) == set(DISTILLATION_VARIANTS)
    for rows in group["targets"].values():
        assert len(rows) == 4 and all(isinstance(ok, bool) for _, _, ok in rows)


def test_quality_markdown_tables_have_the_right_rows_and_columns(quality):
    md = (quality / "quality.md").read_text()
    assert "`fedbrats bench quality --quick" in md and "GPU: " in md and "torch 2." in md
    for region in REGIONS:
        rows = _table_rows(md, f"### {region} Dice")
        assert [r[0] for r in rows] == list(METHODS.values())
        for row in rows:
            assert len(row) == 2 + len(POPULATIONS) + 4  # seeds; mean, worst, worst pop., gap
            numbers = [row[i] for i in (*range(2, 8), 8, 10)]
            assert all(re.fullmatch(r"\d+\.\d+( ± \d+\.\d+)?", v) for v in numbers), row
            assert row[9].split()[0] in POPULATIONS
    targets_rows = _table_rows(md, "### The issue's targets: fedbrats student")
    assert len(targets_rows) == 4 and all(r[2] in ("yes", "**no**") for r in targets_rows)
    paired = _table_rows(md, "### Paired differences")
    assert {r[0] for r in paired} >= {"fedbrats student - FedAvg, labels only"}
    assert {r[1] for r in paired} == set(REGIONS)
    lesion = _table_rows(md, "### MET lesion-wise")
    assert len(lesion) == len(METHODS) and all(len(r) == 7 for r in lesion)
    cross = _table_rows(md, "### Local teachers on every population")
    assert [r[0] for r in cross] == list(POPULATIONS)
    subsets = _table_rows(md, "### The student with missing contrasts")
    assert [r[0] for r in subsets] == ["+".join(s) for s in SUBSETS]
    assert "held-out" in md and "preset `tiny`" in md


def test_a_part_made_with_other_settings_is_not_taken(tmp_path):
    store = PartStore(tmp_path)
    store.put(QUICK, 0, "fedavg", {"scores": {}})
    assert store.get(QUICK, 0, "fedavg") is not None
    other = dataclasses.replace(QUICK, test_cases=2)
    assert other.key(0, "fedavg") != QUICK.key(0, "fedavg")
    assert store.get(other, 0, "fedavg") is None
    assert QUICK.key(0, "fedavg") == QUICK.key(1, "fedavg")  # the seed is not in the key
    assert QUICK.group() == dataclasses.replace(QUICK, seeds=(1,)).group()


def test_each_method_is_keyed_by_the_settings_it_trains_with(tmp_path, monkeypatch):
    """A change to the preset's distillation makes the distillation parts stale, not the
    teachers' or FedAvg's; a variant that pins the changed setting stays valid."""
    from fedbrats.common import config

    methods = ("teacher", "fedavg", "fedavg_heads", "student", "shared_head", "no_trust")
    before = {m: QUICK.key(0, m) for m in methods}
    assert before["student"] != before["no_trust"]  # the preset's student trusts by region
    assert before["student"] != before["shared_head"]  # and has a last block per population
    assert before["fedavg"] != before["fedavg_heads"]
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny", dataclasses.replace(tiny, kd_trust="none"))
    after = {m: QUICK.key(0, m) for m in before}
    assert after["teacher"] == before["teacher"] and after["fedavg"] == before["fedavg"]
    assert after["student"] != before["student"]
    assert after["no_trust"] == before["no_trust"]
    # the preset's student with one shared block: what shared_head pins, teachers unchanged
    monkeypatch.setitem(config.PRESETS, "tiny", dataclasses.replace(tiny, student_heads="shared"))
    after = {m: QUICK.key(0, m) for m in before}
    assert after["student"] == before["shared_head"] == after["shared_head"]
    assert after["teacher"] == before["teacher"] and after["fedavg"] == before["fedavg"]
    monkeypatch.setitem(config.PRESETS, "tiny", dataclasses.replace(tiny, num_rounds=3))
    assert QUICK.key(0, "fedavg") != before["fedavg"]  # FedAvg's own schedule changed


def test_the_report_leaves_out_stale_parts(tmp_path, monkeypatch):
    from fedbrats.common import config

    store = PartStore(tmp_path)
    for method in ("fedavg", "student"):
        store.put(QUICK, 0, method, {"scores": {}})
    assert {p["method"] for p in store.current(QUICK)} == {"fedavg", "student"}
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny", dataclasses.replace(tiny, temperature=4.0))
    assert {p["method"] for p in store.current(QUICK)} == {"fedavg"}
    assert store.get(QUICK, 0, "student") is None and len(store.all()) == 2


def test_preset_schedule_is_scaled_by_the_fraction():
    full, third = FULL.run(0), dataclasses.replace(FULL, fraction=1 / 3).run(0)
    assert (full.num_rounds, full.teacher_epochs) == (60, 30)
    assert (third.num_rounds, third.teacher_epochs) == (20, 10)
    assert third.local_steps == full.local_steps and third.dropout_prob == full.dropout_prob
    assert compute_matched_rounds(full) == 60 + 8  # 240 teacher steps = 8 rounds of 30
    with pytest.raises(ValueError, match="fraction"):
        dataclasses.replace(FULL, fraction=0)


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
        # a record carries the float32 arrays plus framing (most for the tiny student's many
        # small arrays: its five heads among them)
        assert 1.0 <= b["ratio_train_round_over_2x_float32"] < 1.3
        assert 0.5 <= b["ratio_float16_train_round_over_2x_float32"] < 0.8  # + framing
    # byte counts, not timings: the float16 copy of a BraTS-size student is half the bytes
    assert data["bytes"]["student-gpu"]["ratio_float16_train_round_over_2x_float32"] <= 0.52
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


def _fake_group(values_by_seed, methods=("student", "fedavg")):
    """A report group where every method scores ``values[pop]`` (+ its offset) on every region."""
    parts = []
    for seed, values in enumerate(values_by_seed):
        for i, m in enumerate(methods):
            scores = {p: {r: {"dice": values[p] - 0.1 * i, "hd95": 10 * (1 - values[p])}
                          for r in REGIONS} for p in POPULATIONS}
            parts.append({"method": m, "seed": seed, "preset": "x", "fraction": 1.0,
                          "key": "k", "scores": scores})
    return Group(parts)


def test_worst_population_and_gap_over_seeds():
    seeds = [dict(GLI=0.9, SSA=0.5, PED=0.7, MEN=0.8, MET=0.6),
             dict(GLI=0.9, SSA=0.7, PED=0.5, MEN=0.8, MET=0.6)]
    g = _fake_group(seeds)
    s = g.summary("student", "WT")
    assert s["worst"] == [0.5, 0.5] and s["worst_population"] == ["SSA", "PED"]
    assert s["gap"] == pytest.approx([0.4, 0.4])
    assert s["mean"] == pytest.approx([0.7, 0.7])
    hd = g.summary("student", "WT", "hd95", False)
    assert hd["worst"] == pytest.approx([5.0, 5.0])  # the highest distance is the worst
    table = method_table(g, "WT")
    row = next(r for r in table.splitlines() if r.startswith("| fedbrats student")).split(" | ")
    assert row[3] == "0.600 ± 0.141"  # SSA over the two seeds
    assert "SSA 1/2" in table  # the seeds disagree on the worst population
    d = g.paired("student", "fedavg")
    assert d["seeds"] == [0, 1] and d["WT"]["GLI"] == pytest.approx([0.1, 0.1])
    assert d["TC"]["mean"] == pytest.approx([0.1, 0.1])


def test_targets_are_judged_on_the_paired_differences():
    seeds = [dict(GLI=0.9, SSA=0.5, PED=0.7, MEN=0.8, MET=0.6)] * 2
    # student best, then FedAvg, teacher and ensemble 0.1 and more below it
    g = _fake_group(seeds, ("student", "fedavg", "teacher", "ensemble"))
    rows = targets(g)
    assert [ok for _, _, ok in rows] == [True, False, True, True]  # the gap is the same
    assert "15 of 15" in rows[2][1]
    worse = _fake_group(seeds, ("fedavg", "teacher", "student", "ensemble"))
    assert [ok for _, _, ok in targets(worse)] == [False, False, False, True]
    assert targets(_fake_group(seeds)) is None  # no teacher, no ensemble: not judged


@pytest.mark.slow
def test_deployment_rounds_are_timed_against_the_simulation(tmp_path):
    """bench perf's deployment figure at the tiny preset: a real SuperLink and SuperNode (TLS,
    node authentication) against the simulation engine, the same rounds timed by the server."""
    from fedbrats.simulation.bench.perf import md_deployment, measure_deployment

    dep = measure_deployment(tmp_path, cases=3, shape=(48, 48, 48), rounds=2, preset="tiny",
                             threads=1)
    for name in ("simulation", "deployment"):
        seconds = dep[f"{name}_round_seconds"]
        assert len(seconds) == 2 and all(0 < s < 600 for s in seconds), seconds
        for start, total in zip(dep["round_start"][name], seconds, strict=True):
            assert 0 < start["first_step_s"] < start["round_s"] < total
    # a fresh ClientApp process per message in deployment: its age is its start-up
    assert all(s["process_age_s"] > 0 for s in dep["round_start"]["deployment"])
    assert dep["ratio"] == pytest.approx(dep["deployment_round_seconds"][1]
                                         / dep["simulation_round_seconds"][1])
    md = "\n".join(md_deployment(dep))
    assert "| deployment | 2 |" in md and f"ratio **{dep['ratio']:.2f}**" in md
    with pytest.raises(ValueError, match="at least 2"):
        measure_deployment(tmp_path, rounds=1)
