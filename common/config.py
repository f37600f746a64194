"""Run settings, read once into a frozen, validated dataclass.

Run settings live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (kebab-case keys) and can be
overridden with ``flwr run -c "key=value"``. ``preset`` picks a full set of defaults
(:data:`PRESETS`); any other key that is set overrides its preset value. Flower only lets ``-c``
override keys that exist in pyproject, so every key is listed there with an *unset* value meaning
"the preset's value": ``-1`` for numbers and ``""`` for strings and switches (switches take
``"true"``/``"false"``).

Per-site settings (data folder, population, work folder, label convention) are not run settings:
they come from the SuperNode's node config in deployment (:class:`SiteConfig`), or from the
partition id in simulation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedbrats.common.data.contract import CONTRASTS, POPULATIONS, check_population
from fedbrats.common.data.labels import CONVENTIONS, DEFAULT_CONVENTION
from fedbrats.common.data.provenance import DATA_KINDS

STRATEGIES = ("fedavg", "fedprox", "fedadam")
LR_SCHEDULES = ("cosine", "constant")
AGGREGATIONS = ("equal", "cases")
FEATURE_KINDS = ("mse", "cosine")
KD_MASKS = ("none", "teacher-correct")
KD_TRUSTS = ("none", "site", "region")
TRANSFER_DTYPES = ("float32", "float16")
POSTPROCESS_TUNINGS = ("off", "global", "population")
"""Values of the run setting ``postprocess-tuning``."""
DEVICES = ("auto", "cpu", "cuda")


TEACHER_RECIPE = 2
"""Version of the teacher training code; bump it when the loss or the sampling changes.
2: batch Dice over the tumour classes (common/losses.py)."""


STUDENT_INITS: tuple[str, ...] = ("new", "warm")
STUDENT_HEADS: tuple[str, ...] = ("shared", "population")
BASELINES: tuple[str, ...] = ("", "fedavg")


class ConfigError(ValueError):
    """A run or site setting is missing, unknown or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Every run setting; see the README's configuration table for meanings."""

    preset: str = "cpu-demo"
    # networks and data
    teacher_model: str = "teacher-cpu"
    student_model: str = "student-cpu"
    spacing: float = 3.0
    patch_size: int = 32
    batch_size: int = 2
    val_fraction: float = 0.34
    # phase 1: teachers
    teacher_epochs: int = 30
    teacher_steps_per_epoch: int = 8
    teacher_lr: float = 3e-3
    teacher_warm_rounds: int = 0
    """Rounds of federated averaging of the teacher network on labels (``teacher-steps-per-epoch``
    local steps each, equal weight per site) before each site trains its teacher from the
    global result; 0: every teacher starts from scratch. The warm-start model travels like the
    student; the teachers trained from it never leave their sites."""
    baseline: str = ""
    """``fedavg``: after phase 2, the same rounds again for a labels-only FedAvg model (same
    schedule, dropout and strategy, no teacher), scored beside the student and the teachers in
    the final evaluation; ``""``: none (it doubles phase 2's cost)."""
    student_init: str = "new"
    """Where phase 2's student starts: ``new`` (seeded initial weights) or ``warm`` (the
    teachers' warm-start network; needs ``teacher-warm-rounds`` > 0 and the teacher's network
    for the student's)."""
    student_heads: str = "population"
    """``population`` (the default): the student's last block (the one that gives the logits)
    is kept once per population, each trained at and averaged over its own population's sites
    only, the rest of the network shared by all (README, "Why the paediatric core"); a
    prediction names its population (or takes the mean of the heads). ``shared``: one last
    block for all. Under DP and SecAgg+ each head comes from the mean alone
    (``rescale_heads``)."""
    # phase 2: distillation rounds
    num_rounds: int = 60
    local_steps: int = 30
    student_lr: float = 3e-3
    lr_schedule: str = "cosine"
    """Local learning rate over the rounds: ``cosine`` decays ``student-lr`` to a tenth by the
    last round, ``constant`` keeps it."""
    supervised_weight: float = 1.0
    logit_weight: float = 1.0
    feature_weight: float = 0.1
    temperature: float = 2.0
    feature_kind: str = "mse"
    kd_trust: str = "region"
    """How much a site's distillation terms count (default ``region``; README, "The method"):
    ``none`` fully; ``site``: by how its teacher
    compares with the global student it is sent, on the site's validation cases (mean Dice of
    WT, TC and ET): weight ``clip(0.5 + (teacher - student) / 0.1, 0, 1)``, so a teacher 0.05
    ahead counts fully and one 0.05 behind not at all (then the labels alone train);
    ``region``: the same weight per region (WT, TC, ET) from that region's Dice, applied to
    the logit distillation split by region (``region_kd_loss``), the feature term weighted by
    their mean. The teacher's validation Dice is computed once and kept in the work folder."""
    kd_mask: str = "none"
    """Where the logit distillation applies: ``none`` everywhere; ``teacher-correct`` only on
    voxels where the teacher's class is the label's, so that a weak teacher's mistakes are
    not distilled (the labels supervise the rest)."""
    teacher_cache: bool = False
    """``true``: the frozen teacher's outputs (logits and tapped features, float16) computed once
    per training case on the model grid and kept in ``work-dir/teacher-cache``, cropped and flipped
    with the case, instead of a teacher forward pass at every step; rebuilt when the teacher or
    the preprocessing changes. The teacher then sees the case without the student's intensity
    augmentation, and crops start on a multiple of the teacher's coarsest feature stride
    (README, "The teacher's outputs, kept"). ``false`` (the default until the quality benchmark
    has measured it): the teacher runs at every step."""
    modality_dropout: bool = True
    dropout_prob: float = 0.1
    dropout_contrasts: str = "t1n,t1c,t2w"
    """The contrasts modality dropout may remove from the student's input (comma-separated, or
    ``all``); the others are always kept. Default: all but FLAIR, the one contrast that tells
    oedema (bright) from fluid (dark); a student trained without it takes the bright-on-T2 fluid
    at the brain's surface for oedema, a false rim around the meningiomas
    (docs/bench/demo-settings.md). In return it does not learn to do without FLAIR."""
    # aggregation
    aggregation: str = "equal"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    # run
    num_sites: int = 5
    min_sites: int = 0
    """Fewest sites whose replies make a distillation round count (0: all ``num_sites``). With
    fewer the run stops; started again it resumes after the last round that counted."""
    round_timeout: float = 3600.0
    """Seconds the server waits in each distillation round: first, when ``min_sites`` <
    ``num_sites``, for missing sites to connect, then for the replies (train, then evaluate);
    late replies are dropped."""
    seed: int = 0
    eval_every: int = 5
    """The global student is evaluated at the sites (the per-round curves) after every
    ``eval-every``-th distillation round and after the last; 1 = after every round."""
    sw_overlap: float = 0.25
    final_tta: bool = True
    """The final evaluation (student, teacher, missing contrasts) segments with flip test-time
    augmentation: the softmax averaged over the 8 flipped copies of each case (8x the
    inference). The per-round evaluations do not."""
    postprocess_tuning: str = "off"
    """``global``: with the final evaluation every site scores a grid of post-processing
    thresholds on its validation cases (lesion-wise Dice) and the server writes the best
    equal-weight mean into student.pt; ``population``: each population's own best
    (:mod:`fedbrats.common.inference.postprocess_tuning`); ``off``: the defaults."""
    personalise: bool = False
    """A last phase: after the final evaluation every site fine-tunes the final student on its
    own cases (:mod:`fedbrats.client.finetune`), keeps it as ``work-dir/personal-student.pt``
    (it never leaves the site) and reports it beside the federated student."""
    personalise_max_steps: int = 300
    """With ``personalise``: the most fine-tuning steps per fold (scored every twelfth)."""
    amp: bool = False
    device: str = "auto"
    keep_site_updates: bool = False
    """Also save every site's returned student per round (audits and tests; large)."""
    output_dir: str = "runs/demo"
    data_root: str = "data/phantoms"
    """Simulation only: site ``i`` reads ``data_root/<population i>``."""
    sim_sites: str = ""
    """Simulation only: the virtual sites' own data, a JSON list with one object per site
    (``population``, ``data-dir``; optional ``labels``, ``manifest``): partition ``i`` is entry
    ``i`` (``fedbrats simulate --site``/``--sites-file`` write it). Empty: ``data-root``."""
    # privacy and integrity (see server/privacy.py, common/security/signing.py)
    signing_key: str = ""
    """Path of the server's Ed25519 private key (``fedbrats keys``): the server signs every
    checkpoint, the final student.pt and the student it sends each round. "" = unsigned."""
    dp_noise_multiplier: float = 0.0
    """Differential privacy: Gaussian noise multiplier z on the mean of the sites' clipped
    updates (noise std z * dp-clipping-norm / num-sites). 0 = off."""
    dp_clipping_norm: float = 10.0
    """L2 norm each site's whole update (student after minus student sent) is clipped to."""
    dp_delta: float = 1e-5
    """The delta of the (epsilon, delta) guarantee the report states."""
    secure_aggregation: bool = False
    """Aggregate the distillation rounds with Flower's SecAgg+: the server sees only the mean of
    the sites' updates (server/secagg.py)."""
    transfer_dtype: str = "float32"
    """Precision of the student as it travels in the distillation rounds and their evaluations:
    ``float16`` halves the bytes. The server keeps, aggregates and checkpoints the student in
    float32 and the sites train it in float32; only the copies sent and returned are rounded
    (a site answers in the precision it was sent; integer arrays are never cast)."""

    def __post_init__(self) -> None:
        from fedbrats.common.networks.models import PRESETS as MODEL_PRESETS
        from fedbrats.common.networks.models import resolve_spec

        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(
                    f"run setting {key.replace('_', '-')}: expected {what}, "
                    f"got {getattr(self, key)!r}"
                )

        for key in ("teacher_model", "student_model"):
            try:
                resolve_spec(getattr(self, key))
            except ValueError as e:
                name, presets = key.replace("_", "-"), ", ".join(MODEL_PRESETS)
                raise ConfigError(f"run setting {name}: {e} (presets: {presets})") from None
        need(self.spacing > 0, "spacing", "a voxel size > 0 mm")
        need(self.patch_size >= 16 and self.patch_size % 8 == 0, "patch_size",
             "a multiple of 8, at least 16")
        need(self.batch_size >= 1, "batch_size", "at least 1")
        need(0 < self.val_fraction < 1, "val_fraction", "a fraction between 0 and 1")
        for key in ("teacher_epochs", "teacher_steps_per_epoch", "num_rounds", "local_steps",
                    "num_sites", "eval_every", "personalise_max_steps"):
            need(getattr(self, key) >= 1, key, "an integer >= 1")
        for key in ("teacher_lr", "student_lr", "temperature", "server_lr"):
            need(getattr(self, key) > 0, key, "a number > 0")
        for key in ("supervised_weight", "logit_weight", "feature_weight", "proximal_mu"):
            need(getattr(self, key) >= 0, key, "a number >= 0")
        need(0 <= self.min_sites <= self.num_sites, "min_sites",
             f"0 (all sites) up to num-sites ({self.num_sites})")
        need(self.teacher_warm_rounds >= 0, "teacher_warm_rounds", "an integer >= 0 (0: off)")
        need(self.student_init in STUDENT_INITS, "student_init", " or ".join(STUDENT_INITS))
        need(self.baseline in BASELINES, "baseline", '"" (none) or fedavg')
        need(not (self.baseline and self.secure_aggregation), "baseline",
             '"" with secure-aggregation (the baseline rounds are aggregated in the clear)')
        if self.student_init == "warm":
            need(self.teacher_warm_rounds > 0, "teacher_warm_rounds",
                 "> 0 with student-init warm (the student starts from the warm start)")
            need(resolve_spec(self.teacher_model) == resolve_spec(self.student_model),
                 "student_init", "new unless teacher-model and student-model are the same "
                 "network (the warm start trains the teacher's)")
        need(self.round_timeout > 0, "round_timeout", "a number of seconds > 0")
        need(0 <= self.dropout_prob < 1, "dropout_prob", "a probability in [0, 1)")
        names = [c.strip() for c in self.dropout_contrasts.split(",")]
        need(self.dropout_contrasts.strip() == "all"
             or (set(names) <= set(CONTRASTS) and len(set(names)) == len(names)),
             "dropout_contrasts",
             f"\"all\" or distinct contrasts among {', '.join(CONTRASTS)}, comma-separated")
        need(0 <= self.sw_overlap < 1, "sw_overlap", "an overlap in [0, 1)")
        if self.sim_sites:
            sites = simulation_sites(self.sim_sites)
            need(len(sites) == self.num_sites, "num_sites",
                 f"{len(sites)}, the number of sites in sim-sites")
        need(self.feature_kind in FEATURE_KINDS, "feature_kind", " or ".join(FEATURE_KINDS))
        need(self.kd_mask in KD_MASKS, "kd_mask", " or ".join(KD_MASKS))
        need(self.kd_trust in KD_TRUSTS, "kd_trust", " or ".join(KD_TRUSTS))
        need(not (self.kd_mask != "none" and self.kd_trust == "region"), "kd_mask",
             'none with kd-trust region (the region terms weight the whole volume; set '
             'kd-trust to "site" or "none" to mask by the teacher)')
        need(self.student_heads in STUDENT_HEADS, "student_heads", " or ".join(STUDENT_HEADS))
        need(self.postprocess_tuning in POSTPROCESS_TUNINGS, "postprocess_tuning",
             " or ".join(POSTPROCESS_TUNINGS))
        need(self.transfer_dtype in TRANSFER_DTYPES, "transfer_dtype",
             " or ".join(TRANSFER_DTYPES))
        need(not (self.secure_aggregation and self.transfer_dtype != "float32"),
             "transfer_dtype", "float32 with secure-aggregation (SecAgg+ sends its own "
             "quantised integers, so a float16 update would gain nothing)")
        need(self.aggregation in AGGREGATIONS, "aggregation", " or ".join(AGGREGATIONS))
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", " or ".join(LR_SCHEDULES))
        need(self.strategy in STRATEGIES, "strategy", " or ".join(STRATEGIES))
        need(self.device in DEVICES, "device", " or ".join(DEVICES))
        need(self.dp_noise_multiplier >= 0, "dp_noise_multiplier", "a number >= 0 (0: no DP)")
        need(self.dp_clipping_norm > 0, "dp_clipping_norm", "a norm > 0")
        need(0 < self.dp_delta < 1, "dp_delta", "a probability in (0, 1)")
        if self.dp_noise_multiplier > 0:
            need(self.aggregation == "equal", "aggregation",
                 '"equal" with differential privacy (the noise is calibrated to an equal-weight '
                 'mean)')
            need(self.strategy in ("fedavg", "fedprox"), "strategy",
                 "fedavg or fedprox with differential privacy (FedAdam's server step would come "
                 "between the mean and the noise)")
        if self.secure_aggregation or self.dp_noise_multiplier > 0:
            need(self.teacher_warm_rounds == 0, "teacher_warm_rounds",
                 "0 with secure-aggregation or differential privacy (the teachers' warm start "
                 "is averaged in the clear, without noise)")
        if self.secure_aggregation:
            need(self.aggregation == "equal", "aggregation",
                 '"equal" with secure-aggregation (SecAgg+ sums equally weighted updates)')
            need(self.strategy in ("fedavg", "fedprox"), "strategy",
                 "fedavg or fedprox with secure-aggregation")
            need(not self.keep_site_updates, "keep_site_updates",
                 "false with secure-aggregation (the server never sees a single update)")
            need(self.num_sites >= 2, "num_sites", "at least 2 with secure-aggregation")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def dropout_channels(self) -> tuple[int, ...]:
        """Input channels (indices into ``CONTRASTS``) that modality dropout may remove."""
        if self.dropout_contrasts.strip() == "all":
            return tuple(range(len(CONTRASTS)))
        names = {c.strip() for c in self.dropout_contrasts.split(",")}
        return tuple(i for i, c in enumerate(CONTRASTS) if c in names)

    def baseline_run(self) -> RunConfig:
        """The settings of the labels-only FedAvg baseline (``baseline = "fedavg"``): no
        distillation terms, and one shared last block, as the FedAvg consortia run today."""
        return dataclasses.replace(self, logit_weight=0.0, feature_weight=0.0,
                                   student_heads="shared", student_init="new")

    @property
    def required_sites(self) -> int:
        """Replies a distillation round needs to count: ``min_sites``, or all sites if 0."""
        return self.min_sites or self.num_sites

    def evaluates_round(self, server_round: int) -> bool:
        """Whether the sites evaluate the global student after round ``server_round`` (1-based):
        every ``eval_every``-th round and the last."""
        return server_round % self.eval_every == 0 or server_round >= self.num_rounds

    def round_lr(self, server_round: int) -> float:
        """The sites' local learning rate in distillation round ``server_round`` (1-based)."""
        if self.lr_schedule == "constant" or self.num_rounds == 1:
            return self.student_lr
        progress = min(max(server_round - 1, 0) / (self.num_rounds - 1), 1.0)
        return self.student_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def teacher_fingerprint(self) -> dict[str, Any]:
        """The settings a site's teacher depends on: a stored teacher is reused only if equal.

        ``recipe`` is :data:`TEACHER_RECIPE`, so that a teacher trained by an older version of
        the training code (another loss, other sampling) is not reused.
        """
        keys = ("teacher_model", "spacing", "patch_size", "batch_size", "val_fraction",
                "teacher_epochs", "teacher_steps_per_epoch", "teacher_lr", "seed")
        out = {"recipe": TEACHER_RECIPE, **{k: getattr(self, k) for k in keys}}
        if self.teacher_warm_rounds:  # absent when off: teachers stored before it stay valid
            out["teacher_warm_rounds"] = self.teacher_warm_rounds
            out["warm_local_steps"] = self.local_steps
        return out


