"""Privacy spent by differentially private distillation rounds: a Renyi-DP accountant.

With ``dp-noise-multiplier`` z > 0 the server wraps its strategy in Flower's
``DifferentialPrivacyClientSideFixedClipping`` and every site's ``train`` handler runs Flower's
``fixedclipping_mod``. What Flower 1.41 does, read from its source
(``flwr/serverapp/strategy/dp_fixed_clipping.py``, ``flwr/clientapp/mod/centraldp_mods.py``,
``flwr/supercore/differential_privacy.py``):

* each site clips its update ``w_site - w_global`` (all arrays together, flat L2 norm) to at most
  the clipping norm C and sends ``w_global + clipped update``;
* the server averages the n replies (equal weights) and adds Gaussian noise of standard deviation
  ``z * C / n`` to every value of the average (``compute_stdv(z, C, num_sampled_clients)``).

Adding or removing one site changes the mean by at most C / n, so each round is the Gaussian
mechanism with noise multiplier z on the site-level sensitivity: one round costs
``eps_RDP(alpha) = alpha / (2 z^2)`` (Mironov 2017, Prop. 7), rounds compose by adding RDP
(Prop. 1), and ``(alpha, eps_RDP)``-RDP gives ``(eps_RDP + log(1/delta) / (alpha - 1), delta)``-DP
(Prop. 3). Here every site takes part in every round, so there is no amplification by sampling.
When the server aggregated only m < n updates in a round (a site failed or its update was
rejected) the noise, still calibrated for n, is smaller relative to the sensitivity C / m: that
round is accounted with the effective multiplier ``z * m / n``.

Because the RDP of the Gaussian mechanism is linear in alpha, ``K * alpha`` with
``K = sum_rounds 1 / (2 z_t^2)``, the minimum over all real alpha > 1 has a closed form:
``alpha* = 1 + sqrt(log(1/delta) / K)`` and ``eps = K + 2 sqrt(K log(1/delta))``.

Reference: I. Mironov, "Renyi Differential Privacy", IEEE CSF 2017, arXiv:1702.07476.

Flower 1.41 ships its own accountant (``flwr.supercore.privacy_accounting.RdpAccountant``) but it
needs the optional ``dp-accounting`` package (``flwr[dp]``, not installed here), and the DP
wrappers only accept it around a strategy whose ``aggregate_train`` *is* ``FedAvg``'s (ours
records, validates and checkpoints in an override). This module is the standard accountant
instead; it uses the classic conversion of Prop. 3, slightly looser (larger epsilon) than the
improved conversion of ``dp-accounting``.

What the guarantee covers: the student weights the server releases after each round (to the
sites, into checkpoints and the final ``student.pt``), at the level of a whole site's data. It
does not cover what the sites send in clear beside the weights (training losses, evaluation
Dice, case counts), and it assumes a trusted server: the server sees each site's clipped update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_ORDERS",
    "GaussianRdpAccountant",
    "effective_noise_multiplier",
    "epsilon_from_rdp",
    "gaussian_rdp",
    "noise_std",
    "privacy_summary",
]

DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10 for x in range(1, 100)) + tuple(float(a) for a in range(12, 64))
    + (128.0, 256.0, 512.0)
)
"""The usual grid of Renyi orders (as in TensorFlow Privacy), for :func:`epsilon_from_rdp`."""


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS,
                 rounds: int = 1) -> list[float]:
    """RDP of ``rounds`` Gaussian mechanisms with this noise multiplier at each order:
    ``rounds * alpha / (2 z^2)`` (Mironov 2017, Prop. 7 and Prop. 1)."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise multiplier: expected a number > 0, got {noise_multiplier!r}")
    return [rounds * a / (2 * noise_multiplier**2) for a in orders]


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float
                     ) -> tuple[float, float]:
    """``(eps, alpha)``: the smallest ``rdp(alpha) + log(1/delta) / (alpha - 1)`` over ``orders``
    (Mironov 2017, Prop. 3)."""
    _check_delta(delta)
    best = (math.inf, math.nan)
    for a, r in zip(orders, rdp, strict=True):
        if a <= 1:
            raise ValueError(f"Renyi order {a}: expected > 1")
        eps = r + math.log(1 / delta) / (a - 1)
        if eps < best[0]:
            best = (eps, a)
    return best


def noise_std(noise_multiplier: float, clipping_norm: float, num_sites: int) -> float:
    """Standard deviation of the noise Flower adds to the mean: ``z * C / n``."""
    return noise_multiplier * clipping_norm / num_sites


