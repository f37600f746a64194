"""The teacher's outputs kept per case (run setting teacher-cache): crops aligned with the image,
built once, reused in a new process, rebuilt for a changed teacher, a torn file refused."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from monai.transforms import Compose

import fedbrats.common.data.transforms as transforms_module
from fedbrats.client.data import clear_site_data_cache
from fedbrats.client.distill import LocalTrainer, distill_round
from fedbrats.client.teacher import train_teacher
from fedbrats.client.teacher_outputs import (
    TEACHER_CACHE,
    clear_teacher_outputs,
    feature_strides,
)
from fedbrats.common.config import PRESETS, SiteConfig
from fedbrats.common.data.transforms import (
    IMAGE,
    LABEL,
    TEACHER_FEATURE,
    TEACHER_LOGITS,
    RandAlignedCropd,
    teacher_augmentation,
)
from fedbrats.common.networks.models import TappedModel, new_student, resolve_spec
from fedbrats.simulation.phantoms import write_dataset

RUN = dataclasses.replace(PRESETS["tiny"], teacher_epochs=1, kd_trust="none", teacher_cache=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, {"MET": 3}, shape=(48, 48, 48), seed=5, progress=False)
    return root


def _site(data_root, tmp_path) -> SiteConfig:
    return SiteConfig(population="MET", data_dir=data_root / "MET", work_dir=tmp_path / "site")


def test_kept_outputs_are_cropped_and_flipped_exactly_with_the_image():
    # a known pattern: each voxel's value is its coordinate; the logits carry the same pattern,
    # the stride-8 feature its cell's index, the stride-2 one its own. A crop that starts
    # between two cells gets the linear interpolation of the two: the coordinate of its own
    # cells' first voxel over the stride, exactly (flipped with the image)
    shape, patch = (48, 40, 56), (16, 16, 16)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")).float()
    label = torch.zeros(1, *shape)
    label[0, 30:34, 5:9, 40:44] = 1
    item = {IMAGE: coords + 1.0, LABEL: label, TEACHER_LOGITS: coords.half(),
            TEACHER_FEATURE + "deep": coords[:, ::8, ::8, ::8].div(8).floor().half(),
            TEACHER_FEATURE + "late": coords[:, ::2, ::2, ::2].div(2).half()}
    steps = Compose(teacher_augmentation(patch, 8, {"deep": 8, "late": 2})[:4])  # crop, flips
    steps.set_random_state(0)
    starts = set()
    for _ in range(40):
        out = steps(dict(item))
        image, logits = torch.as_tensor(out[IMAGE]), torch.as_tensor(out[TEACHER_LOGITS]).float()
        assert image.shape[1:] == patch and torch.equal(logits, image - 1)
        deep = torch.as_tensor(out[TEACHER_FEATURE + "deep"])
        late = torch.as_tensor(out[TEACHER_FEATURE + "late"])
        assert deep.dtype == late.dtype == torch.float16
        assert deep.shape[1:] == (2, 2, 2) and late.shape[1:] == (8, 8, 8)
        voxel = image - 1
        first = -torch.nn.functional.max_pool3d(-voxel[None], 8)[0]  # each cell's first voxel
        assert torch.equal(deep.float(), first / 8)
        first = -torch.nn.functional.max_pool3d(-voxel[None], 2)[0]
        assert torch.equal(late.float(), first / 2)
        starts.add(tuple(int(voxel[a].min()) for a in range(3)))
    assert len(starts) > 20  # the crops move, and not only by whole cells
    assert any(v % 8 for start in starts for v in start)


def test_aligned_crop_refuses_a_crop_that_is_not_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match="multiple of the stride 8"):
        RandAlignedCropd([IMAGE], LABEL, IMAGE, (20, 20, 20), 8, 0.5)
    crop = RandAlignedCropd([IMAGE], LABEL, IMAGE, (16, 16, 16), 8, 0.5)
    with pytest.raises(ValueError, match="pad it first"):
        crop({IMAGE: torch.zeros(1, 20, 16, 16), LABEL: torch.zeros(1, 20, 16, 16)})


def test_feature_strides_of_the_tiny_teacher():
    teacher = TappedModel.from_spec(resolve_spec(RUN.teacher_model))
    strides = feature_strides(teacher, RUN.patch_size)
    assert set(strides) == set(teacher.taps) and max(strides.values()) >= 2


def test_teacher_outputs_are_built_once_reused_rebuilt_and_a_torn_file_refused(
        data_root, tmp_path, monkeypatch, caplog):
    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    calls = []
    real = transforms_module.TeacherOutputsd.__call__
    monkeypatch.setattr(transforms_module.TeacherOutputsd, "__call__",
                        lambda self, d: calls.append(d["case_id"]) or real(self, d))
    forward = []
    real_step = LocalTrainer.step

    def counted_step(self, batch):  # the teacher is not run at a step that has its outputs
        assert TEACHER_LOGITS in batch
        handle = self.teacher.register_forward_hook(lambda *a: forward.append(1))
        try:
            return real_step(self, batch)
        finally:
            handle.remove()

    monkeypatch.setattr(LocalTrainer, "step", counted_step)
    start = new_student(RUN).net.state_dict()
    distill_round(site, RUN, start, server_round=1)
    kept = site.work_dir / TEACHER_CACHE
    files = sorted(kept.glob("*.pt"))
    assert len(calls) == len(files) == 2 and not forward  # 2 training cases, teacher run once each
    stamps = [f.stat().st_mtime_ns for f in files]

    def new_process():
        clear_site_data_cache()
        clear_teacher_outputs()

    distill_round(site, RUN, start, server_round=2)  # the same process: held in memory
    new_process()
    distill_round(site, RUN, start, server_round=3)  # a new process: read from the folder
    assert len(calls) == 2 and [f.stat().st_mtime_ns for f in files] == stamps

    # a torn file (a killed process) is refused and computed again
    files[0].write_bytes(files[0].read_bytes()[:100])
    new_process()
    with caplog.at_level(logging.WARNING):
        distill_round(site, RUN, start, server_round=4)
    assert len(calls) == 3 and "torn cache file" in caplog.text and files[0].name in caplog.text

    # another teacher: its own outputs
    other = dataclasses.replace(RUN, teacher_lr=RUN.teacher_lr / 2)
    train_teacher(site, other)
    new_process()
    distill_round(site, other, start, server_round=1)
    assert len(calls) == 5 and len(list(kept.glob("*.pt"))) == 4


def test_kept_outputs_match_the_teacher_on_the_same_crop(data_root, tmp_path):
    site = _site(data_root, tmp_path)
    train_teacher(site, RUN)
    from fedbrats.client.data import training_batches
    from fedbrats.client.teacher import load_teacher
    from fedbrats.client.teacher_outputs import teacher_training_data

    teacher = load_teacher(site, RUN, torch.device("cpu"))
    batch = next(training_batches(teacher_training_data(site, RUN, teacher, torch.device("cpu")),
                                  1, 0))
    with torch.no_grad():
        logits, _ = teacher(batch[IMAGE].as_tensor() if hasattr(batch[IMAGE], "as_tensor")
                            else batch[IMAGE])
    kept = batch[TEACHER_LOGITS].float()
    # the kept logits are the teacher's on its windows over the whole case, the step's would be on
    # the crop alone (with the student's intensity changes): the same classes almost everywhere
    agree = (kept.argmax(1) == logits.argmax(1)).float().mean()
    assert kept.shape == logits.shape and float(agree) > 0.8
    assert np.isfinite(kept.numpy()).all()