_BASE = RunConfig()

PRESETS: dict[str, RunConfig] = {
    # tests: tiny networks on a coarse grid; minutes become seconds
    "tiny": dataclasses.replace(
        _BASE, preset="tiny", teacher_model="teacher-tiny", student_model="student-tiny",
        spacing=4.0, patch_size=32, batch_size=1, teacher_epochs=1, teacher_steps_per_epoch=2,
        num_rounds=2, local_steps=2, num_sites=3, eval_every=1, final_tta=False,
        personalise_max_steps=4, output_dir="runs/tiny",
    ),
    # the default for `make demo`: five sites on two CPU cores within 15 minutes
    "cpu-demo": _BASE,
    # BraTS scale on site GPUs: 1 mm, 128^3 crops, larger networks, mixed precision
    "gpu": dataclasses.replace(
        _BASE, preset="gpu", teacher_model="teacher-gpu", student_model="student-gpu",
        spacing=1.0, patch_size=128, batch_size=2, val_fraction=0.2, teacher_epochs=300,
        teacher_steps_per_epoch=100, teacher_lr=1e-4 * 10, num_rounds=50, local_steps=200,
        student_lr=1e-3, amp=True, output_dir="runs/gpu",
    ),
}


def _field_types() -> dict[str, type]:
    return {f.name: type(getattr(_BASE, f.name)) for f in fields(RunConfig)}


