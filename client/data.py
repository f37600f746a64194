"""A site's data: its cases, the train/validation split, the cached MONAI datasets, the facts it
may tell the server, and the seeded batch streams that training draws from."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from monai.data import DataLoader

from fedbrats.common.config import RunConfig, SiteConfig
from fedbrats.common.data.cases import Case, check_site, discover_cases
from fedbrats.common.data.contract import CONTRASTS
from fedbrats.common.data.provenance import header_mark, marked_cases, synthetic_refusal
from fedbrats.common.data.transforms import build_dataset, kept_cases, training_dataset
from fedbrats.common.utils.devices import resolve_device

log = logging.getLogger(__name__)


class SiteError(RuntimeError):
    """The site cannot take part: no usable data, or a stored file that does not fit."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by a hash of (seed, case id): stable when cases are
    added, and the same on every run. At least one case on each side when there are two or more."""

    def key(c: Case) -> str:
        return hashlib.sha256(f"{seed}:{c.case_id}".encode()).hexdigest()

    ordered = sorted(cases, key=key)
    if len(ordered) < 2:
        raise SiteError(
            f"a site needs at least 2 usable cases (one to train, one to validate), found "
            f"{len(ordered)}"
        )
    n_val = min(max(1, round(len(ordered) * val_fraction)), len(ordered) - 1)
    val = sorted(ordered[:n_val], key=lambda c: c.case_id)
    train = sorted(ordered[n_val:], key=lambda c: c.case_id)
    return train, val


@dataclass
class SiteData:
    """A site's split and datasets. ``kept_train``: the preprocessed training cases kept on disk
    (no augmentation); ``train_ds`` (training crops, held in memory) is built on first use, so
    that a round that trains from the teacher's kept outputs does not hold the cases twice."""

    train_cases: list[Case]
    val_cases: list[Case]
    kept_train: object
    val_ds: object
    patch_size: int

    @functools.cached_property
    def train_ds(self):
        return training_dataset(self.kept_train, (self.patch_size,) * 3)


_DATA_CACHE: dict[tuple, SiteData] = {}


def clear_site_data_cache() -> None:
    """Forget the datasets built so far (a benchmark's next seed splits the cases anew)."""
    _DATA_CACHE.clear()


def site_cases(site: SiteConfig) -> list[Case]:
    """The site's cases that have a segmentation (the ones it can train and validate on)."""
    cases = discover_cases(site.data_dir, site.manifest)
    if site.data_kind == "real":  # headers only: cheap enough for every process
        refuse_synthetic(site, [(c.case_id, m) for c in cases if (m := case_mark(c))])
    return [c for c in cases if c.seg is not None]


def case_mark(case: Case) -> str | None:
    """The synthetic-data mark of the first of the case's files that carries one (the headers
    only are read)."""
    import nibabel as nib

    for _, path in case.files():
        try:
            mark = header_mark(nib.load(str(path)).header)
        except Exception:  # an unreadable file is the data checks' to report
            continue
        if mark:
            return mark
    return None


def refuse_synthetic(site: SiteConfig, marked: list[tuple[str, str]]) -> None:
    """:class:`SiteError` naming the marked cases of a site that declared its data real."""
    if marked:
        raise SiteError(synthetic_refusal(site.population, site.data_dir, marked))


CASE_CACHE = "case-cache"
"""Folder in the site's work folder where its preprocessed cases are kept between processes."""


def load_site_data(site: SiteConfig, run: RunConfig) -> SiteData:
    """The site's train and validation datasets: built once per process and site, from the
    preprocessed cases kept in ``work-dir/case-cache`` (preprocessed there on first use, again
    for a changed file or setting), so that a new process (in deployment, every message) does
    not read and resample every case again."""
    key = (str(site.data_dir.resolve()), str(site.manifest), site.labels, run.spacing,
           run.patch_size, run.val_fraction, run.seed)
    if key not in _DATA_CACHE:
        train, val = split_cases(site_cases(site), run.val_fraction, run.seed)
        spacing = (run.spacing,) * 3
        kept = site.work_dir / CASE_CACHE
        _DATA_CACHE[key] = SiteData(
            train, val, kept_cases(train, spacing, kept, site.labels),
            build_dataset(val, spacing, None, site.labels, cache_dir=kept), run.patch_size,
        )
    return _DATA_CACHE[key]


def site_info(site: SiteConfig, run: RunConfig) -> dict:
    """Facts the server may see: population, case counts, contrasts present, check summary."""
    cases = discover_cases(site.data_dir, site.manifest)
    reports = check_site(cases, site.labels)
    marked = marked_cases(reports)
    if site.data_kind == "real":
        refuse_synthetic(site, marked)
    usable = [c for c, r in zip(cases, reports) if r.ok and c.seg is not None]
    if len(usable) >= 2:
        train, val = split_cases(usable, run.val_fraction, run.seed)
    else:
        train, val = usable, []
    contrasts = {k: sum(k in c.present for c in usable) for k in CONTRASTS}
    problems = [p for r in reports for p in r.problems]
    return {
        "population": site.population,
        "num_cases": len(cases),
        "num_usable": len(usable),
        "num_train": len(train),
        "num_val": len(val),
        "contrasts_present": contrasts,
        "num_unusable": sum(not r.ok for r in reports),
        "num_without_seg": sum(c.seg is None for c in cases),
        "num_synthetic": len(marked),
        "problems": problems[:5],
    }


def training_batches(ds, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of ``ds``; the same ``seed`` gives the same sequence."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                              generator=gen)


def select_device(run: RunConfig) -> torch.device:
    """The device of the run setting ``device`` at this site (:class:`SiteError` if absent)."""
    return resolve_device(run.device, error=SiteError,
                          hint="; run setting device='cuda' needs a GPU at every site")
