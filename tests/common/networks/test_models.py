"""Networks, specs, feature taps and projectors (tiny inputs only)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from fedbrats.common.data.contract import CONTRASTS, NUM_CLASSES
from fedbrats.common.losses import DistillationLoss
from fedbrats.common.networks.models import (
    PRESETS,
    FeatureProjector,
    FeatureTaps,
    ModelSpec,
    TappedModel,
    build_network,
    build_projector,
    count_parameters,
    default_taps,
    get_preset,
    probe_tap_shapes,
    resolve_spec,
    spatial_divisor,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

C_IN = len(CONTRASTS)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TappedModel.from_spec("teacher-tiny"), TappedModel.from_spec("student-tiny")


# ---------------------------------------------------------------------------- specs


def test_spec_roundtrip_json_and_torch_load():
    spec = get_preset("teacher-tiny")
    data = spec.to_dict()
    assert ModelSpec.from_dict(data) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(data))) == spec
    buf = io.BytesIO()
    torch.save({"spec": data}, buf)
    buf.seek(0)
    assert ModelSpec.from_dict(torch.load(buf, weights_only=True)["spec"]) == spec
    assert data["kwargs"]["norm"] == ["GROUP", {"num_groups": 4}]


def test_spec_is_immutable_and_hashable():
    a = ModelSpec("segresnet", {"init_filters": 8, "blocks_down": [1, 1]})
    b = ModelSpec("SegResNet", {"blocks_down": (1, 1), "init_filters": 8})
    assert a == b and hash(a) == hash(b) and a.arch == "SegResNet"
    assert {a: 1}[b] == 1
    with pytest.raises(AttributeError):
        a.arch = "UNet"  # type: ignore[misc]
    opts = a.options
    opts["init_filters"] = 99
    assert a.options["init_filters"] == 8
    with pytest.raises(TypeError, match="dtype"):
        ModelSpec("UNet", {"channels": [4, 8], "strides": [2], "dtype": torch.float32})
    with pytest.raises(ValueError, match="in_channels"):
        ModelSpec("UNet", {"in_channels": 4})


def test_unknown_names_suggest():
    with pytest.raises(ValueError, match="did you mean 'SegResNet'"):
        ModelSpec("SegResNt")
    with pytest.raises(ValueError, match="did you mean 'DynUNet'"):
        build_network({"arch": "DynUNett", "kwargs": {}})
    with pytest.raises(ValueError, match="teacher-cpu"):
        get_preset("teacher_cpu")
    with pytest.raises(TypeError, match="init_filters"):
        build_network(ModelSpec("SegResNet", {"init_filter": 8}))


def test_resolve_spec_forms():
    assert resolve_spec("student-cpu") is PRESETS["student-cpu"]
    assert resolve_spec("student-cpu", num_res_units=1).options["num_res_units"] == 1
    assert resolve_spec("unet", channels=[4, 8], strides=[2]).arch == "UNet"
    assert resolve_spec(PRESETS["teacher-gpu"].to_dict()) == PRESETS["teacher-gpu"]


# ---------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_keep_spatial_size(name):
    spec = PRESETS[name]
    net = build_network(spec)
    size = 32 if name.endswith("tiny") else 16  # large presets: a small but legal size
    assert size % spatial_divisor(spec) == 0
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, C_IN, size, size, size))
    assert out.shape == (1, NUM_CLASSES, size, size, size)
    if name.endswith("tiny"):
        assert 2_000 <= count_parameters(net) <= 120_000


def test_documented_parameter_counts():
    expected = {"teacher-tiny": 111_212, "student-tiny": 39_729, "student-cpu": 300_709}
    for name, count in expected.items():
        assert count_parameters(build_network(name)) == count


@pytest.mark.parametrize(
    ("spec", "divisor", "size"),
    [
        (ModelSpec("DynUNet", {"depth": 4, "init_filters": 4}), 16, 32),
        (ModelSpec("DynUNet", {"depth": 2, "init_filters": 4}), 4, 12),
        (ModelSpec("UNet", {"channels": [4, 8, 16], "strides": [2, 2]}), 4, 12),
        (
            ModelSpec("SegResNet", {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}),
            2,
            10,
        ),
    ],
)
def test_spatial_divisor(spec, divisor, size):
    assert spatial_divisor(spec) == divisor
    net = build_network(spec).train()
    out = net(torch.randn(2, C_IN, size, size, size))
    assert out.shape == (2, NUM_CLASSES, size, size, size)


def test_dynunet_deep_supervision_rejected():
    with pytest.raises(ValueError, match="deep_supervision"):
        build_network(ModelSpec("DynUNet", {"depth": 2, "deep_supervision": True}))


# ---------------------------------------------------------------------------- taps


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # SegResNet init F=4, 4 levels: bottleneck F*8 ch at 1/8, decoder 2F ch at 1/2
        ("teacher-tiny", {"down_layers.3": (32, 4, 4, 4), "up_layers.1": (8, 16, 16, 16)}),
        # UNet channels (4, 8, 16, 32), strides (2, 2, 2): channels[-1] at 1/8, channels[0] at 1/2
        (
            "student-tiny",
            {
                "model.1.submodule.1.submodule.1.submodule": (32, 4, 4, 4),
                "model.1.submodule.2": (4, 16, 16, 16),
            },
        ),
        # DynUNet depth 3, filters (4, 8, 16, 32): filters[-1] at 1/8, filters[1] at 1/2
        (
            ModelSpec("DynUNet", {"depth": 3, "init_filters": 4}),
            {"bottleneck": (32, 4, 4, 4), "upsamples.1": (8, 16, 16, 16)},
        ),
    ],
)
def test_default_taps_shapes(spec, expected):
    model = TappedModel.from_spec(spec)
    assert default_taps(spec) == tuple(expected)
    assert probe_tap_shapes(model.net, model.taps, 32) == expected
    logits, feats = model(torch.randn(2, C_IN, 32, 32, 32))
    assert logits.shape == (2, NUM_CLASSES, 32, 32, 32)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == expected
    assert all(v.shape[0] == 2 for v in feats.values())


def test_default_taps_of_large_presets():
    assert default_taps("teacher-cpu") == ("down_layers.3", "up_layers.1")
    assert default_taps("student-cpu")[1] == "model.1.submodule.2"
    for name in PRESETS:
        names = dict(build_network(name).named_modules())
        assert all(tap in names for tap in default_taps(name))


def test_taps_are_not_modified_in_place_after_capture(tiny):
    # An in-place op after the hook would silently change a captured feature.
    for model in tiny:
        versions: dict[str, int] = {}

        def record(name, store=versions):
            return lambda _m, _i, out: store.__setitem__(name, out._version)

        with FeatureTaps(model.net, model.taps) as taps:
            modules = dict(model.net.named_modules())
            hooks = [modules[n].register_forward_hook(record(n)) for n in model.taps]
            model.net(torch.randn(1, C_IN, 32, 32, 32))
            for h in hooks:
                h.remove()
        for name, feat in taps.features.items():
            assert feat._version == versions[name], name


def test_feature_taps_context_and_errors(tiny):
    net = tiny[0].net
    with FeatureTaps(net, ["down_layers.3"]) as taps:
        net(torch.randn(1, C_IN, 16, 16, 16))
    assert taps.features["down_layers.3"].shape == (1, 32, 2, 2, 2)
    taps.clear()
    net(torch.randn(1, C_IN, 16, 16, 16))  # hooks removed on exit
    assert taps.features == {}
    with pytest.raises(KeyError, match="down_layers.3"):
        FeatureTaps(net, ["down_layer.3"])
    with pytest.raises(KeyError, match="up_layers"):
        TappedModel(net, ["up_layer.1"])


def test_tapped_model_deepcopy_is_independent(tiny):
    model = tiny[1]
    clone = copy.deepcopy(model)
    x = torch.randn(1, C_IN, 16, 16, 16)
    model.eval()
    clone.eval()
    with torch.no_grad():
        a, fa = model(x)
        b, fb = clone(x)
    assert torch.allclose(a, b)
    assert all(torch.allclose(fa[k], fb[k]) for k in fa)


# ---------------------------------------------------------------------------- projector


def test_projector_from_shapes():
    proj = FeatureProjector.from_shapes(
        {"s1": (8, 2, 2, 2), "s2": (4, 8, 8, 8)},
        {"t1": (16, 4, 4, 4), "t2": (4, 8, 8, 8)},
    )
    assert isinstance(proj.projections[0], torch.nn.Conv3d)
    assert proj.projections[0].kernel_size == (1, 1, 1)
    assert isinstance(proj.projections[1], torch.nn.Identity)
    out = proj({"s1": torch.randn(3, 8, 2, 2, 2), "s2": torch.randn(3, 4, 8, 8, 8)})
    assert out["t1"].shape == (3, 16, 4, 4, 4) and out["t2"].shape == (3, 4, 8, 8, 8)
    # without teacher features the probed ratio (x2) also holds at another patch size
    out = proj({"s1": torch.randn(1, 8, 3, 3, 3), "s2": torch.randn(1, 4, 6, 6, 6)})
    assert out["t1"].shape == (1, 16, 6, 6, 6)
    # downsampling direction
    down = FeatureProjector({"s": (4, 8, 8, 8)}, {"t": (6, 4, 4, 4)})
    assert down({"s": torch.randn(1, 4, 8, 8, 8)})["t"].shape == (1, 6, 4, 4, 4)


def test_build_projector_maps_student_to_teacher_shapes(tiny):
    teacher, student = tiny
    proj = build_projector(student, teacher, patch_size=32)
    assert proj.pairs == tuple(zip(student.taps, teacher.taps))
    # bottleneck: both 32 ch -> Identity; decoder: 4 ch -> 8 ch -> Conv3d
    assert isinstance(proj.projections[0], torch.nn.Identity)
    assert proj.projections[1].in_channels == 4 and proj.projections[1].out_channels == 8
    x = torch.randn(1, C_IN, 32, 32, 32)
    _, sf = student(x)
    _, tf = teacher(x)
    out = proj(sf, tf)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in tf.items()}


def test_build_projector_resizes_across_depths(tiny):
    teacher = tiny[0]  # bottleneck at 1/8
    student = TappedModel.from_spec(ModelSpec("UNet", {"channels": [4, 8, 16], "strides": [2, 2]}))
    proj = build_projector(student, teacher, patch_size=16)  # student bottleneck at 1/4
    x = torch.randn(1, C_IN, 24, 24, 24)  # another size than probed
    _, sf = student(x)
    _, tf = teacher(x)
    assert sf[student.taps[0]].shape == (1, 16, 6, 6, 6)
    for with_teacher in (tf, None):
        out = proj(sf, with_teacher)
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in tf.items()}
    with pytest.raises(ValueError, match="paired"):
        build_projector(student, teacher, student.taps[:1], teacher.taps, 16)


def test_kd_step_gradients_reach_student_and_projector_only(tiny):
    teacher, student = tiny
    proj = build_projector(student, teacher, patch_size=32)
    teacher.eval()
    student.train()
    x = torch.randn(2, C_IN, 32, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (2, 1, 32, 32, 32))
    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    s_logits, s_feats = student(x)
    total, parts = DistillationLoss(1.0, 1.0, 0.5, temperature=2.0)(
        s_logits, t_logits, y, proj(s_feats, t_feats), t_feats
    )
    assert parts["feature"] > 0
    for p in teacher.parameters():  # make sure even a non-no_grad teacher would stay untouched
        assert p.grad is None
    total.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_kd_teacher_with_grad_enabled_stays_untouched(tiny):
    teacher, student = tiny
    proj = build_projector(student, teacher, patch_size=32)
    x = torch.randn(1, C_IN, 32, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (1, 1, 32, 32, 32))
    t_logits, t_feats = teacher(x)  # graph kept: the loss must detach the teacher itself
    s_logits, s_feats = student(x)
    total, _ = DistillationLoss(1.0, 1.0, 1.0, feature_kind="cosine")(
        s_logits, t_logits, y, proj(s_feats, t_feats), t_feats
    )
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


# -- a head per population ----------------------------------------------------------------------


@pytest.mark.parametrize("spec, block", [
    ("student-tiny", "model.2"),
    ("teacher-tiny", "conv_final"),
    (ModelSpec("DynUNet", {"depth": 2, "init_filters": 4}), "output_block"),
])
def test_population_heads_replace_the_last_block_once_per_population(spec, block):
    from fedbrats.common.networks.models import (
        POPULATION_HEADS,
        head_population,
        set_population,
    )

    plain = build_network(spec)
    spec = resolve_spec(spec).replace(**{POPULATION_HEADS: ["GLI", "PED"]})
    torch.manual_seed(0)
    net = build_network(spec).eval()
    head = dict(plain.named_modules())[block]
    # the body once, the last block twice; the spec (and so a model file) says which
    assert count_parameters(net) == count_parameters(plain) + count_parameters(head)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    owners = {head_population(k) for k in net.state_dict()}
    assert owners == {None, "GLI", "PED"}
    assert all(k.startswith(f"{block}.{POPULATION_HEADS}.") for k in net.state_dict()
               if head_population(k))
    x = torch.randn(1, C_IN, 16, 16, 16)
    with torch.no_grad():
        for p in dict(net.named_modules())[f"{block}.{POPULATION_HEADS}.PED"].parameters():
            p.add_(0.5)  # make PED's head differ from GLI's
        gli = set_population(net, "GLI")(x)
        ped = set_population(net, "PED")(x)
        mean = set_population(net, None)(x)
    assert gli.shape == (1, NUM_CLASSES, 16, 16, 16)
    assert not torch.allclose(gli, ped)
    torch.testing.assert_close(mean, (gli + ped) / 2)
    with pytest.raises(ValueError, match="heads for GLI, PED, not for population 'MEN'"):
        set_population(net, "MEN")
    with pytest.raises(ValueError, match="unknown population 'XYZ'"):
        build_network(spec.replace(**{POPULATION_HEADS: ["GLI", "XYZ"]}))


def test_a_site_trains_the_body_and_its_own_head_only():
    from fedbrats.common.networks.models import POPULATION_HEADS, head_population, set_population

    spec = resolve_spec("student-tiny").replace(**{POPULATION_HEADS: ["GLI", "SSA", "PED"]})
    net = set_population(build_network(spec), "SSA").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(2, C_IN, 16, 16, 16)).square().mean().backward()
    opt.step()
    changed = {head_population(k) for k, v in net.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed == {None, "SSA"}


def test_population_mean_by_hand():
    from fedbrats.common.networks.models import population_mean

    def mean(values, weights):
        return sum(w * v for v, w in zip(values, weights)) / sum(weights)

    states = [{"body.w": 1.0, "h.population_heads.GLI.w": 10.0, "h.population_heads.PED.w": 0.0},
              {"body.w": 3.0, "h.population_heads.GLI.w": 0.0, "h.population_heads.PED.w": 0.0},
              {"body.w": 5.0, "h.population_heads.GLI.w": 20.0, "h.population_heads.PED.w": 0.0}]
    sent = {"h.population_heads.PED.w": 7.0}
    out = population_mean(states, [1.0, 1.0, 2.0], ["GLI", "SSA", "GLI"], mean, sent)
    # body: (1 + 3 + 2*5) / 4; GLI: its two sites only, (10 + 2*20) / 3; PED: nobody, as sent
    assert out == {"body.w": 3.5, "h.population_heads.GLI.w": 50 / 3,
                   "h.population_heads.PED.w": 7.0}
    with pytest.raises(ValueError, match="no site of population PED"):
        population_mean(states, [1.0] * 3, ["GLI", "SSA", "GLI"], mean)


def test_heads_from_the_mean_alone_and_from_a_single_block_by_hand():
    import numpy as np

    from fedbrats.common.networks.models import expand_to_heads, rescale_heads

    sent = {"body.w": np.float32(1.0), "h.population_heads.GLI.w": np.float32(2.0),
            "h.population_heads.PED.w": np.float32(4.0)}
    # three sites (GLI, GLI, SSA) moved GLI's head to 5 and 8; the SSA site left it at 2:
    # the mean over all of them is (5 + 8 + 2) / 3 = 5; GLI's own mean is 6.5
    mean = {"body.w": np.float32(3.0), "h.population_heads.GLI.w": np.float32(5.0),
            "h.population_heads.PED.w": np.float32(4.0)}
    out = rescale_heads(mean, sent, ["GLI", "GLI", "SSA"], [1.0, 1.0, 1.0])
    assert out["body.w"] == 3.0  # shared weights as they are
    assert out["h.population_heads.GLI.w"] == pytest.approx(2 + (5 - 2) / (2 / 3))  # = 6.5
    assert out["h.population_heads.PED.w"] == 4.0  # no PED site: as sent
    one = {"body.w": torch.ones(1), "h.w": torch.full((1,), 7.0)}
    keys = ["body.w", "h.population_heads.GLI.w", "h.population_heads.PED.w"]
    expanded = expand_to_heads(one, keys)
    assert list(expanded) == keys and expanded["h.population_heads.PED.w"].item() == 7.0
    with pytest.raises(KeyError, match="no 'g.w' to start the head from"):
        expand_to_heads(one, ["g.population_heads.GLI.w"])
