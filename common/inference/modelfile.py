"""The student model file: everything ``fedbrats predict`` needs, in one ``torch.save`` dictionary.

The server writes it as ``student.pt`` at the end of a run (:func:`student_payload`); it is read
back with ``torch.load(weights_only=True)``, so only tensors and plain values are stored (no
pickled objects), and :func:`load_student` turns it into a ready network.

=====================  =============================================================================
key                    value
=====================  =============================================================================
``format``             ``"fedbrats-student/1"`` (:data:`STUDENT_FORMAT`)
``spec``               the network's :class:`~fedbrats.common.networks.models.ModelSpec`, as JSON
``state_dict``         the network's weights (``net.state_dict()``, no ``net.`` prefix)
``spacing``            voxel size (mm) the network works at, ``[x, y, z]``
``patch_size``         sliding-window size (voxels): an int (a cube) or ``[x, y, z]``
``channels``           input channel order, ``["t1n", "t1c", "t2w", "t2f"]``
``labels``             output classes, JSON ``{"0": "background", "1": "NETC", ...}``
``label_convention``   convention of the output classes: ``"brats2023"`` (the internal one)
``regions``            evaluated regions, JSON ``{"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}``
``postprocess``        post-processing thresholds (see below), ``{"min_component_mm3": ..., ...}``
``postprocess_by_population``  optional: thresholds per population (``{"SSA": {...}, ...}``),
                       written by a run with ``postprocess-tuning = "population"``; ``predict
                       --population`` uses its population's
``round``              the federated round the weights come from
``config``             the run settings, JSON (for the record)
=====================  =============================================================================

Post-processing thresholds (:class:`PostprocessThresholds`) travel in the file so that a site
predicting with the model uses the settings the model was published with. The defaults, written
into every file unless the caller passes others, are:

* ``min_component_mm3 = 50``: connected components of the tumour (WT, 26-connectivity) smaller
  than 50 mm^3 are removed (BraTS 2023 ignores lesions of 50 mm^3 or less in its lesion-wise
  scores, so such specks can only count as false positives);
* ``et_min_mm3 = 100``: when the total enhancing tumour is smaller than 100 mm^3, every ET voxel
  becomes NETC (a few enhancing voxels are far more often noise than a real enhancing tumour, and
  an ET false positive on a case without ET costs a whole Dice of 0).

A file without ``postprocess`` (written before it existed) gets these defaults on loading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedbrats.common.data.contract import CONTRASTS, LABELS, REGIONS
from fedbrats.common.data.labels import DEFAULT_CONVENTION

if TYPE_CHECKING:  # heavy imports only where used, so that `fedbrats --help` stays fast
    import torch

    from fedbrats.common.config import RunConfig
    from fedbrats.common.networks.models import ModelSpec

__all__ = [
    "REQUIRED_KEYS",
    "STUDENT_FORMAT",
    "ModelFileError",
    "PostprocessThresholds",
    "Student",
    "load_student",
    "student_payload",
]

log = logging.getLogger(__name__)

STUDENT_FORMAT = "fedbrats-student/1"
"""Value of the ``format`` key of every student file this version writes and reads."""

REQUIRED_KEYS: tuple[str, ...] = (
    "format", "spec", "state_dict", "spacing", "patch_size", "channels", "label_convention",
)
"""Keys a student file must have; the others are optional on reading."""


class ModelFileError(ValueError):
    """A model file is missing, unreadable, or not a fedbrats student this version can use."""


@dataclass(frozen=True)
class PostprocessThresholds:
    """Post-processing settings stored in a student file (defaults: see the module docstring).

    A threshold of 0 switches its step off.
    """

    min_component_mm3: float = 50.0
    """Tumour components (26-connected) smaller than this are removed."""
    et_min_mm3: float = 100.0
    """When all enhancing tumour together is smaller than this, it is relabelled NETC."""

    def __post_init__(self) -> None:
        for name in ("min_component_mm3", "et_min_mm3"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name}: expected a volume >= 0 mm^3, got {value!r}")
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PostprocessThresholds:
        unknown = sorted(set(data) - {"min_component_mm3", "et_min_mm3"})
        if unknown:
            raise ValueError(
                f"unknown post-processing settings {unknown}; expected min_component_mm3 and "
                "et_min_mm3"
            )
        return cls(**dict(data))


@dataclass
class Student:
    """A student read from its file, ready for inference.

    ``network`` is the bare MONAI network in eval mode on ``device``: ``B, 4, H, W, D`` input
    (channels in the order of ``channels``) to ``B, 4, H, W, D`` logits (classes as in
    :data:`fedbrats.common.data.contract.LABELS`, i.e. ``label_convention`` = brats2023).
    """

    network: torch.nn.Module
    spec: ModelSpec
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    channels: tuple[str, ...] = CONTRASTS
    label_convention: str = DEFAULT_CONVENTION
    postprocess: PostprocessThresholds = field(default_factory=PostprocessThresholds)
    """The thresholds it post-processes with: its population's when the file has thresholds
    per population and one was asked for, else the file's ``postprocess``."""
    round: int | None = None
    path: Path | None = None
    device: str = "cpu"
    trained_without: tuple[str, ...] | None = None
    """Contrasts modality dropout removed from the student's input in training: those it learnt
    to do without (None: the file does not say)."""
    heads: tuple[str, ...] = ()
    """The populations the network has a last block of (run setting ``student-heads =
    "population"``); empty for one shared last block."""
    population: str | None = None
    """The population whose head segments; ``None`` with heads: the mean of them all."""

    def describe_heads(self) -> str:
        """One line on which head segments ("" for a network with one last block)."""
        if not self.heads:
            return ""
        if self.population is None:
            return (f"a last block per population ({', '.join(self.heads)}); no --population "
                    "given, so the mean of all of them segments")
        return f"a last block per population; {self.population}'s segments"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def student_payload(
    run: RunConfig,
    arrays: Mapping[str, Any],
    server_round: int,
    postprocess: PostprocessThresholds | Mapping[str, float] | None = None,
    postprocess_by_population: Mapping[str, PostprocessThresholds] | None = None,
) -> dict:
    """The dictionary to ``torch.save`` as a student file (see the module docstring).

    ``arrays``: the network's state dict (tensors or numpy arrays); ``postprocess``: thresholds
    to publish with the model, the defaults when None; ``postprocess_by_population``: those of
    each population, when they were tuned per population.
    """
    from fedbrats.common.networks.models import student_spec
    from fedbrats.common.utils.arrays import to_tensors

    if postprocess is None:
        thresholds = PostprocessThresholds()
    elif isinstance(postprocess, PostprocessThresholds):
        thresholds = postprocess
    else:
        thresholds = PostprocessThresholds.from_dict(postprocess)
    return {
        "format": STUDENT_FORMAT,
        "spec": json.dumps(student_spec(run).to_dict()),
        "state_dict": to_tensors(arrays),
        "spacing": [float(run.spacing)] * 3,
        "patch_size": int(run.patch_size),
        "channels": list(CONTRASTS),
        "labels": json.dumps({str(k): v for k, v in LABELS.items()}),
        "label_convention": DEFAULT_CONVENTION,
        "regions": json.dumps({k: list(v) for k, v in REGIONS.items()}),
        "postprocess": thresholds.to_dict(),
        **({"postprocess_by_population": {str(k): v.to_dict()
                                          for k, v in postprocess_by_population.items()}}
           if postprocess_by_population else {}),
        "round": int(server_round),
        "config": json.dumps(run.to_dict()),
    }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj][:6]
        more = ", ..." if len(obj) > 6 else ""
        return f"a {type(obj).__name__} with keys {', '.join(keys)}{more}"
    return f"a {type(obj).__name__}"


