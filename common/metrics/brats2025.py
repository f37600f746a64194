"""The official BraTS 2025 scorer (``brats-evaluation``, on ``panoptica``) beside fedbrats' own.

The official package cannot be installed into fedbrats' environment: panoptica requires
``rich<14`` and ``numpy<2.3``, Flower (1.41 and 1.42) ``rich>=14``, and pip refuses the pair. It
therefore runs in an environment of its own (``make brats2025`` creates ``.venv-brats2025`` with
:data:`SCORER_REQUIREMENT`), and fedbrats talks to it through files: for every case that passed
fedbrats' own checks, both label maps are written on the ground truth's grid (same affine and
header) in the label values the official configuration expects, and
:mod:`~fedbrats.common.metrics.brats2025_runner` scores them with the package's own functions
in one process.

Which Python runs it (:func:`find_scorer_python`): ``--scorer-python``, else the environment
variable ``FEDBRATS_BRATS2025_PYTHON``, else ``.venv-brats2025/bin/python`` beside this checkout,
else this Python if it can import the package.

Reported per case and region (WT, TC, ET), as the official ``parse_seg_results`` gives them:
global Dice, NSD and HD95 (an infinite HD95 becomes the official 373 mm), the lesion-wise means
of Dice, NSD and HD95 over the matched lesions, and the instance counts TP, FN, FP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

__all__ = [
    "BRATS2025_METRICS",
    "OFFICIAL_CONFIG",
    "SCORER_REQUIREMENT",
    "ScorerUnavailable",
    "find_scorer_python",
    "OfficialJob",
    "install_scorer",
]

SCORER_REQUIREMENT: Final = "brats-evaluation==0.0.10"
"""The official scorer's release that fedbrats is tested with (it brings panoptica 2.1)."""

SCORER_ENV_VAR: Final = "FEDBRATS_BRATS2025_PYTHON"
DEFAULT_SCORER_VENV: Final = ".venv-brats2025"

OFFICIAL_CONFIG: Final[dict[str, str]] = {
    "GLI": "gli",
    "SSA": "gli",
    "PED": "ped",
    "MEN": "MenPre",
    "MET": "mets",
}
"""The package's bundled configuration per sub-challenge. Their WT, TC and ET groups are the
same regions; only PED's label values differ (BraTS 2024 PED: 1 ET, 2 NETC, 4 oedema)."""

BRATS2025_METRICS: Final[dict[str, str]] = {
    "brats2025_dice": "global_dsc",
    "brats2025_nsd": "global_nsd",
    "brats2025_hd95": "global_hd95",
    "brats2025_lesion_dice": "lesionwise_dsc_mean",
    "brats2025_lesion_nsd": "lesionwise_nsd_mean",
    "brats2025_lesion_hd95": "lesionwise_hd95_mean",
    "brats2025_tp": "all_instance_tp",
    "brats2025_fn": "all_instance_fn",
    "brats2025_fp": "all_instance_fp",
}
"""fedbrats' column -> the official parser's column (suffixed ``_wt``, ``_tc``, ``_et``)."""

_RUNNER: Final = Path(__file__).with_name("brats2025_runner.py")
_CHECKOUT: Final = Path(__file__).resolve().parents[1]


class ScorerUnavailable(RuntimeError):
    """The official scorer's environment is missing or broken; the message says how to make it."""


def _how_to_install() -> str:
    return (
        f"the official BraTS 2025 scorer ({SCORER_REQUIREMENT}) runs in an environment of its "
        "own (its panoptica needs rich<14 and numpy<2.3, Flower needs rich>=14): create it with "
        f"`make brats2025` (or `python -m fedbrats.common.metrics.brats2025 DIR`) and pass "
        f"--scorer-python DIR/bin/python or set {SCORER_ENV_VAR}"
    )


