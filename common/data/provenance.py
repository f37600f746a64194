"""The provenance mark of synthetic cases.

Every NIfTI file fedbrats writes for a phantom carries, in its header's ``descrip`` field (80
bytes, kept by nibabel, ITK, FSL and most converters), a text that starts with
:data:`SYNTHETIC_MARK`, the generator and its seed. A site that declares its data real (node
setting ``data-kind = "real"``) refuses cases that carry it, so phantoms never enter a real
site's training by a wrong folder; ``fedbrats verify-data`` shows the mark and the run report
counts the marked cases per site. The mark only says where a file came from: it is not a
security measure (anyone can edit a header).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

SYNTHETIC_MARK = "fedbrats-synthetic"
"""How every synthetic file's ``descrip`` starts."""

DATA_KINDS = ("any", "real")
"""Values of the site setting ``data-kind``: ``any`` (the default) takes every case and counts
the synthetic ones; ``real`` refuses a site folder with any synthetic case."""

_DESCRIP_BYTES = 80


def synthetic_description(what: str) -> bytes:
    """The ``descrip`` value for a synthetic file: the mark, then ``what`` (say the generator
    and its seed), cut to the field's 80 bytes."""
    text = f"{SYNTHETIC_MARK} {what}".strip()
    return text.encode("ascii", "replace")[:_DESCRIP_BYTES]


def mark_synthetic(image: Any, what: str) -> None:
    """Mark a ``nibabel.Nifti1Image`` (before it is saved) as synthetic."""
    image.header["descrip"] = synthetic_description(what)


def header_mark(header: Any) -> str | None:
    """The synthetic mark of a NIfTI header (its ``descrip``), or None for an unmarked file."""
    try:
        raw = header["descrip"]
    except (KeyError, TypeError, ValueError):
        return None
    raw = raw.item() if hasattr(raw, "item") else raw
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    text = text.rstrip("\x00 ").strip()
    return text if text.startswith(SYNTHETIC_MARK) else None


def check_data_kind(value: str, where: str) -> str:
    """``value`` if it is one of :data:`DATA_KINDS`; ``ValueError`` naming ``where`` if not."""
    if value not in DATA_KINDS:
        raise ValueError(f"{where}: data-kind {value!r} is not one of {', '.join(DATA_KINDS)}")
    return value


def synthetic_refusal(population: str, data_dir: Any, marked: Sequence[tuple[str, str]]) -> str:
    """The error of a site that declared ``data-kind = "real"`` and found ``marked``
    ``(case id, its mark)`` cases."""
    shown = "; ".join(f"{cid} ({mark})" for cid, mark in marked[:10])
    more = f"; and {len(marked) - 10} more" if len(marked) > 10 else ""
    return (f"site {population}: data-kind is 'real', but {len(marked)} case(s) in {data_dir} "
            f"carry the synthetic-data mark ({SYNTHETIC_MARK!r} in the NIfTI header's descrip) "
            f"of fedbrats' phantoms: {shown}{more}. Remove them from the site folder, or set "
            "data-kind = 'any' to train on them knowingly")


def marked_cases(reports: Iterable[Any]) -> list[tuple[str, str]]:
    """``(case id, mark)`` of every report (a ``CaseReport``) whose case carries the mark."""
    return [(r.case_id, r.synthetic) for r in reports if getattr(r, "synthetic", None)]
