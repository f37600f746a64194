"""Segmentation networks, presets, feature taps and feature projectors for distillation.

Every network is a MONAI network chosen by name (``SegResNet``, ``DynUNet`` or ``UNet``) and
described by a :class:`ModelSpec`: an immutable, hashable, JSON-friendly pair of the
architecture name and its keyword arguments. A spec is small enough to be stored next to the
weights in a checkpoint read back with ``torch.load(weights_only=True)`` (``spec.to_dict()``
holds only ``str``/``int``/``float``/``bool``/``None``/``list``/``dict`` values).

Networks take ``B, 4, H, W, D`` input (channels as in
:data:`fedbrats.common.data.contract.CONTRASTS`) and give
``B, 4, H, W, D``  logits (classes as in :data:`fedbrats.common.data.contract.LABELS`). The output
has the
input's spatial size when every spatial size is divisible by :func:`spatial_divisor` of the spec
(16 for ``DynUNet`` with the default depth 4, ``2 ** (len(blocks_down) - 1)`` for ``SegResNet``,
the product of the strides for ``UNet``).

Presets (:data:`PRESETS`; parameter counts for 4 input channels and 4 classes):

=================  =========  ==========  ===========================================  ========
name               arch       params      layout                                       divisor
=================  =========  ==========  ===========================================  ========
``teacher-tiny``   SegResNet  111,212     init 4, blocks_down (1,1,1,1), GroupNorm(4)  8
``student-tiny``   UNet       39,729      channels (4,8,16,32), 1 residual unit, BN    8
``teacher-cpu``    SegResNet  1,176,852   init 8, blocks_down (1,2,2,4)                8
``student-cpu``    UNet       300,709     channels (8,16,32,64), 2 res. units, BN      8
``teacher-gpu``    SegResNet  18,798,660  init 32, blocks_down (1,2,2,4), dropout 0.2  8
``student-gpu``    SegResNet  4,702,244   init 16, blocks_down (1,2,2,4)               8
``student-large``  SegResNet  29,369,684  init 40, blocks_down (1,2,2,4), 117 MB      8
=================  =========  ==========  ===========================================  ========

The ``tiny`` and ``cpu`` students use batch norm (``BN``), the other networks MONAI's defaults
(instance norm in UNet, group norm in SegResNet). A network that normalises by the statistics of
the window it is given sees a window filled by a large tumour as ordinary tissue: the cpu-demo
student with instance norm segmented a 22 %-of-the-brain SSA glioma at WT Dice 0.57 with 32^3
windows and 0.77 with 48^3 windows of the same weights. With batch norm the statistics are
learnt in training (and averaged over the sites by the server), so a voxel's class no longer
depends on what else is in its window (docs/bench/demo-settings.md).

The ``tiny`` presets are for tests (32^3 crops), ``cpu`` for a CPU demo (64^3 to 96^3 crops),
``gpu`` for BraTS- scale training (128^3 crops, as in the MONAI BraTS SegResNet tutorial).

Feature taps (:func:`default_taps`), names as in ``model.named_modules()``. ``n`` is the number
of resolution levels, sizes are relative to the input's:

=========  ==================================  ======================================
arch       deepest encoder stage (bottleneck)  late decoder stage (half resolution)
=========  ==================================  ======================================
SegResNet  ``down_layers.{n-1}``               ``up_layers.{n-3}``
           F * 2^(n-1) ch, 1/2^(n-1)           2F ch, 1/2 (F = init_filters)
DynUNet    ``bottleneck``                      ``upsamples.{n-3}``
           filters[-1] ch, 1/prod(strides)     filters[1] ch, 1/2
UNet       ``model`` + ``.1.submodule`` * n-1  ``model.1.submodule.2``
           channels[-1] ch, 1/prod(strides)    channels[0] ch, 1/strides[0]
=========  ==================================  ======================================

(MONAI's UNet nests ``Sequential(down, SkipConnection(submodule), up)``; the bottom block sits
``n - 1`` ``SkipConnection`` levels deep, e.g. ``model.1.submodule.1.submodule.1.submodule``
for three strides.)

For example, the ``teacher-cpu`` taps on a 96^3 crop are ``down_layers.3`` (64, 12, 12, 12) and
``up_layers.1`` (16, 48, 48, 48); the ``student-cpu`` taps are
``model.1.submodule.1.submodule.1.submodule`` (64, 12, 12, 12) and ``model.1.submodule.2``
(8, 48, 48, 48).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbrats.common.data.contract import CONTRASTS, NUM_CLASSES
from fedbrats.common.networks.heads import PopulationHeads, with_population_heads
from fedbrats.common.utils.hints import close_matches, suggestion
from fedbrats.common.utils.seeds import derived_seed

if TYPE_CHECKING:
    from fedbrats.common.config import RunConfig

__all__ = [
    "ARCHITECTURES",
    "HEAD_BLOCKS",
    "POPULATION_HEADS",
    "PRESETS",
    "FeatureProjector",
    "FeatureTaps",
    "ModelSpec",
    "TappedModel",
    "build_network",
    "build_projector",
    "constructor_kwargs",
    "expand_to_heads",
    "head_population",
    "population_mean",
    "rescale_heads",
    "set_population",
    "student_spec",
    "count_parameters",
    "default_taps",
    "get_preset",
    "probe_tap_shapes",
    "resolve_spec",
    "spatial_divisor",
]

ARCHITECTURES: tuple[str, ...] = ("SegResNet", "DynUNet", "UNet")
"""Supported MONAI architectures (``monai.networks.nets``), by class name."""

_RESERVED_KWARGS = ("spatial_dims", "in_channels", "out_channels")

POPULATION_HEADS = "population_heads"
"""Spec option (not a MONAI argument): population codes, one copy of the network's last block
(:data:`HEAD_BLOCKS`) each; see :class:`PopulationHeads`."""

HEAD_BLOCKS: dict[str, str] = {"UNet": "model.2", "SegResNet": "conv_final",
                               "DynUNet": "output_block"}
"""The last block of each architecture (the one that turns the last features into logits)."""

# --------------------------------------------------------------------------------------------
# ModelSpec
# --------------------------------------------------------------------------------------------


class _FrozenDict(tuple):
    """A dict frozen into a sorted tuple of ``(key, value)`` pairs; hashable, told apart from
    a plain tuple so that :func:`_thaw` can give the dict back."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self) + "}"