def _can_import(python: Path) -> str | None:
    """None when ``python`` imports the official package, else what went wrong."""
    try:
        done = subprocess.run(
            [str(python), "-c", "import brats_evaluation, panoptica"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    except OSError as e:
        return f"{python} cannot be run ({e.strerror})"
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"{python} cannot import brats_evaluation and panoptica ({last})"
    return None


def find_scorer_python(explicit: str | Path | None = None) -> Path:
    """The Python of the official scorer's environment (see the module docstring).

    Raises :class:`ScorerUnavailable` naming what was tried and how to install it.
    """
    if explicit or os.environ.get(SCORER_ENV_VAR):
        python = Path(explicit or os.environ[SCORER_ENV_VAR])
        source = "--scorer-python" if explicit else SCORER_ENV_VAR
        if not python.exists():
            raise ScorerUnavailable(f"{source} {python} not found; {_how_to_install()}")
        if problem := _can_import(python):
            raise ScorerUnavailable(f"{source}: {problem}; {_how_to_install()}")
        return python
    beside = _CHECKOUT / DEFAULT_SCORER_VENV / "bin" / "python"
    if beside.exists() and _can_import(beside) is None:
        return beside
    if _can_import(Path(sys.executable)) is None:
        return Path(sys.executable)
    raise ScorerUnavailable(
        f"no environment with the official BraTS 2025 scorer was found ({SCORER_ENV_VAR} is "
        f"not set, {beside} does not exist or cannot import it, and this Python cannot); "
        + _how_to_install()
    )


def install_scorer(venv: str | Path) -> Path:
    """Create a virtual environment at ``venv`` with :data:`SCORER_REQUIREMENT`; its Python."""
    venv = Path(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", SCORER_REQUIREMENT], check=True
    )
    return python


def _official_labels(label_map: Any, challenge: str) -> Any:
    """An internal (BraTS 2023) label map in the values of the challenge's configuration."""
    import numpy as np

    from fedbrats.common.data.labels import CONVENTIONS

    out = np.asarray(label_map).astype(np.uint8)
    if OFFICIAL_CONFIG[challenge] == "ped":
        table = np.zeros(256, dtype=np.uint8)
        for internal, value in CONVENTIONS["brats2024-ped"].from_internal.items():
            table[internal] = value
        out = table[out]
    return out


class OfficialJob:
    """The label maps of the cases to score, written as they come (nothing held in memory)."""

    def __init__(self, challenge: str, folder: Path):
        self.challenge = challenge
        self.folder = folder
        self.pairs: list[dict[str, str]] = []

    def add(self, case_id: str, pred: Any, gt: Any, affine: Any) -> None:
        import nibabel as nib

        paths = {}
        for side, data in (("pred", pred), ("ref", gt)):
            img = nib.Nifti1Image(_official_labels(data, self.challenge), affine)
            img.set_data_dtype("uint8")
            path = self.folder / f"{len(self.pairs):05d}-{side}.nii.gz"
            nib.save(img, str(path))
            paths[side] = str(path)
        self.pairs.append({"case_id": case_id, **paths})

    def run(self, python: Path) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str],
                                         dict[str, str]]:
        """Score every pair: ``({case_id: {region: {metric: value}}}, errors, versions)``."""
        from fedbrats.common.data.contract import REGIONS

        if not self.pairs:
            return {}, {}, {}
        job, out = self.folder / "job.json", self.folder / "out.json"
        job.write_text(json.dumps({"config": OFFICIAL_CONFIG[self.challenge],
                                   "pairs": self.pairs}))
        done = subprocess.run([str(python), str(_RUNNER), str(job), str(out)],
                              capture_output=True, text=True)
        if done.returncode or not out.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise ScorerUnavailable(
                f"the official BraTS 2025 scorer ({python}) failed with exit code "
                f"{done.returncode}:\n{tail}"
            )
        answer = json.loads(out.read_text())
        scores: dict[str, dict[str, dict[str, float]]] = {}
        for case_id, row in answer["rows"].items():
            scores[case_id] = {
                region: {ours: float(row.get(f"{theirs}_{region.lower()}", float("nan")))
                         for ours, theirs in BRATS2025_METRICS.items()}
                for region in REGIONS
            }
        return scores, answer["errors"], answer["versions"]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(f"usage: python -m fedbrats.common.metrics.brats2025 VENV_DIR\n"
              f"creates VENV_DIR with {SCORER_REQUIREMENT}")
        sys.exit(2)
    print(f"scorer Python: {install_scorer(sys.argv[1])}")
