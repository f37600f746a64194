import numpy as np
import pytest

from fedbrats.common.data.labels import (
    CONVENTIONS,
    LabelError,
    from_internal,
    suggest_conventions,
    to_internal,
)

# source value -> internal value (0 bg, 1 NETC, 2 SNFH, 3 ET), worked out from each challenge's docs
CASES = [
    ("brats2015", [0, 1, 2, 3, 4], [0, 1, 2, 1, 3]),
    ("brats2021", [0, 1, 2, 4], [0, 1, 2, 3]),
    ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
    ("brats2024-ped", [0, 1, 2, 3, 4], [0, 3, 1, 1, 2]),
    ("brats2024-gli", [0, 1, 2, 3, 4], [0, 1, 2, 3, 0]),
]


@pytest.mark.parametrize("name,src,expected", CASES)
def test_to_internal(name, src, expected):
    out = to_internal(np.array(src, dtype=np.int16), name)
    assert out.dtype == np.uint8
    assert out.tolist() == expected


def test_every_convention_is_tested():
    assert {c[0] for c in CASES} == set(CONVENTIONS)


def test_float_labels_that_are_integers_are_accepted():
    assert to_internal(np.array([0.0, 4.0]), "brats2021").tolist() == [0, 3]


def test_non_integer_labels_are_an_error():
    with pytest.raises(LabelError, match="non-integer"):
        to_internal(np.array([0.0, 0.5]), "brats2023", source="x.nii.gz")


def test_unknown_label_names_file_values_and_fix():
    seg = np.array([0, 1, 2, 4], dtype=np.uint8)
    with pytest.raises(LabelError) as e:
        to_internal(seg, "brats2023", source="case A, seg file a-seg.nii.gz")
    msg = str(e.value)
    assert "a-seg.nii.gz" in msg
    assert "[4]" in msg and "{0, 1, 2, 4}" in msg
    assert "--labels brats2021" in msg


def test_value_outside_every_convention():
    with pytest.raises(LabelError, match=r"label values \[7\]"):
        to_internal(np.array([0, 7]), "brats2021")


def test_unknown_convention_suggests():
    with pytest.raises(ValueError, match="did you mean 'brats2021'"):
        to_internal(np.array([0]), "brats-2021")


def test_suggest_conventions_prefers_the_tightest_fit():
    assert suggest_conventions({0, 1, 2, 4})[0] == "brats2021"
    assert suggest_conventions({0, 1, 2, 3})[0] == "brats2023"


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_round_trip_of_internal_labels(name):
    internal = np.array([0, 1, 2, 3], dtype=np.uint8)
    exported = from_internal(internal, name)
    back = to_internal(exported, name)
    # every internal label survives export and re-import in every convention
    assert back.tolist() == [0, 1, 2, 3]


def test_from_internal_rejects_out_of_range():
    with pytest.raises(LabelError, match="0-3"):
        from_internal(np.array([0, 4]), "brats2023")
