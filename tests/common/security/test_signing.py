"""Signed students: Ed25519 key pair, detached file signatures, signed arrays, and the sites'
refusal of an unsigned or changed student."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedbrats.common.security.signing import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    SIGNATURE_CONFIG_KEY,
    SignatureError,
    arrays_digest,
    generate_keypair,
    load_private_key,
    sig_path,
    sign_arrays,
    sign_file,
    verify_arrays,
    verify_file,
)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are made outside a Flower process here: give them a run, node and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return generate_keypair(root / "a"), generate_keypair(root / "b")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, generator=g),
            "conv.bias": torch.randn(4, generator=g),
            "steps": torch.tensor(7, dtype=torch.int64)}


def test_key_files_are_created_0600_and_never_overwritten(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert private.name == PRIVATE_KEY_NAME and public.name == PUBLIC_KEY_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    with pytest.raises(FileExistsError, match=PRIVATE_KEY_NAME):
        generate_keypair(tmp_path / "k")
    assert private.read_bytes() == before
    os.chmod(private, 0o644)  # an old, too wide mode is not kept by --force
    generate_keypair(tmp_path / "k", force=True)
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_file_round_trip(tmp_path, keys):
    (private, public), _ = keys
    f = tmp_path / "student.pt"
    torch.save({"state_dict": _state()}, f)
    sig = sign_file(f, private)
    assert sig == sig_path(f) == tmp_path / "student.pt.sig"
    verify_file(f, public)
    verify_file(f, load_private_key(private).public_key())  # key objects work too


def test_flipped_byte_is_refused(tmp_path, keys):
    (private, public), _ = keys
    f = tmp_path / "student.pt"
    torch.save({"state_dict": _state()}, f)
    sign_file(f, private)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=r"student\.pt: signature does not match"):
        verify_file(f, public)


def test_wrong_key_is_refused(tmp_path, keys):
    (private, _), (_, other_public) = keys
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"weights")
    sign_file(f, private)
    with pytest.raises(SignatureError, match="another key"):
        verify_file(f, other_public)


def test_missing_and_malformed_signatures_are_refused(tmp_path, keys):
    (private, public), _ = keys
    f = tmp_path / "student.pt"
    f.write_bytes(b"weights")
    with pytest.raises(SignatureError, match=r"student\.pt: no signature \(student\.pt\.sig"):
        verify_file(f, public)
    sig_path(f).write_text("garbage\n")
    with pytest.raises(SignatureError, match="malformed"):
        verify_file(f, public)
    sig_path(f).write_text("fedbrats-signature/1 ed25519-sha256 AAAA\n")
    with pytest.raises(SignatureError, match="64-byte"):
        verify_file(f, public)
    sign_file(f, private)
    with pytest.raises(SignatureError, match="this is a private key: give the .pub file"):
        verify_file(f, private)  # the private key given where the public one belongs


def test_array_signature_round_trip_across_containers(keys):
    (private, public), _ = keys
    state = _state()
    sig = sign_arrays(state, private)
    assert len(sig) == 64
    # what the site receives: a Flower ArrayRecord, or numpy arrays, in another key order
    verify_arrays(ArrayRecord(state), sig, public)
    verify_arrays({k: state[k].numpy() for k in reversed(list(state))}, sig, public)
    assert arrays_digest(state) == arrays_digest(ArrayRecord(state))


@pytest.mark.parametrize("tamper", ["value", "dtype", "shape", "rename", "extra", "missing"])
def test_array_signature_detects_tampering(keys, tamper):
    (private, public), _ = keys
    state = _state()
    sig = sign_arrays(state, private)
    bad = {k: v.clone() for k, v in state.items()}
    if tamper == "value":
        bad["conv.weight"][0, 0, 0] += 1e-6
    elif tamper == "dtype":
        bad["conv.bias"] = bad["conv.bias"].double()
    elif tamper == "shape":
        bad["conv.weight"] = bad["conv.weight"].reshape(4, 9)
    elif tamper == "rename":
        bad["conv.b"] = bad.pop("conv.bias")
    elif tamper == "extra":
        bad["more"] = torch.zeros(1)
    else:
        del bad["steps"]
    with pytest.raises(SignatureError, match="does not match"):
        verify_arrays(bad, sig, public)


def test_array_signature_missing_malformed_or_other_key(keys):
    (private, public), (other_private, _) = keys
    state = _state()
    with pytest.raises(SignatureError, match="no signature"):
        verify_arrays(state, None, public)
    with pytest.raises(SignatureError, match="malformed"):
        verify_arrays(state, b"short", public)
    with pytest.raises(SignatureError, match="another key"):
        verify_arrays(state, sign_arrays(state, other_private), public)


# -- a site that requires signed students ------------------------------------------------------


def _instruction(state, message_type: str, signature: bytes | None) -> Message:
    config = ConfigRecord({"server-round": 1})
    if signature is not None:
        config[SIGNATURE_CONFIG_KEY] = signature
    return Message(RecordDict({"arrays": ArrayRecord(dict(state)), "config": config}),
                   dst_node_id=7, message_type=message_type)


def _site_context(tmp_path, public) -> Context:
    node_config = {"population": "MEN", "data-dir": str(tmp_path / "data"),
                   "work-dir": str(tmp_path / "work"), "consortium-public-key": str(public)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"preset": "tiny"})


@pytest.mark.parametrize("message_type", ["train", "evaluate", "evaluate.final"])
def test_site_refuses_a_tampered_or_unsigned_student(tmp_path, keys, message_type):
    from fedbrats.client.app import app

    (private, public), (other_private, _) = keys
    state = _state()
    ctx = _site_context(tmp_path, public)
    for signature, why in ((None, "no signature"),
                           (sign_arrays(state, other_private), "another key")):
        reply = app(_instruction(state, message_type, signature), ctx)
        assert reply.has_error()
        assert "site MEN: student signature check failed" in reply.error.reason
        assert why in reply.error.reason
    tampered = {k: v.clone() for k, v in state.items()}
    tampered["conv.bias"][0] = 1e3
    reply = app(_instruction(tampered, message_type, sign_arrays(state, private)), ctx)
    assert reply.has_error() and "does not match" in reply.error.reason


def test_site_trains_a_correctly_signed_student(tmp_path, keys, monkeypatch):
    import fedbrats.client.distill
    from fedbrats.client.app import app

    (private, public), _ = keys
    state = _state()
    seen = {}

    def fake_round(site, run, student, server_round, proximal_mu=0.0):
        seen["student"] = student
        return {k: v + 1 if v.is_floating_point() else v for k, v in student.items()}, {"loss": 0.5}

    monkeypatch.setattr(fedbrats.client.distill, "distill_round", fake_round)
    reply = app(_instruction(state, "train", sign_arrays(state, private)),
                _site_context(tmp_path, public))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert torch.equal(seen["student"]["conv.weight"], state["conv.weight"])
    np.testing.assert_allclose(reply.content["arrays"]["conv.bias"].numpy(),
                               state["conv.bias"].numpy() + 1)


def test_site_without_public_key_takes_unsigned_students(tmp_path, monkeypatch):
    import fedbrats.client.distill
    from fedbrats.client.app import app

    monkeypatch.setattr(fedbrats.client.distill, "distill_round",
                        lambda site, run, student, r, proximal_mu=0.0: (student, {"loss": 0.1}))
    ctx = _site_context(tmp_path, "x")
    del ctx.node_config["consortium-public-key"]
    reply = app(_instruction(_state(), "train", None), ctx)
    assert not reply.has_error()


# -- fedbrats keys -------------------------------------------------------------------------------


def test_keys_command(tmp_path, capsys):
    from fedbrats.common.cli import main

    assert main(["keys", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "consortium.key" in out and "SHA256:" in out
    assert stat.S_IMODE((tmp_path / "k" / PRIVATE_KEY_NAME).stat().st_mode) == 0o600
    assert main(["keys", "--out", str(tmp_path / "k")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "--out", str(tmp_path / "k"), "--force"]) == 0


# -- fedbrats predict --public-key -------------------------------------------------------------


def test_predict_refuses_an_unsigned_or_changed_student(tmp_path, keys, capsys):
    from fedbrats.common.cli import main
    from fedbrats.common.config import load_run_config
    from fedbrats.common.inference.modelfile import student_payload

    (private, public), _ = keys
    model = tmp_path / "student.pt"
    torch.save(student_payload(load_run_config({"preset": "tiny"}), _state(), 2), model)
    (tmp_path / "cases").mkdir()
    argv = ["predict", "--model", str(model), "--input", str(tmp_path / "cases"),
            "--out", str(tmp_path / "out"), "--public-key", str(public), "--no-progress"]

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing the model" in err and "no signature (student.pt.sig not found" in err

    sign_file(model, private)
    main(argv)  # verified; then it goes on to the (empty) input
    assert "signature verified" in capsys.readouterr().out

    with model.open("r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(argv) == 2
    assert "signature does not match" in capsys.readouterr().err


def test_a_signed_run_refuses_to_resume_from_a_changed_checkpoint(tmp_path, keys):
    """A checkpoint changed after it was signed (still a loadable file) is not resumed from;
    the error names it and says how to resume from the round before, which then works."""
    import shutil

    from fedbrats.common.config import load_run_config
    from fedbrats.server.app import _resume_point
    from fedbrats.server.protocol import initial_student_arrays
    from fedbrats.server.state import RunFolder

    (private, _), _ = keys
    signer = load_private_key(private)
    run = load_run_config({"preset": "tiny", "output-dir": str(tmp_path / "run")})
    folder = RunFolder(run)
    student = initial_student_arrays(run)
    for rnd in (1, 2):
        sign_file(folder.save_checkpoint(rnd, student), signer)
    folder.write_json("rounds.json", [{"round": 1}, {"round": 2}])
    assert _resume_point(run, folder, signer)[0] == 2

    path = folder.path / "checkpoints" / "round-002.pt"
    saved = torch.load(path, weights_only=True)
    name = next(k for k, v in saved["state_dict"].items() if v.is_floating_point())
    saved["state_dict"][name] += 0.01
    torch.save(saved, path)
    with pytest.raises(SignatureError, match=r"round-002\.pt: signature does not match.*"
                                             r"resume after round 1 instead, move round-002"):
        _resume_point(run, folder, signer)

    aside = tmp_path / "aside"
    aside.mkdir()
    for p in (path, sig_path(path)):
        shutil.move(p, aside / p.name)
    done, rounds, arrays, _ = _resume_point(run, folder, signer)
    assert (done, [r["round"] for r in rounds]) == (1, [1])
