"""Pins the data contract: changing it breaks saved models and every site's data."""

import numpy as np
import pytest

from fedbrats.common.data import contract


def test_channel_order_is_pinned():
    assert contract.CONTRASTS == ("t1n", "t1c", "t2w", "t2f")


def test_labels_and_regions_are_pinned():
    assert contract.LABELS == {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}
    assert contract.NUM_CLASSES == 4
    assert contract.REGIONS == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    assert list(contract.REGIONS) == ["WT", "TC", "ET"]


def test_populations_are_pinned():
    assert contract.POPULATIONS == ("GLI", "SSA", "PED", "MEN", "MET")


def test_region_masks_nest():
    labels = np.array([0, 1, 2, 3])
    assert contract.region_masks(labels, "WT").tolist() == [False, True, True, True]
    assert contract.region_masks(labels, "TC").tolist() == [False, True, False, True]
    assert contract.region_masks(labels, "ET").tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="unknown region 'XX'"):
        contract.region_masks(labels, "XX")


def test_check_population():
    assert contract.check_population(" met ") == "MET"
    with pytest.raises(ValueError, match="expected one of GLI, SSA, PED, MEN, MET"):
        contract.check_population("LGG")