def _freeze(value: Any, where: str) -> Any:
    """Recursively turn lists into tuples and dicts into :class:`_FrozenDict`, checking that
    only JSON-like plain values are used."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str, got {k!r}")
            items.append((k, _freeze(v, f"{where}.{k}")))
        return _FrozenDict(sorted(items))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"{where}: {type(value).__name__} value {value!r} is not allowed in a ModelSpec; "
        "use only str, int, float, bool, None, lists and dicts"
    )


def _thaw(value: Any, as_list: bool) -> Any:
    """Undo :func:`_freeze`: frozen dicts back to dicts; tuples to lists (``as_list``, for
    JSON and ``torch.load(weights_only=True)``) or kept as tuples (for MONAI)."""
    if isinstance(value, _FrozenDict):
        return {k: _thaw(v, as_list) for k, v in value}
    if isinstance(value, tuple):
        seq = [_thaw(v, as_list) for v in value]
        return seq if as_list else tuple(seq)
    return value


def _suggest(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = close_matches(name, choices, n=3, cutoff=0.5) or close_matches(
        name, choices, n=3, ignore_case=True
    )
    return suggestion(close) or "expected one of " + ", ".join(repr(c) for c in choices)


def _canonical_arch(arch: str) -> str:
    if not isinstance(arch, str):
        raise TypeError(f"architecture must be a str, got {type(arch).__name__}: {arch!r}")
    for known in ARCHITECTURES:
        if arch.strip().lower() == known.lower():
            return known
    raise ValueError(f"unknown architecture {arch!r}; {_suggest(arch, ARCHITECTURES)}")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture name plus keyword arguments for its MONAI constructor.

    ``kwargs`` may be given as any mapping; it is stored frozen (a sorted tuple of pairs, lists
    as tuples) so that specs are immutable, hashable and comparable. :attr:`options` gives a
    fresh plain dict back. ``spatial_dims``, ``in_channels`` and ``out_channels`` are not part of
    a spec (they are arguments of :func:`build_network`).

    ``DynUNet`` additionally understands ``depth`` (number of downsamplings, default 4),
    ``init_filters`` (default 32) and ``max_filters`` (default 320), from which
    ``kernel_size``, ``strides``, ``upsample_kernel_size`` and ``filters`` are derived unless
    given explicitly.
    """

    arch: str
    kwargs: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = _canonical_arch(self.arch)
        kwargs = self.kwargs if self.kwargs is not None else {}
        if isinstance(kwargs, _FrozenDict):
            kwargs = _thaw(kwargs, as_list=False)
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"ModelSpec kwargs must be a mapping, got {type(kwargs).__name__}")
        for key in _RESERVED_KWARGS:
            if key in kwargs:
                raise ValueError(
                    f"{key!r} does not belong in a ModelSpec (got {key}={kwargs[key]!r}); "
                    "the network is 3-D and channel counts are build_network arguments"
                )
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "kwargs", _freeze(dict(kwargs), f"{arch} kwargs"))

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments as a new plain dict (sequences as tuples)."""
        return _thaw(self.kwargs, as_list=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"arch": str, "kwargs": dict}`` with only JSON types (sequences as lists)."""
        return {"arch": self.arch, "kwargs": _thaw(self.kwargs, as_list=True)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict` (also accepts the output of a JSON round trip)."""
        if not isinstance(data, Mapping) or "arch" not in data:
            raise ValueError(f"expected a mapping with 'arch' (and 'kwargs'), got {data!r}")
        extra = set(data) - {"arch", "kwargs"}
        if extra:
            raise ValueError(f"unexpected ModelSpec fields {sorted(extra)}")
        return cls(data["arch"], dict(data.get("kwargs") or {}))

    def replace(self, **overrides: Any) -> ModelSpec:
        """A copy with some keyword arguments overridden."""
        return ModelSpec(self.arch, {**self.options, **overrides})


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, ModelSpec] = {
    "teacher-tiny": ModelSpec(
        "SegResNet",
        {
            "init_filters": 4,
            "blocks_down": [1, 1, 1, 1],
            "blocks_up": [1, 1, 1],
            "norm": ["GROUP", {"num_groups": 4}],
        },
    ),
    # Students normalise with batch norm: statistics learnt in training, not those of the
    # window being segmented (see the module docstring).
    "student-tiny": ModelSpec(
        "UNet",
        {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"},
    ),
    "teacher-cpu": ModelSpec(
        "SegResNet", {"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    ),
    "student-cpu": ModelSpec(
        "UNet",
        {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 2, "norm": "batch"},
    ),
    "teacher-gpu": ModelSpec(
        "SegResNet",
        {
            "init_filters": 32,
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "dropout_prob": 0.2,
        },
    ),
    "student-gpu": ModelSpec(
        "SegResNet", {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    ),
    # BraTS-scale (117 MB in float32): what the large-student soak over TLS sends
    "student-large": ModelSpec(
        "SegResNet", {"init_filters": 40, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    ),
}
"""Named specs; see the module docstring for sizes and intended crop sizes."""


def get_preset(name: str) -> ModelSpec:
    """The preset called ``name``; unknown names raise ``ValueError`` with a suggestion."""
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown model preset {name!r}; {_suggest(name, PRESETS)}")


def resolve_spec(spec: ModelSpec | str | Mapping[str, Any], **kwargs: Any) -> ModelSpec:
    """Turn a preset name, an architecture name, a ``to_dict()`` mapping or a spec into a spec.

    ``kwargs`` override (preset, spec) or give (architecture name) the constructor arguments:
    ``resolve_spec("teacher-cpu")``, ``resolve_spec("SegResNet", init_filters=16)``,
    ``resolve_spec("student-cpu", num_res_units=1)``.
    """
    if isinstance(spec, ModelSpec):
        base = spec
    elif isinstance(spec, Mapping):
        base = ModelSpec.from_dict(spec)
    elif isinstance(spec, str):
        if spec in PRESETS:
            base = PRESETS[spec]
        elif spec.strip().lower() in {a.lower() for a in ARCHITECTURES}:
            return ModelSpec(spec, kwargs)
        else:
            raise ValueError(
                f"{spec!r} is neither a model preset nor an architecture; "
                f"{_suggest(spec, [*PRESETS, *ARCHITECTURES])}"
            )
    else:
        raise TypeError(f"cannot make a ModelSpec from {type(spec).__name__}: {spec!r}")
    return base.replace(**kwargs) if kwargs else base


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _dynunet_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Fill DynUNet's required per-level lists from ``depth``/``init_filters``/``max_filters``."""
    opts = dict(options)
    depth = opts.pop("depth", None)
    init_filters = opts.pop("init_filters", 32)
    max_filters = opts.pop("max_filters", 320)
    if depth is None:
        given = opts.get("strides") or opts.get("kernel_size")
        depth = len(given) - 1 if given else 4
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"DynUNet depth must be an int >= 1, got {depth!r}")
    opts.setdefault("kernel_size", (3,) * (depth + 1))
    opts.setdefault("strides", (1,) + (2,) * depth)
    opts.setdefault("upsample_kernel_size", tuple(opts["strides"][1:]))
    n_levels = len(opts["strides"])
    if "filters" not in opts or opts["filters"] is None:
        opts["filters"] = tuple(min(init_filters * 2**i, max_filters) for i in range(n_levels))
    if opts.get("deep_supervision"):
        raise ValueError(
            "DynUNet deep_supervision=True is not supported: fedbrats expects B, C, H, W, D logits"
        )
    opts["deep_supervision"] = False
    return opts


def constructor_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The keyword arguments ``build_network`` gives the MONAI class (DynUNet's per-level lists
    filled in), ``population_heads`` included."""
    options = spec.options
    if spec.arch == "DynUNet":
        options = _dynunet_kwargs(options)
    return options


def _net_class(arch: str) -> type[nn.Module]:
    from monai.networks import nets

    return getattr(nets, arch)


def build_network(
    spec: ModelSpec | str | Mapping[str, Any],
    in_channels: int = len(CONTRASTS),
    out_channels: int = NUM_CLASSES,
) -> nn.Module:
    """Build the 3-D MONAI network for ``spec`` (a spec, a preset name or a ``to_dict()``).

    The result maps ``B, in_channels, H, W, D`` to ``B, out_channels, H, W, D`` logits when
    H, W and D are divisible by :func:`spatial_divisor`. Unknown constructor arguments raise
    ``TypeError`` naming close matches.
    """
    spec = resolve_spec(spec)
    cls = _net_class(spec.arch)
    kwargs = constructor_kwargs(spec)
    populations = kwargs.pop(POPULATION_HEADS, None)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in kwargs:
        if key not in accepted:
            raise TypeError(
                f"{spec.arch} has no argument {key!r}; "
                f"{_suggest(key, sorted(accepted - set(_RESERVED_KWARGS)))}"
            )
    net = cls(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    if populations:
        _add_population_heads(net, HEAD_BLOCKS[spec.arch], populations)
    return net


# --------------------------------------------------------------------------------------------
# Population heads
# --------------------------------------------------------------------------------------------


def _add_population_heads(net: nn.Module, block_name: str, populations: Sequence[str]) -> None:
    from fedbrats.common.data.contract import check_population

    pops = [check_population(p) for p in populations]
    if len(set(pops)) != len(pops):
        raise ValueError(f"{POPULATION_HEADS}: duplicate populations in {list(populations)}")
    with_population_heads(net, block_name, pops)


def set_population(model: nn.Module, population: str | None) -> nn.Module:
    """Make every :class:`PopulationHeads` of ``model`` use ``population``'s head (``None``:
    their mean). A network without population heads is returned as it is."""
    for module in model.modules():
        if isinstance(module, PopulationHeads):
            if population is not None and population not in module.population_heads:
                raise ValueError(
                    f"the network has heads for {', '.join(module.population_heads)}, not for "
                    f"population {population!r}")
            module.population = population
    return model


def head_population(key: str) -> str | None:
    """The population whose head a state-dict key belongs to (``None``: a shared weight)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == POPULATION_HEADS:
            return parts[i + 1]
    return None


def population_mean(states: Sequence[Mapping[str, Any]], weights: Sequence[float],
                    populations: Sequence[str], mean: Callable[[list, list], Any],
                    sent: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate sites' state dicts: shared weights by ``mean(values, weights)`` over every
    site, each population head over that population's sites only (the sent value, from
    ``sent``, where none of them replied: it then stays as it was)."""
    out: dict[str, Any] = {}
    for key in states[0]:
        owner = head_population(key)
        idx = range(len(states)) if owner is None else [
            i for i, p in enumerate(populations) if p == owner]
        if not idx:
            if sent is None:
                raise ValueError(f"no site of population {owner} for {key!r} and no sent value")
            out[key] = sent[key]
            continue
        out[key] = mean([states[i][key] for i in idx], [weights[i] for i in idx])
    return out


def rescale_heads(aggregate: Mapping[str, Any], sent: Mapping[str, Any],
                  populations: Sequence[str], weights: Sequence[float]) -> dict[str, Any]:
    """Each population head of an aggregate that only a mean over *all* sites gave (SecAgg+,
    or the noised mean of differential privacy): ``sent + (mean - sent) / share``, ``share``
    the weight of that population's sites in the mean (a head stays as sent without them).
    The other sites returned the head as they got it, so this is their own sites' mean; being
    computed from the aggregate alone, it is post-processing of it (DP holds; the noise on a
    head grows by ``1 / share``). Shared weights are returned as they are."""
    total = float(sum(weights))
    out = dict(aggregate)
    for key, value in aggregate.items():
        owner = head_population(key)
        if owner is None:
            continue
        share = sum(float(w) for p, w in zip(populations, weights) if p == owner) / total
        if share == 0 or not _is_floating(value):
            out[key] = sent[key]
            continue
        out[key] = sent[key] + (value - sent[key]) / share
    return out


def _is_floating(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    import numpy as np

    return dtype is not None and np.issubdtype(dtype, np.floating)


def expand_to_heads(state: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``state`` of a network with one last block, laid out for ``keys`` (the state-dict keys
    of the same network with a head per population): every head starts as that block."""
    out = {}
    for key in keys:
        owner = head_population(key)
        base = key.replace(f".{POPULATION_HEADS}.{owner}", "") if owner else key
        if base not in state:
            raise KeyError(f"{key!r}: the state has no {base!r} to start the head from")
        out[key] = state[base]
    return out


def student_spec(run: RunConfig) -> ModelSpec:
    """The spec of the run's student: ``student-model``, with a head per population
    (:data:`POPULATION_HEADS`) when ``student-heads = "population"``."""
    from fedbrats.common.data.contract import POPULATIONS

    spec = resolve_spec(run.student_model)
    if run.student_heads == "population":
        spec = spec.replace(**{POPULATION_HEADS: list(POPULATIONS)})
    return spec


def _per_axis(stride: Any) -> tuple[int, int, int]:
    if isinstance(stride, (list, tuple)):
        if len(stride) != 3:
            raise ValueError(f"per-axis stride must have 3 entries, got {stride!r}")
        return tuple(int(s) for s in stride)  # type: ignore[return-value]
    return (int(stride),) * 3


def spatial_divisor(spec: ModelSpec | str | Mapping[str, Any]) -> int:
    """The number every input spatial size must be divisible by for output size == input size.

    SegResNet: ``2 ** (len(blocks_down) - 1)``; UNet and DynUNet: the product of the strides
    (for anisotropic strides, the least common multiple of the per-axis products).
    Training nets with instance normalisation (DynUNet, UNet) also needs more than one voxel
    at the bottleneck, i.e. crops of at least twice the divisor along some axis.
    """
    spec = resolve_spec(spec)
    if spec.arch == "SegResNet":
        blocks_down = spec.options.get("blocks_down", (1, 2, 2, 4))
        return 2 ** (len(blocks_down) - 1)
    if spec.arch == "DynUNet":
        strides = _dynunet_kwargs(spec.options)["strides"]
    else:
        strides = spec.options["strides"]
    per_axis = [1, 1, 1]
    for s in strides:
        per_axis = [a * b for a, b in zip(per_axis, _per_axis(s))]
    return math.lcm(*per_axis)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Feature taps
# --------------------------------------------------------------------------------------------


def default_taps(spec: ModelSpec | str | Mapping[str, Any]) -> tuple[str, ...]:
    """The default distillation taps of ``spec``: (deepest encoder stage, late decoder stage).

    The decoder tap is the last decoder stage before full resolution (half the input size);
    nets with a single downsampling have only the bottleneck tap. See the module docstring.
    """
    spec = resolve_spec(spec)
    opts = spec.options
    if spec.arch == "SegResNet":
        n_down = len(opts.get("blocks_down", (1, 2, 2, 4)))
        n_up = len(opts.get("blocks_up", (1, 1, 1)))
        taps = [f"down_layers.{n_down - 1}"]
        if n_up >= 2:
            taps.append(f"up_layers.{n_up - 2}")
        return tuple(taps)
    if spec.arch == "DynUNet":
        n_up = len(_dynunet_kwargs(opts)["strides"]) - 1
        taps = ["bottleneck"]
        if n_up >= 2:
            taps.append(f"upsamples.{n_up - 2}")
        return tuple(taps)
    # UNet: model = Sequential(down_0, SkipConnection(Sequential(down_1, Skip(...), up_1)), up_0)
    n_strides = len(opts["strides"])
    taps = ["model" + ".1.submodule" * n_strides]
    if n_strides >= 2:
        taps.append("model.1.submodule.2")
    return tuple(taps)


def _check_tap_names(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "see model.named_modules()"
            raise KeyError(f"no submodule named {name!r} in {type(model).__name__}; {hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tap names in {names}")
    return names


class FeatureTaps:
    """Collect the outputs of named submodules during forward passes.

    ``names`` are as in ``model.named_modules()``. Hooks are registered on construction (or on
    ``__enter__`` after :meth:`remove`) and removed by :meth:`remove` / on ``__exit__``::

        with FeatureTaps(net, ("down_layers.3",)) as taps:
            logits = net(x)
        feats = taps.features  # {"down_layers.3": tensor B, C, h, w, d}

    ``features`` keeps the latest output of each tap (the graph is kept, so the features can be
    used in a loss); :meth:`clear` empties it.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = _check_tap_names(model, names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._register()

    def _register(self) -> None:
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[name] = output

        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        self._register()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class TappedModel(nn.Module):
    """Wrap a network so that ``forward(x)`` returns ``(logits, {tap: feature})``.

    ``x``: ``B, C_in, H, W, D``; logits: ``B, C_out, H, W, D``; each feature
    ``B, C_tap, h, w, d``. Hooks live only during each forward call, so the wrapper can be
    deep-copied or pickled safely. The wrapped network is ``self.net`` (save ``net.state_dict()``
    for weights without the ``net.`` prefix). ``spec`` is kept for reference when known.
    """

    def __init__(
        self,
        net: nn.Module,
        taps: Iterable[str] | None = None,
        spec: ModelSpec | None = None,
    ):
        super().__init__()
        self.net = net
        self.spec = spec
        if taps is None:
            if spec is None:
                raise ValueError("TappedModel needs taps or a spec to take default_taps from")
            taps = default_taps(spec)
        self.taps = _check_tap_names(net, taps)

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec | str | Mapping[str, Any],
        taps: Iterable[str] | None = None,
        in_channels: int = len(CONTRASTS),
        out_channels: int = NUM_CLASSES,
    ) -> TappedModel:
        spec = resolve_spec(spec)
        net = build_network(spec, in_channels, out_channels)
        return cls(net, default_taps(spec) if taps is None else taps, spec)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with FeatureTaps(self.net, self.taps) as collector:
            logits = self.net(x)
        if logits.ndim == x.ndim + 1:  # deep-supervision stack B, N, C, ...: keep the main head
            logits = logits[:, 0]
        missing = [t for t in self.taps if t not in collector.features]
        if missing:
            raise RuntimeError(f"taps {missing} were not reached during forward")
        return logits, {name: collector.features[name] for name in self.taps}


@torch.no_grad()
def probe_tap_shapes(
    model: nn.Module,
    taps: Iterable[str],
    patch_size: int | Sequence[int] = 32,
    in_channels: int = len(CONTRASTS),
) -> dict[str, tuple[int, ...]]:
    """Shapes ``(C, h, w, d)`` of the taps' outputs for a ``1, in_channels, *patch_size`` input.

    The model is run in eval mode on zeros (its training flag is restored afterwards).
    """
    size = _per_axis(patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, taps) as collector:
            model(torch.zeros((1, in_channels, *size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return {name: tuple(collector.features[name].shape[1:]) for name in collector.names}


# --------------------------------------------------------------------------------------------
# Feature projector
# --------------------------------------------------------------------------------------------


class FeatureProjector(nn.Module):
    """Map student features onto the matching teacher features' shapes.

    ``pairs`` lists ``(student_tap, teacher_tap)``; for each pair a 1x1x1 ``Conv3d`` maps the
    student's channel count to the teacher's (``Identity`` where they agree), and the result is
    resized trilinearly to the teacher's spatial size where they differ. The two linear steps
    commute, so the convolution is applied at the smaller of the two resolutions.

    Built from per-sample shapes ``(C, h, w, d)`` (a leading batch axis is ignored) probed at some
    patch size. At forward time the target size is taken from ``teacher_feats`` when given,
    otherwise from the probed teacher/student size ratio, so other patch sizes work too.

    The projector's parameters belong to the student side: optimise them with the student.
    """

    def __init__(
        self,
        student_shapes: Mapping[str, Sequence[int]],
        teacher_shapes: Mapping[str, Sequence[int]],
        pairs: Sequence[tuple[str, str]] | None = None,
    ):
        super().__init__()
        if pairs is None:
            if len(student_shapes) != len(teacher_shapes):
                raise ValueError(
                    f"{len(student_shapes)} student taps but {len(teacher_shapes)} teacher taps; "
                    "pass explicit pairs"
                )
            pairs = list(zip(student_shapes, teacher_shapes))
        pairs = [(str(s), str(t)) for s, t in pairs]
        if not pairs:
            raise ValueError("FeatureProjector needs at least one (student, teacher) tap pair")
        teachers = [t for _, t in pairs]
        if len(set(teachers)) != len(teachers):
            raise ValueError(f"each teacher tap may be matched only once, got pairs {pairs}")
        self.pairs: tuple[tuple[str, str], ...] = tuple(pairs)
        self.ratios: list[tuple[float, float, float]] = []
        self.student_channels: list[int] = []
        self.teacher_channels: list[int] = []
        projections = []
        for s_name, t_name in pairs:
            if s_name not in student_shapes:
                raise KeyError(f"no shape for student tap {s_name!r}; have {list(student_shapes)}")
            if t_name not in teacher_shapes:
                raise KeyError(f"no shape for teacher tap {t_name!r}; have {list(teacher_shapes)}")
            s_shape = tuple(int(v) for v in student_shapes[s_name])[-4:]
            t_shape = tuple(int(v) for v in teacher_shapes[t_name])[-4:]
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(
                    f"expected (C, h, w, d) shapes, got {s_shape} for {s_name!r} "
                    f"and {t_shape} for {t_name!r}"
                )
            self.student_channels.append(s_shape[0])
            self.teacher_channels.append(t_shape[0])
            self.ratios.append(tuple(t / s for s, t in zip(s_shape[1:], t_shape[1:])))
            if s_shape[0] == t_shape[0]:
                projections.append(nn.Identity())
            else:
                projections.append(nn.Conv3d(s_shape[0], t_shape[0], kernel_size=1))
        self.projections = nn.ModuleList(projections)

    @classmethod
    def from_shapes(
        cls,
        student_shapes: Mapping[str, Sequence[int]],
        teacher_shapes: Mapping[str, Sequence[int]],
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> FeatureProjector:
        return cls(student_shapes, teacher_shapes, pairs)

    def extra_repr(self) -> str:
        return ", ".join(f"{s} -> {t}" for s, t in self.pairs)

    def forward(
        self,
        student_feats: Mapping[str, torch.Tensor],
        teacher_feats: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Project ``{student_tap: B, Cs, hs, ws, ds}`` to ``{teacher_tap: B, Ct, ht, wt, dt}``.

        The output is keyed by teacher tap name, ready for
        ``feature_kd_loss(projected, teacher_feats)``.
        """
        out: dict[str, torch.Tensor] = {}
        for (s_name, t_name), proj, ratio in zip(self.pairs, self.projections, self.ratios):
            if s_name not in student_feats:
                raise KeyError(f"student feature {s_name!r} missing; got {list(student_feats)}")
            x = student_feats[s_name]
            src = tuple(x.shape[2:])
            if teacher_feats is not None:
                if t_name not in teacher_feats:
                    raise KeyError(f"teacher feature {t_name!r} missing; got {list(teacher_feats)}")
                dst = tuple(teacher_feats[t_name].shape[2:])
            else:
                dst = tuple(max(1, round(n * r)) for n, r in zip(src, ratio))
            if dst == src:
                x = proj(x)
            elif math.prod(dst) >= math.prod(src):  # upsampling: project first (cheaper)
                x = F.interpolate(proj(x), size=dst, mode="trilinear", align_corners=False)
            else:
                x = proj(F.interpolate(x, size=dst, mode="trilinear", align_corners=False))
            out[t_name] = x
        return out


def _inner(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, TappedModel) else model


def build_projector(
    student: nn.Module,
    teacher: nn.Module,
    student_taps: Sequence[str] | None = None,
    teacher_taps: Sequence[str] | None = None,
    patch_size: int | Sequence[int] = 32,
    in_channels: int = len(CONTRASTS),
) -> FeatureProjector:
    """Probe ``student`` and ``teacher`` with a zero ``1, in_channels, *patch_size`` input and
    build the :class:`FeatureProjector` pairing ``student_taps[i]`` with ``teacher_taps[i]``.

    Either net may be a :class:`TappedModel`, whose taps are then the default. A small patch
    (a multiple of both nets' :func:`spatial_divisor`, e.g. 32) suffices: only channel counts
    and size ratios are kept. The projector is placed on the student's device.
    """
    if student_taps is None:
        if not isinstance(student, TappedModel):
            raise ValueError("student_taps is required unless student is a TappedModel")
        student_taps = student.taps
    if teacher_taps is None:
        if not isinstance(teacher, TappedModel):
            raise ValueError("teacher_taps is required unless teacher is a TappedModel")
        teacher_taps = teacher.taps
    student_taps, teacher_taps = tuple(student_taps), tuple(teacher_taps)
    if len(student_taps) != len(teacher_taps):
        raise ValueError(
            f"{len(student_taps)} student taps {student_taps} but {len(teacher_taps)} "
            f"teacher taps {teacher_taps}; they are paired in order"
        )
    s_shapes = probe_tap_shapes(_inner(student), student_taps, patch_size, in_channels)
    t_shapes = probe_tap_shapes(_inner(teacher), teacher_taps, patch_size, in_channels)
    projector = FeatureProjector(s_shapes, t_shapes, list(zip(student_taps, teacher_taps)))
    param = next(student.parameters(), None)
    return projector.to(param.device) if param is not None else projector


def new_warm_teacher(run: RunConfig) -> TappedModel:
    """The teacher network (``teacher-model``) as the teachers' federated warm start begins,
    initialised from the run's seed: the same at the server and at every site."""
    torch.manual_seed(derived_seed(run.seed, "teacher-warm-start"))
    return TappedModel.from_spec(resolve_spec(run.teacher_model))


def new_student(run: RunConfig, population: str | None = None) -> TappedModel:
    """The run's student network (:func:`student_spec`), initialised from the run's seed: the
    same initial weights at the server and at every site. ``population`` picks its head when
    it has one per population (:func:`set_population`); every head starts from the same
    weights."""
    torch.manual_seed(derived_seed(run.seed, "student"))
    model = TappedModel.from_spec(student_spec(run))
    set_population(model, population)
    return model
