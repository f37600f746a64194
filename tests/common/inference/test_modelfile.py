"""The student model file: what the server writes, what load_student reads, and every way a file
can be unusable, each with a message naming the file, what was expected and what was found."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedbrats.common.config import PRESETS
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.inference.modelfile import (
    STUDENT_FORMAT,
    ModelFileError,
    PostprocessThresholds,
    load_student,
    student_payload,
)
from fedbrats.common.networks.models import build_network, resolve_spec, student_spec
from fedbrats.common.utils.files import save_atomic

RUN = PRESETS["tiny"]


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_network(student_spec(RUN)).state_dict()


@pytest.fixture
def student_file(tmp_path, weights):
    path = tmp_path / "student.pt"
    save_atomic(path, student_payload(RUN, weights, server_round=2))
    return path


def test_round_trip_gives_a_ready_network(student_file, weights):
    raw = torch.load(student_file, weights_only=True)  # plain values and tensors only
    assert raw["format"] == STUDENT_FORMAT == "fedbrats-student/1"
    assert raw["postprocess"] == {"min_component_mm3": 50.0, "et_min_mm3": 100.0}

    student = load_student(student_file)
    assert student.spec == student_spec(RUN)  # student-tiny, a block per population
    assert student.spacing == (4.0, 4.0, 4.0) and student.patch_size == (32, 32, 32)
    assert student.channels == CONTRASTS and student.label_convention == "brats2023"
    assert student.postprocess == PostprocessThresholds(50.0, 100.0)
    assert student.round == 2 and student.path == student_file and student.device == "cpu"
    assert not student.network.training
    for key, value in student.network.state_dict().items():
        assert torch.equal(value, weights[key])
    with torch.no_grad():
        assert student.network(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_the_file_says_which_contrasts_the_student_learnt_to_do_without(tmp_path, weights):
    def trained_without(run=None, edit=None):
        payload = student_payload(run or RUN, weights, server_round=1)
        if edit:
            config = json.loads(payload["config"])
            edit(config)
            payload["config"] = json.dumps(config)
        save_atomic(tmp_path / "s.pt", payload)
        return load_student(tmp_path / "s.pt").trained_without

    assert trained_without() == ("t1n", "t1c", "t2w")  # the default dropout-contrasts
    assert trained_without(dataclasses.replace(RUN, dropout_contrasts="all")) == CONTRASTS
    assert trained_without(dataclasses.replace(RUN, modality_dropout=False)) == ()
    # a file written before dropout-contrasts existed: dropout removed every contrast
    assert trained_without(edit=lambda c: c.pop("dropout_contrasts")) == CONTRASTS
    assert trained_without(edit=lambda c: c.clear()) is None


def test_thresholds_chosen_at_save_time_travel_in_the_file(tmp_path, weights):
    path = tmp_path / "student.pt"
    save_atomic(path, student_payload(RUN, weights, 1, {"min_component_mm3": 10,
                                                        "et_min_mm3": 0}))
    assert load_student(path).postprocess == PostprocessThresholds(10.0, 0.0)
    with pytest.raises(ValueError, match="et_min_mm3: expected a volume >= 0"):
        student_payload(RUN, weights, 1, {"min_component_mm3": 10, "et_min_mm3": -1})
    with pytest.raises(ValueError, match="unknown post-processing settings"):
        student_payload(RUN, weights, 1, {"min_size": 10})


def test_the_server_writes_the_same_file(tmp_path, weights):
    from fedbrats.server.state import STUDENT_FORMAT as SERVER_FORMAT
    from fedbrats.server.state import RunFolder

    folder = RunFolder(dataclasses.replace(RUN, output_dir=str(tmp_path / "run")))
    path = folder.save_student(weights, server_round=2)
    assert SERVER_FORMAT == STUDENT_FORMAT
    student = load_student(path)
    assert student.round == 2 and json.loads(torch.load(path, weights_only=True)["config"])


def test_a_file_from_before_postprocess_gets_the_defaults(tmp_path, weights):
    payload = student_payload(RUN, weights, 1)
    del payload["postprocess"]
    path = tmp_path / "old.pt"
    torch.save(payload, path)
    assert load_student(path).postprocess == PostprocessThresholds()


# --------------------------------------------------------------------------------------------
# Unusable files
# --------------------------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(ModelFileError) as e:
        load_student(path)
    msg = str(e.value)
    assert str(path) in msg  # always names the file
    return msg


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.pt")
    assert "model file not found" in msg and STUDENT_FORMAT in msg


def test_truncated_file(student_file):
    data = student_file.read_bytes()
    student_file.write_bytes(data[: len(data) // 2])
    msg = _error(student_file)
    assert "truncated or corrupt" in msg and "expected a fedbrats-student/1 file" in msg


def test_garbage_file(tmp_path):
    path = tmp_path / "student.pt"
    path.write_bytes(b"not a torch file at all\n" * 10)
    assert "truncated or corrupt" in _error(path)


def test_foreign_bare_state_dict(tmp_path, weights):
    path = tmp_path / "weights.pt"
    torch.save(weights, path)
    msg = _error(path)
    assert "not a fedbrats student file: no 'format' key" in msg
    assert "bare state_dict" in msg and "model.0.conv.unit0.conv.weight" in msg


def test_foreign_pickled_module(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module
    msg = _error(path)
    assert "not a fedbrats student file: it holds a pickled torch.nn.modules.linear.Linear" in msg
    assert "weights_only=True" in msg


def test_foreign_non_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    assert "found a Tensor" in _error(path)


def test_wrong_format(tmp_path, weights):
    payload = student_payload(RUN, weights, 1)
    payload["format"] = "fedbrats-teacher/1"
    path = tmp_path / "teacher.pt"
    torch.save(payload, path)
    msg = _error(path)
    assert "format 'fedbrats-teacher/1'; expected 'fedbrats-student/1'" in msg


def test_server_checkpoint_is_not_a_student(tmp_path, weights):
    path = tmp_path / "round-002.pt"
    torch.save({"round": 2, "state_dict": weights, "strategy_state": {}}, path)
    msg = _error(path)
    assert "no 'format' key" in msg and "round, state_dict, strategy_state" in msg


def test_missing_keys(tmp_path, weights):
    payload = student_payload(RUN, weights, 1)
    del payload["spacing"], payload["channels"]
    path = tmp_path / "student.pt"
    torch.save(payload, path)
    msg = _error(path)
    assert "lacks spacing, channels" in msg and "expected keys format, spec" in msg


def test_weights_of_another_network(tmp_path):
    other = build_network(resolve_spec("student-cpu")).state_dict()
    path = tmp_path / "student.pt"
    torch.save(student_payload(RUN, other, 1), path)  # student-tiny spec, student-cpu weights
    msg = _error(path)
    assert "state_dict does not match the network spec (UNet" in msg
    assert "weights of the wrong shape" in msg and "expected shape" in msg


def test_weights_with_missing_entries(tmp_path, weights):
    partial = dict(list(weights.items())[:-2])
    path = tmp_path / "student.pt"
    torch.save(student_payload(RUN, partial, 1), path)
    assert "2 missing weights" in _error(path)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("spec", "{not json", "spec is not a valid network spec"),
        ("channels", ["t1c", "t1n", "t2w", "t2f"], "expected ['t1n', 't1c', 't2w', 't2f']"),
        ("label_convention", "brats2021", "expected 'brats2023'"),
        ("spacing", [1.0, 0.0, 1.0], "spacing: expected a voxel size in mm > 0"),
        ("patch_size", "big", "patch_size: expected a patch size"),
        ("postprocess", {"min_component_mm3": -5.0, "et_min_mm3": 100.0},
         "expected a volume >= 0"),
    ],
)
def test_bad_values(tmp_path, weights, key, value, expected):
    payload = student_payload(RUN, weights, 1)
    payload[key] = value
    path = tmp_path / "student.pt"
    torch.save(payload, path)
    assert expected in _error(path)
