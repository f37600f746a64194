"""Post-processing thresholds tuned by the federation.

Fixed thresholds (50 mm^3 components, 100 mm^3 ET) suit no population in particular: adaptive
post-processing raised the BraTS ranking metric by 14.9 % for SSA and 0.9 % for GLI. With run
setting ``postprocess-tuning`` the server proposes, with the final evaluation, a grid of
thresholds (:data:`GRID`: the minimum tumour component volume and the ET volume under which ET
becomes NETC). Every site post-processes its own validation segmentations at each grid point,
scores them with the BraTS lesion-wise Dice per region (the challenge's lesion matching for its
population) and returns only those scores. The server keeps the point with the best
equal-weight mean over the sites of the mean over regions (``global``), or each population's own
best (``population``), and writes it into ``student.pt``. Ties go to the default thresholds,
then to the smaller ones.

Pure functions (numpy, scipy): the sites and the benchmark call the same code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedbrats.common.config import POSTPROCESS_TUNINGS as TUNING_MODES
from fedbrats.common.data.contract import REGIONS
from fedbrats.common.inference.modelfile import PostprocessThresholds

GRID: dict[str, tuple[float, ...]] = {
    "min_component_mm3": (0.0, 25.0, 50.0, 100.0, 200.0, 400.0),
    "et_min_mm3": (0.0, 50.0, 100.0, 200.0, 400.0),
}
"""The thresholds proposed (30 points); the defaults (50, 100) are among them."""



def grid_points(grid: Mapping[str, Sequence[float]] = GRID) -> list[PostprocessThresholds]:
    """Every combination of the grid's values (component volume varies slowest); the defaults
    are added when the grid lacks them, so that the gain over them can be given."""
    points = [PostprocessThresholds(float(c), float(e)) for c in grid["min_component_mm3"]
              for e in grid["et_min_mm3"]]
    if PostprocessThresholds() not in points:
        points.append(PostprocessThresholds())
    return points


def encode_grid(points: Sequence[PostprocessThresholds]) -> str:
    """The grid as it travels in the final evaluation's config (JSON)."""
    return json.dumps([p.to_dict() for p in points])


def decode_grid(text: str) -> list[PostprocessThresholds]:
    """:func:`encode_grid` reversed; ``ValueError`` saying what was expected."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, list) or not raw:
            raise ValueError("expected a non-empty list")
        return [PostprocessThresholds.from_dict(p) for p in raw]
    except (ValueError, TypeError) as e:
        raise ValueError(f"post-processing grid {text[:80]!r}: {e}; expected a JSON list of "
                         "{'min_component_mm3': ..., 'et_min_mm3': ...}") from None


def score_points(
    cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]],
    challenge: str,
    points: Sequence[PostprocessThresholds],
) -> np.ndarray:
    """``len(points) x 3``: for each grid point, the lesion-wise Dice of WT, TC and ET (BraTS
    2023 rules for ``challenge``), averaged over ``cases`` (raw label map, ground truth,
    spacing), each case post-processed with that point's thresholds."""
    from fedbrats.common.inference.postprocessing import clean_labels
    from fedbrats.common.metrics.brats import lesion_wise

    out = np.zeros((len(points), len(REGIONS)), dtype=np.float64)
    if not cases:
        return out * np.nan
    for i, point in enumerate(points):
        total = np.zeros(len(REGIONS))
        for pred, gt, spacing in cases:
            cleaned = clean_labels(pred, spacing, point.min_component_mm3, point.et_min_mm3)[0]
            scores = lesion_wise(cleaned, gt, spacing, challenge)
            total += [float(scores[r].dice) for r in REGIONS]
        out[i] = total / len(cases)
    return out


def ranking(scores: np.ndarray) -> np.ndarray:
    """One number per grid point: the mean lesion-wise Dice over the regions."""
    return np.asarray(scores, dtype=np.float64).mean(axis=1)


@dataclass
class TuningChoice:
    mode: str
    points: list[PostprocessThresholds]
    chosen: PostprocessThresholds
    """The thresholds of every population (``global``), or the default for a population
    without a site (``population``)."""
    by_population: dict[str, PostprocessThresholds] = field(default_factory=dict)
    """``population`` mode: each population's own best."""
    site_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per site: its ranking score at the default and at the thresholds it will use, and the
    gain."""

    def to_dict(self) -> dict:
        return {"mode": self.mode, "chosen": self.chosen.to_dict(),
                "by_population": {k: v.to_dict() for k, v in self.by_population.items()},
                "sites": self.site_scores, "grid_points": len(self.points)}


def _best(score: np.ndarray, points: Sequence[PostprocessThresholds]) -> int:
    """The best point; ties to the default, then to the smaller thresholds."""
    default = PostprocessThresholds()
    top = np.nanmax(score)
    tied = [i for i in range(len(points)) if np.isclose(score[i], top, rtol=0, atol=1e-12)]
    if any(points[i] == default for i in tied):
        return next(i for i in tied if points[i] == default)
    return min(tied, key=lambda i: (points[i].min_component_mm3, points[i].et_min_mm3))


def choose(
    site_scores: Mapping[str, np.ndarray],
    points: Sequence[PostprocessThresholds],
    mode: str = "global",
    population_of: Mapping[str, str] | None = None,
) -> TuningChoice:
    """The thresholds the federation keeps (module docstring) from each site's
    :func:`score_points` (sites without validation scores left out)."""
    if mode not in TUNING_MODES[1:]:
        raise ValueError(f"postprocess-tuning {mode!r}: expected one of global, population")
    scores = {s: ranking(v) for s, v in site_scores.items() if np.isfinite(v).all()}
    if not scores:
        raise ValueError("no site returned post-processing scores")
    pop = dict(population_of or {s: s for s in scores})
    default_i = list(points).index(PostprocessThresholds())
    overall = np.mean(np.stack(list(scores.values())), axis=0)  # equal weight per site
    chosen = points[_best(overall, points)]
    choice = TuningChoice(mode, list(points), chosen)
    if mode == "population":
        for p in sorted(set(pop.values())):
            own = [scores[s] for s in scores if pop[s] == p]
            if own:
                choice.by_population[p] = points[_best(np.mean(own, axis=0), points)]
    for s, score in scores.items():
        used = choice.by_population.get(pop[s], chosen)
        at = float(score[list(points).index(used)])
        choice.site_scores[s] = {"default": float(score[default_i]), "tuned": at,
                                 "gain": at - float(score[default_i])}
    return choice


__all__ = ["GRID", "TUNING_MODES", "TuningChoice", "choose", "decode_grid", "encode_grid",
           "grid_points", "ranking", "score_points"]
