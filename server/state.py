"""The server's run folder: checkpoints after every round, resume, the audit log, the final student.

Layout of ``output_dir``::

    config.json              the run settings
    sites.json               each site's facts and teacher metrics (phase 1)
    rounds.json              per-round training and evaluation metrics per site
    audit.jsonl              one line per reply: phase, site, which arrays it carried and their size
    checkpoints/round-NNN.pt the global student after round NNN (+ FedAdam state)
    updates/round-NNN/POP.pt each site's returned student (only with keep-site-updates)
    student.pt               the final student, usable by itself for inference
    report.json, report.md, *.png
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedbrats.common.config import RunConfig
from fedbrats.common.inference.modelfile import STUDENT_FORMAT, student_payload  # noqa: F401 (re-exported)
from fedbrats.common.utils.arrays import to_tensors as _to_tensors
from fedbrats.common.utils.files import save_atomic

log = logging.getLogger(__name__)

_ROUND_RE = re.compile(r"round-(\d+)\.pt$")


@dataclass
class Checkpoint:
    round: int
    state_dict: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, torch.Tensor]]


class RunFolder:
    """Everything the server keeps on disk for one run."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.path = Path(run.output_dir)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- settings -------------------------------------------------------------------------
    def check_and_write_config(self) -> None:
        """Write config.json; on a resumed run refuse a student that would not fit the saved one."""
        cfg = self.path / "config.json"
        if cfg.exists() and self.latest_checkpoint() is not None:
            old = json.loads(cfg.read_text())
            for key, absent in (("student_model", None), ("student_heads", "shared")):
                if old.get(key, absent) != getattr(self.run, key):
                    name = key.replace("_", "-")
                    raise RuntimeError(
                        f"{self.path}: this run folder holds checkpoints of a student with "
                        f"{name} {old.get(key, absent)!r}, but the run asks for "
                        f"{getattr(self.run, key)!r}; use another output-dir"
                    )
            changed = sorted(k for k, v in self.run.to_dict().items() if old.get(k) != v)
            if changed:
                log.warning("resuming %s with changed settings: %s", self.path, ", ".join(changed))
        save_atomic(cfg, json.dumps(self.run.to_dict(), indent=2))

    # -- JSON state -----------------------------------------------------------------------
    def read_json(self, name: str, default: Any) -> Any:
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else default

    def write_json(self, name: str, obj: Any) -> None:
        save_atomic(self.path / name, json.dumps(obj, indent=2, default=float))

    def audit(self, **entry: Any) -> None:
        with (self.path / "audit.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, arrays: Mapping[str, Any],
                        strategy_state: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
        path = self.path / "checkpoints" / f"round-{server_round:03d}.pt"
        save_atomic(path, {
            "round": server_round,
            "state_dict": _to_tensors(arrays),
            "strategy_state": {k: _to_tensors(v) for k, v in (strategy_state or {}).items()},
        })
        return path

    def latest_checkpoint(self) -> Checkpoint | None:
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return None
        found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                       if (m := _ROUND_RE.search(p.name)))
        for rnd, path in reversed(found):
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a torn write: fall back to the round before
                log.warning("%s unreadable (%s); trying the round before", path, e)
                continue
            return Checkpoint(rnd, d["state_dict"], d.get("strategy_state", {}))
        return None

    def save_site_update(self, server_round: int, population: str,
                         arrays: Mapping[str, Any]) -> None:
        save_atomic(self.path / "updates" / f"round-{server_round:03d}" / f"{population}.pt",
                     _to_tensors(arrays))

    # -- the final student ----------------------------------------------------------------
    def save_student(self, arrays: Mapping[str, Any], server_round: int,
                     postprocess: Any = None, postprocess_by_population: Any = None) -> Path:
        """The final student with everything inference needs
        (``fedbrats.common.inference.modelfile``), with these post-processing thresholds (the
        defaults when None)."""
        path = self.path / "student.pt"
        save_atomic(path, student_payload(self.run, arrays, server_round, postprocess,
                                          postprocess_by_population))
        return path
