"""Sliding-window softmax with flip test-time augmentation
(fedbrats.common.inference.sliding_window)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedbrats.common.inference.sliding_window import FLIPS, sliding_window_softmax


def test_the_flips_are_every_combination_of_the_three_axes():
    assert len(set(FLIPS)) == 8 and FLIPS[0] == ()
    assert set(FLIPS) == {(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)}


def test_a_flip_equivariant_network_is_unchanged_and_certain():
    torch.manual_seed(0)
    net = nn.Conv3d(4, 3, kernel_size=1)  # pointwise: flipping the input flips the output
    x = torch.randn(1, 4, 20, 18, 16)
    with torch.no_grad():
        plain, none = sliding_window_softmax(net, x, (8, 8, 8), 0.25)
        mean, var = sliding_window_softmax(net, x, (8, 8, 8), 0.25, tta=True)
    assert none is None and plain.shape == (3, 20, 18, 16)
    torch.testing.assert_close(plain.sum(0), torch.ones(20, 18, 16))
    torch.testing.assert_close(mean, plain, atol=1e-5, rtol=0)
    assert var.shape == (20, 18, 16) and float(var.max()) < 1e-6


class Ramp(nn.Module):
    """Logits that grow with the window's own first-axis position: not flip-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(-3, 3, x.shape[2]).view(1, 1, -1, 1, 1)
        return torch.cat([ramp.expand_as(x[:, :1]), -ramp.expand_as(x[:, :1])], dim=1)


def test_a_network_that_is_not_equivariant_is_averaged_over_the_flips():
    x = torch.zeros(1, 1, 12, 6, 6)
    with torch.no_grad():
        plain, _ = sliding_window_softmax(Ramp(), x, (12, 6, 6), 0.0)
        mean, var = sliding_window_softmax(Ramp(), x, (12, 6, 6), 0.0, tta=True)
    # without TTA class 0 wins at the high end of the first axis only
    assert plain[0, -1, 0, 0] > 0.99 and plain[0, 0, 0, 0] < 0.01
    # with it half the copies see each end the other way round: 0.5 everywhere, and uncertain
    torch.testing.assert_close(mean, torch.full_like(mean, 0.5), atol=1e-5, rtol=0)
    assert float(var[0, 0, 0]) > 0.2 and float(var[6, 0, 0]) < float(var[0, 0, 0])


def test_one_image_at_a_time():
    with pytest.raises(ValueError, match="1, C, H, W, D"):
        sliding_window_softmax(Ramp(), torch.zeros(2, 1, 8, 8, 8), (8, 8, 8), 0.0)
