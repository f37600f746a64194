"""The teachers' federated warm start at a site: ``warm_round`` and a teacher trained from the
warm-start network (``train_teacher(init_state=...)``), without Flower."""

import dataclasses

import pytest
import torch

from fedbrats.client.data import SiteError
from fedbrats.client.teacher import TEACHER_FILE, load_teacher, train_teacher, warm_round
from fedbrats.common.config import PRESETS, ConfigError, RunConfig, SiteConfig
from fedbrats.common.networks.models import new_warm_teacher
from fedbrats.simulation.phantoms import write_dataset

RUN = dataclasses.replace(PRESETS["tiny"], teacher_epochs=1, teacher_warm_rounds=2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, {"PED": 3}, shape=(48, 48, 48), seed=3, progress=False)
    return root


def _site(data_root, tmp_path) -> SiteConfig:
    return SiteConfig(population="PED", data_dir=data_root / "PED", work_dir=tmp_path / "site")


def _state(run: RunConfig) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in new_warm_teacher(run).net.state_dict().items()}


def test_warm_network_is_the_same_everywhere_for_a_seed():
    a, b = _state(RUN), _state(RUN)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = _state(dataclasses.replace(RUN, seed=RUN.seed + 1))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_warm_round_trains_the_sent_teacher_network(data_root, tmp_path):
    site, start = _site(data_root, tmp_path), _state(RUN)
    state, metrics = warm_round(site, RUN, start, server_round=1)
    assert set(state) == set(start)
    assert metrics["num_steps"] == RUN.local_steps and metrics["loss"] > 0
    assert any(not torch.equal(state[k], start[k]) for k in start)
    again, _ = warm_round(site, RUN, start, server_round=1)  # seeded per site and round
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not (site.work_dir / TEACHER_FILE).exists()  # nothing of the round stays


def test_teacher_starts_from_the_warm_start_network(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    init = warm_round(site, RUN, _state(RUN), 1)[0]
    # a learning rate too small to move the weights: the teacher is the network it started from
    still = dataclasses.replace(RUN, teacher_lr=1e-12)
    metrics = train_teacher(site, still, init_state=init)
    assert metrics["reused"] == 0
    teacher = load_teacher(site, still, torch.device("cpu")).net.state_dict()
    assert all(torch.allclose(teacher[k].float(), init[k].float(), atol=1e-6) for k in init)
    assert still.teacher_fingerprint()["teacher_warm_rounds"] == 2


def test_warm_start_teacher_needs_the_network(data_root, tmp_path):
    with pytest.raises(SiteError, match="teacher-warm-rounds is 2 but no warm-start network"):
        train_teacher(_site(data_root, tmp_path), RUN)


def test_teachers_stored_before_the_setting_stay_valid():
    off = PRESETS["cpu-demo"]
    assert "teacher_warm_rounds" not in dataclasses.replace(off, teacher_warm_rounds=0) \
        .teacher_fingerprint()
    assert off.teacher_fingerprint() != dataclasses.replace(off, teacher_warm_rounds=1) \
        .teacher_fingerprint()


@pytest.mark.parametrize("changes, message", [
    ({"teacher_warm_rounds": -1}, "teacher-warm-rounds"),
    ({"teacher_warm_rounds": 2, "secure_aggregation": True}, "warm start"),
    ({"teacher_warm_rounds": 2, "dp_noise_multiplier": 0.5}, "warm start"),
])
def test_warm_start_settings_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(PRESETS["cpu-demo"], **changes)


def test_a_student_with_heads_starts_each_head_from_the_warm_starts_last_block(tmp_path):
    from flwr.app import ArrayRecord

    from fedbrats.common.networks.models import head_population
    from fedbrats.server.app import _resume_point
    from fedbrats.server.state import RunFolder

    run = dataclasses.replace(RUN, teacher_model="student-tiny", student_init="warm",
                              student_heads="population", output_dir=str(tmp_path / "run"))
    warm = _state(run)
    done, _, arrays, _ = _resume_point(run, RunFolder(run), None, ArrayRecord(warm))
    heads = [k for k in arrays if head_population(k)]
    assert done == 0 and len(heads) == 5 * sum(k.startswith("model.2.") for k in warm)
    for key, value in arrays.items():
        base = key.replace(f".population_heads.{head_population(key)}", "")
        assert torch.equal(value, warm[base])
