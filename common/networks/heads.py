"""One copy of a network's last block per population (torch only, nothing of fedbrats).

Standalone on purpose: :mod:`fedbrats.common.networks.models` builds its students with it, and
``fedbrats export`` copies this very file into a MONAI bundle (``scripts/heads.py``), whose
``inference.json`` builds the same network from MONAI's class and :func:`with_population_heads`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


class PopulationHeads(nn.Module):
    """One copy of a network's last block per population, in place of that block.

    :attr:`population` picks the copy a forward pass uses (every site trains the body and its
    own population's copy); ``None`` gives the mean of all copies' outputs (the logits' mean),
    for a case whose population is not known. Each copy is aggregated over its own
    population's sites only (``fedbrats.common.networks.models.population_mean``). State-dict
    keys read ``<block>.population_heads.<POP>.<...>``.
    """

    def __init__(self, block: nn.Module, populations: Sequence[str]):
        super().__init__()
        self.population_heads = nn.ModuleDict({p: copy.deepcopy(block) for p in populations})
        self.population: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.population is None:
            return torch.stack([h(x) for h in self.population_heads.values()]).mean(0)
        return self.population_heads[self.population](x)

    def extra_repr(self) -> str:
        return f"populations={list(self.population_heads)}, population={self.population!r}"


def with_population_heads(net: nn.Module, block: str, populations: Sequence[str],
                          population: str | None = None) -> nn.Module:
    """``net`` with its module ``block`` (a dotted name) replaced by :class:`PopulationHeads`
    of ``populations``, using ``population``'s head (None: their mean); returns ``net``."""
    parent_name, _, child = block.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    heads = PopulationHeads(getattr(parent, child), list(populations))
    if population is not None and population not in heads.population_heads:
        raise ValueError(f"the network has heads for {', '.join(populations)}, not for "
                         f"population {population!r}")
    heads.population = population
    setattr(parent, child, heads)
    return net