def _unset(value: Any) -> bool:
    return (isinstance(value, str) and value.strip() == "") or (
        isinstance(value, int | float) and not isinstance(value, bool) and value == -1
    )


def _coerce(key: str, value: Any, kind: type) -> Any:
    name = key.replace("_", "-")
    if isinstance(value, str) and kind in (int, float):  # e.g. from `fedbrats simulate --set`
        try:
            value = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise ConfigError(f"run setting {name}: expected a number, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise ConfigError(f"run setting {name}: expected \"true\" or \"false\", got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"run setting {name}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run setting {name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run setting {name}: expected a string, got {value!r}")
    return value.strip()


def load_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from Flower's ``context.run_config`` (kebab-case keys).

    ``preset`` chooses the defaults; every other set key overrides them; unset values (``-1``,
    ``""``) keep the preset's. Unknown keys are an error with a suggestion.
    """
    types = _field_types()
    values = {str(k).replace("-", "_"): v for k, v in run_config.items()}
    unknown = [k for k in values if k not in types]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, types, n=1)
        hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
        raise ConfigError(f"unknown run setting {k.replace('_', '-')!r}{hint}")
    preset = values.pop("preset", "") or _BASE.preset
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"run setting preset: unknown preset {preset!r}; expected one of "
            f"{', '.join(PRESETS)}{hint}"
        )
    overrides = {k: _coerce(k, v, types[k]) for k, v in values.items() if not _unset(v)}
    return dataclasses.replace(PRESETS[preset], **overrides)


def pyproject_defaults() -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table: every key, unset, and the default preset."""
    out: dict[str, Any] = {}
    for name, kind in _field_types().items():
        key = name.replace("_", "-")
        if name == "preset":
            out[key] = _BASE.preset
        elif kind in (int, float):
            out[key] = -1
        else:
            out[key] = ""
    return out


@dataclass(frozen=True)
class SiteConfig:
    """One site's own settings: from the SuperNode's node config, or the simulation partition."""

    population: str
    data_dir: Path
    work_dir: Path
    labels: str = DEFAULT_CONVENTION
    manifest: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    data_kind: str = "any"
    """``real``: the site refuses cases that carry fedbrats' synthetic-data mark
    (:mod:`fedbrats.common.data.provenance`); ``any`` (the default) takes them and counts them."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "population", check_population(self.population))
        if self.data_kind not in DATA_KINDS:
            raise ConfigError(f"site setting data-kind: {self.data_kind!r} is not one of "
                              f"{', '.join(DATA_KINDS)}")
        if self.labels not in CONVENTIONS:
            raise ConfigError(
                f"site setting labels: unknown convention {self.labels!r}; expected one of "
                f"{', '.join(CONVENTIONS)}"
            )


SIMULATION_SITES: tuple[str, ...] = POPULATIONS
"""Simulation partition ``i`` is the site of ``SIMULATION_SITES[i]``."""


SIM_SITE_KEYS = ("population", "data-dir", "labels", "manifest", "data-kind")


def simulation_sites(text: str) -> list[dict[str, str]]:
    """The ``sim-sites`` run setting read and checked: one dict per virtual site with
    ``population``, ``data-dir``, ``labels`` (default :data:`DEFAULT_CONVENTION`),
    ``manifest`` (``""`` for none) and ``data-kind`` (default ``any``). Populations must differ (each site's work folder is
    ``output-dir/sites/<POP>``)."""
    import json

    def bad(what: str) -> ConfigError:
        return ConfigError(f"run setting sim-sites: {what}")

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"expected a JSON list of sites, got {text[:80]!r} ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise bad(f"expected a non-empty JSON list of sites, got {text[:80]!r}")
    out: list[dict[str, str]] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise bad(f"site {i + 1}: expected an object, got {entry!r}")
        unknown = sorted(set(entry) - set(SIM_SITE_KEYS))
        if unknown:
            raise bad(f"site {i + 1}: unknown key {unknown[0]!r}; expected "
                      f"{', '.join(SIM_SITE_KEYS)}")
        if not entry.get("population") or not entry.get("data-dir"):
            raise bad(f"site {i + 1}: population and data-dir are required, got {entry!r}")
        try:
            pop = check_population(str(entry["population"]))
        except ValueError as e:
            raise bad(f"site {i + 1}: {e}") from None
        labels = str(entry.get("labels") or DEFAULT_CONVENTION)
        if labels not in CONVENTIONS:
            raise bad(f"site {i + 1} ({pop}): unknown label convention {labels!r}; expected "
                      f"one of {', '.join(CONVENTIONS)}")
        kind = str(entry.get("data-kind") or "any")
        if kind not in DATA_KINDS:
            raise bad(f"site {i + 1} ({pop}): data-kind {kind!r} is not one of "
                      f"{', '.join(DATA_KINDS)}")
        if any(o["population"] == pop for o in out):
            raise bad(f"population {pop} is given twice; each virtual site has its own "
                      "population")
        out.append({"population": pop, "data-dir": str(entry["data-dir"]), "labels": labels,
                    "manifest": str(entry.get("manifest") or ""), "data-kind": kind})
    return out


def site_from_node_config(node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
    """The site's settings, from deployment node config or a simulation partition id.

    Deployment: ``flower-supernode --node-config "population='MEN' data-dir='/data/men'
    work-dir='/var/fedbrats' labels='brats2023'"``. Simulation: ``partition-id`` picks the
    population in :data:`SIMULATION_SITES` order; data in ``run.data_root/<POP>`` (or entry
    ``partition-id`` of ``run.sim_sites``), work folder in ``run.output_dir/sites/<POP>``.
    """
    if "data-dir" in node_config:
        missing = [k for k in ("population", "work-dir") if k not in node_config]
        if missing:
            raise ConfigError(
                f"node config: missing {', '.join(missing)}; a site needs population, data-dir "
                "and work-dir (for example --node-config \"population='MEN' "
                "data-dir='/data/men' work-dir='/var/lib/fedbrats'\")"
            )
        manifest = node_config.get("manifest") or None
        return SiteConfig(
            population=str(node_config["population"]),
            data_dir=Path(str(node_config["data-dir"])),
            work_dir=Path(str(node_config["work-dir"])),
            labels=str(node_config.get("labels") or DEFAULT_CONVENTION),
            manifest=Path(str(manifest)) if manifest else None,
            data_kind=str(node_config.get("data-kind") or "any"),
        )
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(SIMULATION_SITES):
            raise ConfigError(
                f"node config: partition-id {pid} has no site; simulation has "
                f"{len(SIMULATION_SITES)} sites ({', '.join(SIMULATION_SITES)})"
            )
        if run.sim_sites:
            sites = simulation_sites(run.sim_sites)
            if pid >= len(sites):
                raise ConfigError(f"node config: partition-id {pid} has no site; sim-sites "
                                  f"names {len(sites)}")
            spec = sites[pid]
            return SiteConfig(
                population=spec["population"], data_dir=Path(spec["data-dir"]),
                work_dir=Path(run.output_dir) / "sites" / spec["population"],
                labels=spec["labels"],
                manifest=Path(spec["manifest"]) if spec["manifest"] else None,
                data_kind=spec["data-kind"],
            )
        pop = SIMULATION_SITES[pid]
        return SiteConfig(
            population=pop,
            data_dir=Path(run.data_root) / pop,
            work_dir=Path(run.output_dir) / "sites" / pop,
        )
    raise ConfigError(
        "node config: expected data-dir, population and work-dir (deployment) or partition-id "
        f"(simulation); found {sorted(node_config)}"
    )