def effective_noise_multiplier(noise_multiplier: float, num_sampled: int,
                               num_aggregated: int) -> float:
    """Multiplier relative to the sensitivity ``C / m`` of a mean of ``m`` clipped updates when
    the noise was calibrated for ``n`` sites: ``z * m / n``."""
    if num_aggregated <= 0:
        raise ValueError("no update was aggregated: nothing was released")
    return noise_multiplier * num_aggregated / num_sampled


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not (0 < float(delta) < 1):
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")


@dataclass
class GaussianRdpAccountant:
    """Composes Gaussian releases (full participation); epsilon at any delta.

    >>> acc = GaussianRdpAccountant()
    >>> acc.compose(1.0)
    >>> round(acc.epsilon(1e-5), 4)
    5.2985
    """

    noise_multipliers: list[float] = field(default_factory=list)

    def compose(self, noise_multiplier: float, count: int = 1) -> None:
        if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
            raise ValueError(
                f"noise multiplier: expected a finite number > 0, got {noise_multiplier!r}")
        if count < 1:
            raise ValueError(f"count: expected >= 1, got {count}")
        self.noise_multipliers.extend([float(noise_multiplier)] * count)

    @property
    def num_releases(self) -> int:
        return len(self.noise_multipliers)

    @property
    def rdp_slope(self) -> float:
        """``K`` in ``eps_RDP(alpha) = K * alpha``: ``sum 1 / (2 z_t^2)``."""
        return sum(1 / (2 * z * z) for z in self.noise_multipliers)

    def rdp(self, orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
        k = self.rdp_slope
        return [k * a for a in orders]

    def epsilon_and_order(self, delta: float) -> tuple[float, float | None]:
        """``(eps, alpha*)``, minimised over every real order ``alpha > 1`` (closed form)."""
        _check_delta(delta)
        k = self.rdp_slope
        if k == 0:
            return 0.0, None
        log_inv_delta = math.log(1 / delta)
        alpha = 1 + math.sqrt(log_inv_delta / k)
        return k * alpha + log_inv_delta / (alpha - 1), alpha

    def epsilon(self, delta: float) -> float:
        return self.epsilon_and_order(delta)[0]


def _field(run: Any, name: str, default: Any = None) -> Any:
    if isinstance(run, Mapping):
        return run.get(name, default)
    return getattr(run, name, default)


def privacy_summary(run: Any, rounds: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What the report says about differential privacy; ``None`` when the run had none.

    ``run``: the :class:`~fedbrats.common.config.RunConfig` (or its dict); ``rounds``:
    ``rounds.json``,
    where the strategy wrote ``{"dp": {"sites_aggregated": m, "noise_multiplier": z_eff}}``
    into every round it released with noise.
    """
    z = float(_field(run, "dp_noise_multiplier", 0.0) or 0.0)
    if z <= 0:
        return None
    clip = float(_field(run, "dp_clipping_norm"))
    delta = float(_field(run, "dp_delta"))
    n = int(_field(run, "num_sites"))
    acc = GaussianRdpAccountant()
    without: list[int] = []
    partial: list[int] = []
    for r in rounds:
        dp = r.get("dp") if isinstance(r, Mapping) else None
        if not isinstance(dp, Mapping):
            without.append(int(r.get("round", 0)) if isinstance(r, Mapping) else 0)
            continue
        if not dp.get("sites_aggregated"):
            continue  # nothing released that round
        acc.compose(float(dp["noise_multiplier"]))
        if int(dp["sites_aggregated"]) < n:
            partial.append(int(r.get("round", 0)))
    eps, order = acc.epsilon_and_order(delta)
    out: dict[str, Any] = {
        "mechanism": "Gaussian noise on the mean of client-side clipped updates (Flower "
                     "DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod)",
        "noise_multiplier": z,
        "clipping_norm": clip,
        "noise_std": noise_std(z, clip, n),
        "num_sites": n,
        "delta": delta,
        "rounds": acc.num_releases,
        "epsilon": eps if without == [] else math.inf,
        "optimal_order": order,
        "accountant": "RDP of the Gaussian mechanism, full participation (no sampling "
                      "amplification), add/remove one site; Mironov 2017",
        "unit": "one site's whole data set",
        "covers": "the student weights released after every round; not the metrics sent in "
                  "clear (losses, Dice, case counts); the server sees clipped updates",
    }
    if partial:
        out["rounds_with_fewer_sites"] = partial
    if without:
        out["rounds_without_noise"] = without
        out["note"] = ("some rounds were released without DP noise (run before DP was switched "
                       "on): no finite guarantee for the final student")
    return out