def _triple(value: Any, kind: type, what: str, where: str) -> tuple:
    items = [value] * 3 if isinstance(value, int | float) and not isinstance(value, bool) else value
    try:
        out = tuple(kind(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ModelFileError(f"{where}: expected {what}, found {value!r}")
    return out


def _read(path: Path) -> dict:
    import pickle
    import re
    import zipfile

    import torch

    if not path.exists():
        raise ModelFileError(
            f"{path}: model file not found; expected a fedbrats student file ({STUDENT_FORMAT}), "
            "such as student.pt in a run folder"
        )
    if not path.is_file():
        raise ModelFileError(f"{path}: expected a student file, found a folder")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        size = path.stat().st_size
        raise ModelFileError(
            f"{path}: unreadable model file, truncated or corrupt (not the zip archive that "
            f"torch.save writes; {size} bytes); expected a {STUDENT_FORMAT} file written by "
            "torch.save"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise ModelFileError(
            f"{path}: not a fedbrats student file: it holds {what}, which "
            f"torch.load(weights_only=True) refuses to load; expected a {STUDENT_FORMAT} file "
            "of tensors and plain values"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelFileError(
            f"{path}: unreadable model file, truncated or corrupt ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}); expected a "
            f"{STUDENT_FORMAT} file written by torch.save"
        ) from None
    if not isinstance(data, Mapping):
        raise ModelFileError(
            f"{path}: not a fedbrats student file: expected a dict with format "
            f"{STUDENT_FORMAT!r}, found {_describe(data)}"
        )
    if "format" not in data:
        bare = data and all(isinstance(v, torch.Tensor) for v in data.values())
        hint = (
            "; it looks like a bare state_dict: weights without the network spec, spacing and "
            "channel order that prediction needs (use the run folder's student.pt)"
            if bare else ""
        )
        raise ModelFileError(
            f"{path}: not a fedbrats student file: no 'format' key (expected format "
            f"{STUDENT_FORMAT!r}), found {_describe(data)}{hint}"
        )
    if data["format"] != STUDENT_FORMAT:
        raise ModelFileError(
            f"{path}: format {data['format']!r}; expected {STUDENT_FORMAT!r} (a fedbrats student "
            "file; teacher files and checkpoints cannot be used for prediction)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelFileError(
            f"{path}: student file lacks {', '.join(missing)}; expected keys "
            f"{', '.join(REQUIRED_KEYS)}, found {', '.join(map(str, data))}"
        )
    return dict(data)


def _state_dict_problems(net: torch.nn.Module, state: Mapping[str, Any]) -> list[str]:
    import torch

    expected = net.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing weights ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''})")
    shapes = []
    for k, v in expected.items():
        if k in state:
            found = state[k]
            if not isinstance(found, torch.Tensor):
                shapes.append(f"{k}: expected a tensor, found {type(found).__name__}")
            elif tuple(found.shape) != tuple(v.shape):
                shapes.append(f"{k}: expected shape {tuple(v.shape)}, found {tuple(found.shape)}")
    if shapes:
        problems.append(f"{len(shapes)} weights of the wrong shape ({'; '.join(shapes[:3])}"
                        f"{'; ...' if len(shapes) > 3 else ''})")
    return problems


def _trained_without(config: Any) -> tuple[str, ...] | None:
    """The contrasts modality dropout removed in training, from a student file's run config."""
    try:
        run = json.loads(config) if isinstance(config, str) else config
    except ValueError:
        return None
    if not isinstance(run, Mapping) or "modality_dropout" not in run:
        return None
    if not run["modality_dropout"]:
        return ()
    which = str(run.get("dropout_contrasts", "all")).strip()  # older files: every contrast
    if which == "all":
        return CONTRASTS
    return tuple(c for c in CONTRASTS if c in {w.strip() for w in which.split(",")})


def _read_spec(data: Mapping, where: str) -> ModelSpec:
    """The file's network spec (``spec``: JSON of a :class:`ModelSpec`, or its dict)."""
    from fedbrats.common.networks.models import ModelSpec

    try:
        spec_data = data["spec"]
        return ModelSpec.from_dict(json.loads(spec_data) if isinstance(spec_data, str)
                                   else spec_data)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFileError(
            f"{where}: spec is not a valid network spec ({e}); expected JSON of a ModelSpec, "
            f"e.g. {{\"arch\": \"UNet\", \"kwargs\": {{...}}}}, found {str(data['spec'])[:120]!r}"
        ) from None


def _read_contract(data: Mapping, where: str) -> tuple[tuple[str, ...], str]:
    """The file's input channels and label convention, checked against the data contract."""
    from fedbrats.common.data.labels import get_convention

    channels = tuple(str(c) for c in data["channels"]) if isinstance(
        data["channels"], list | tuple) else ()
    if channels != CONTRASTS:
        raise ModelFileError(
            f"{where}: channels {data['channels']!r}; expected {list(CONTRASTS)} (the fedbrats "
            "data contract's input order)"
        )
    convention = str(data["label_convention"])
    try:
        get_convention(convention)
    except ValueError as e:
        raise ModelFileError(f"{where}: label_convention: {e}") from None
    if convention != DEFAULT_CONVENTION:
        raise ModelFileError(
            f"{where}: label_convention {convention!r}; expected {DEFAULT_CONVENTION!r}, the "
            "internal classes every fedbrats network outputs"
        )
    return channels, convention


def _read_postprocess(data: Mapping, where: str, population: str | None = None
                      ) -> PostprocessThresholds:
    """The file's post-processing thresholds (``population``'s, when the file has thresholds
    per population and names it); the defaults (logged) when it has none."""
    by_population = data.get("postprocess_by_population")
    if population is not None and isinstance(by_population, Mapping) and \
            population in by_population:
        try:
            return PostprocessThresholds.from_dict(by_population[population])
        except (TypeError, ValueError, AttributeError) as e:
            raise ModelFileError(f"{where}: postprocess_by_population[{population!r}] "
                                 f"{by_population[population]!r}: {e}") from None
    raw_pp = data.get("postprocess")
    if raw_pp is None:
        log.info("%s has no post-processing settings; using the defaults %s", where,
                 PostprocessThresholds().to_dict())
        return PostprocessThresholds()
    try:
        return PostprocessThresholds.from_dict(raw_pp)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(
            f"{where}: postprocess {raw_pp!r}: {e}; expected {{'min_component_mm3': 50.0, "
            "'et_min_mm3': 100.0}"
        ) from None


def _build_trained_network(spec: ModelSpec, state: Any, where: str) -> torch.nn.Module:
    """The network of ``spec`` holding the weights ``state`` (checked first), in eval mode."""
    from fedbrats.common.networks.models import build_network

    try:
        net = build_network(spec, len(CONTRASTS), len(LABELS))
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: cannot build the network of spec {spec}: {e}") from None
    if not isinstance(state, Mapping):
        raise ModelFileError(
            f"{where}: state_dict: expected a dict of tensors, found {_describe(state)}"
        )
    problems = _state_dict_problems(net, state)
    if problems:
        raise ModelFileError(
            f"{where}: state_dict does not match the network spec ({spec.arch}, "
            f"{len(net.state_dict())} weights expected): " + "; ".join(problems)
        )
    net.load_state_dict(state, strict=True)
    net.eval()
    return net


def load_student(path: str | Path, device: str = "cpu", population: str | None = None
                 ) -> Student:
    """Read a student file and build its network, in eval mode on ``device``.

    ``population`` picks the head of a student with one per population (None: their mean); it
    is ignored by a student with a single last block.

    Raises :class:`ModelFileError` naming the file, what was expected and what was found when
    the file is missing, truncated or corrupt, not a fedbrats student (wrong or missing
    ``format``, missing keys), or holds weights that do not fit its network spec.
    """
    import torch

    path = Path(path)
    data = _read(path)
    where = str(path)
    spec = _read_spec(data, where)
    channels, convention = _read_contract(data, where)
    spacing = _triple(data["spacing"], float, "a voxel size in mm > 0 (one number or three)",
                      f"{where}: spacing")
    patch = _triple(data["patch_size"], int, "a patch size in voxels > 0 (one number or three)",
                    f"{where}: patch_size")
    thresholds = _read_postprocess(data, where, population)
    net = _build_trained_network(spec, data["state_dict"], where)
    net.to(torch.device(device))
    from fedbrats.common.networks.models import POPULATION_HEADS, set_population

    heads = tuple(spec.options.get(POPULATION_HEADS) or ())
    population = population if heads else None
    set_population(net, population)
    rnd = data.get("round")
    return Student(
        network=net,
        spec=spec,
        spacing=spacing,
        patch_size=patch,
        channels=channels,
        label_convention=convention,
        postprocess=thresholds,
        round=int(rnd) if isinstance(rnd, int | float) else None,
        path=path,
        device=str(torch.device(device)),
        trained_without=_trained_without(data.get("config")),
        heads=heads,
        population=population,
    )
