"""The virtual sites of ``fedbrats simulate``: the phantom set, or each site's own data.

``--site POP=PATH[,labels=CONV][,manifest=CSV]`` (repeatable) or ``--sites-file FILE.toml``::

    [[site]]
    population = "GLI"
    data-dir = "/data/brats2021"     # a folder of cases (any layout verify-data reads)
    labels = "brats2021"             # optional: the seg files' label convention
    [[site]]
    population = "MEN"
    data-dir = "/data/men"
    manifest = "/data/men/cases.csv" # optional: a manifest instead of the folder's names

Both give the run setting ``sim-sites`` (:func:`~fedbrats.common.config.simulation_sites`), in
which simulation partition ``i`` is the ``i``-th site. :func:`check_sites_data` runs the data
contract's checks on every site before any process starts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SITE_ARG = "POP=PATH[,labels=CONV][,manifest=CSV][,data-kind=real]"


def parse_site_arg(text: str) -> dict[str, str]:
    """One ``--site`` value: ``GLI=/data/gli,labels=brats2021,manifest=/data/gli/cases.csv``."""
    from fedbrats.common.config import ConfigError

    head, *options = [part.strip() for part in text.split(",")]
    pop, sep, path = head.partition("=")
    if not sep or not pop.strip() or not path.strip():
        raise ConfigError(f"--site {text!r}: expected {SITE_ARG}")
    site = {"population": pop.strip(), "data-dir": path.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in ("labels", "manifest", "data-kind") or not value.strip():
            raise ConfigError(f"--site {text!r}: unknown or empty option {option!r}; expected "
                              f"{SITE_ARG}")
        site[key] = value.strip()
    return site


def read_sites_file(path: str | Path) -> list[dict[str, str]]:
    """The ``[[site]]`` tables of a TOML sites file (paths relative to the file's folder)."""
    import tomllib

    from fedbrats.common.config import ConfigError

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--sites-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--sites-file {path}: not a readable TOML file ({e})") from None
    sites = raw.get("site")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, dict) for s in sites):
        raise ConfigError(f"--sites-file {path}: expected one [[site]] table per site "
                          "(population, data-dir; optional labels, manifest, data-kind)")
    out = []
    for site in sites:
        entry = {str(k): str(v) for k, v in site.items()}
        for key in ("data-dir", "manifest"):
            if entry.get(key) and not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
        out.append(entry)
    return out


def sim_sites_setting(sites: Sequence[dict[str, str]]) -> str:
    """The ``sim-sites`` run setting of ``sites`` (paths made absolute: Ray's workers run
    elsewhere); checked by :func:`~fedbrats.common.config.simulation_sites`."""
    from fedbrats.common.config import simulation_sites

    resolved = []
    for site in sites:
        entry = dict(site)
        for key in ("data-dir", "manifest"):
            if entry.get(key):
                entry[key] = str(Path(entry[key]).expanduser().resolve())
        resolved.append(entry)
    text = json.dumps(resolved)
    simulation_sites(text)
    return text


def check_sites_data(sites: Sequence[dict[str, str]]) -> list[str]:
    """``sites`` as :func:`~fedbrats.common.config.simulation_sites` returns them: every site's
    folder (or manifest) and every case in it checked against the data contract
    (``fedbrats verify-data``'s checks); returns one message per site with a problem (the
    folder, or each unusable case with its file, what was expected and what was found), empty
    when all are usable. Cases without a segmentation are counted, not refused; a site needs
    at least two with one."""
    from fedbrats.common.data.cases import DataError, check_site, discover_cases
    from fedbrats.common.data.provenance import marked_cases, synthetic_refusal

    problems = []
    for site in sites:
        pop, folder = site["population"], Path(site["data-dir"])
        manifest = site.get("manifest") or None
        where = f"site {pop} ({manifest or folder})"
        if manifest is None and not folder.is_dir():
            problems.append(f"{where}: no such folder")
            continue
        try:
            cases = discover_cases(folder, manifest)
        except DataError as e:
            problems.append(f"{where}: {e}")
            continue
        reports = check_site(cases, site["labels"])
        marked = marked_cases(reports)
        if marked and site.get("data-kind") == "real":
            problems.append(f"{where}: " + synthetic_refusal(pop, folder, marked))
            continue
        bad = [r for r in reports if not r.ok]
        if bad:
            lines = [p for r in bad for p in r.problems]
            problems.append(f"{where}: {len(bad)} of {len(reports)} cases unusable "
                            f"(`fedbrats verify-data` shows them all):\n  - "
                            + "\n  - ".join(lines))
            continue
        labelled = sum(c.seg is not None for c in cases)
        if labelled < 2:
            problems.append(f"{where}: {labelled} case(s) with a segmentation; a site needs at "
                            "least 2 (one to train on, one to validate on)")
    return problems


__all__ = ["check_sites_data", "parse_site_arg", "read_sites_file", "sim_sites_setting"]
