"""Privacy options end to end through Flower's simulation engine (slow: FEDBRATS_SLOW=1).

3 sites, tiny preset, 2 rounds, signing key, differential privacy, and either plain rounds or
SecAgg+ rounds. Checks what only the real engine shows: the mods on the train handler, SecAgg+'s
four message exchanges per round between the real SuperLink and the virtual sites, the signed
files, and epsilon in the report."""

from __future__ import annotations

import json
import math

import pytest

from fedbrats.simulation.phantoms import write_dataset
from fedbrats.simulation.runner import run_simulation

SITES = ("GLI", "SSA", "PED")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy-e2e")
    write_dataset(root / "data", {p: 3 for p in SITES}, shape=(48, 48, 48), seed=1,
                  progress=False)
    return root


@pytest.mark.parametrize(("secure", "dtype"), [(False, "float32"), (True, "float32"),
                                             (False, "float16")],
                         ids=["plain", "secagg", "plain-float16"])
def test_signed_private_run(data, secure, dtype):
    import torch

    from fedbrats.common.security.signing import generate_keypair, verify_file

    out = data / f"{'secagg' if secure else 'plain'}-{dtype}"
    private, public = generate_keypair(out / "keys")
    result = run_simulation(out / "run", data / "data", num_sites=3, preset="tiny",
                            overrides={"signing-key": str(private), "dp-noise-multiplier": 0.5,
                                       "dp-clipping-norm": 5.0, "transfer-dtype": dtype,
                                       "secure-aggregation": "true" if secure else "false"},
                            stream=False)
    assert result.returncode == 0, (out / "run" / "flwr-run.log").read_text()[-3000:]
    run_dir = result.output_dir
    verify_file(run_dir / "student.pt", public)
    for ckpt in ("round-001.pt", "round-002.pt"):
        verify_file(run_dir / "checkpoints" / ckpt, public)
    report = json.loads((run_dir / "report.json").read_text())
    privacy = report["privacy"]
    assert privacy["rounds"] == 2 and privacy["noise_std"] == pytest.approx(0.5 * 5.0 / 3)
    assert privacy["epsilon"] == pytest.approx(4.0 + 2 * math.sqrt(4.0 * math.log(1e5)))
    assert "## Differential privacy" in (run_dir / "report.md").read_text()
    audit = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    rounds = [e for e in audit if e["phase"] == "round"]
    assert len(rounds) == 6 and not any("error" in e or "rejected" in e for e in rounds)
    if secure:  # the server never held a site's update
        assert all(e["secure_aggregation"] and e["arrays"] == {} for e in rounds)
    else:
        assert all(e["arrays"] for e in rounds)
    assert set(report["sites"]) == set(SITES)
    # the server keeps float32 whatever travels; in float16 the updates are half the bytes
    state = torch.load(run_dir / "checkpoints" / "round-002.pt", weights_only=True)["state_dict"]
    float32_bytes = sum(v.numel() * 4 for v in state.values())
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    if not secure:
        ratio = max(e["bytes"] for e in rounds) / float32_bytes
        assert (0.5 <= ratio < 0.7) if dtype == "float16" else (1.0 <= ratio < 1.2)
