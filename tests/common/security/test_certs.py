"""``fedbrats certs``: the CA chain, SANs, key formats Flower reads, file modes, no overwriting,
and a real TLS SuperLink with node authentication."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedbrats.common.cli import main
from fedbrats.common.security.certs import CertsError, make_consortium, parse_hosts, parse_sites
from fedbrats.simulation.runner import free_port

BIN = Path(sys.executable).parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def consortium(tmp_path):
    return make_consortium(
        tmp_path / "pki", sites="GLI,MET", server_hosts=["fl.example.org", "10.0.0.5"], days=30
    )


def test_layout_and_private_key_modes(consortium):
    out = consortium.out
    expected = {
        "ca.crt",
        "ca.key",
        "server.pem",
        "server.key",
        "sites/GLI/gli.key",
        "sites/GLI/gli.pub",
        "sites/GLI/ca.crt",
        "sites/MET/met.key",
        "sites/MET/met.pub",
        "sites/MET/ca.crt",
    }
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == expected
    for p in consortium.private_paths():
        assert _mode(p) == 0o600, p
    for p in set(consortium.all_paths()) - set(consortium.private_paths()):
        assert not _mode(p) & 0o022, p  # public files: not writable by others
    assert (out / "sites/GLI/ca.crt").read_bytes() == (out / "ca.crt").read_bytes()


def test_private_keys_are_created_0600_not_chmodded(tmp_path, monkeypatch):
    def no_chmod(*args, **kwargs):
        raise AssertionError("a key file must be created with its mode, not chmod-ed")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    files = make_consortium(tmp_path / "pki", sites="GLI")
    assert all(_mode(p) == 0o600 for p in files.private_paths())


def test_chain_verifies_and_names_every_host(consortium):
    ca = _cert(consortium.ca_cert)
    server = _cert(consortium.server_cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    server.verify_directly_issued_by(ca)

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.5",
        "127.0.0.1",
    ]
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days in (30, 31)

    # Full RFC 5280 path validation, as a TLS client does, for each name.
    verifier = PolicyBuilder().store(Store([ca]))
    for name in (
        x509.DNSName("fl.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier.build_server_verifier(name).verify(server, [])
    with pytest.raises(VerificationError):
        verifier.build_server_verifier(x509.DNSName("other.example.org")).verify(server, [])


def test_site_keys_load_with_flowers_own_loaders(consortium):
    from cryptography.hazmat.primitives import serialization
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for site in consortium.sites:
        # flower-supernode --auth-supernode-private-key
        args = argparse.Namespace(
            auth_supernode_private_key=str(site.private_key), auth_supernode_public_key=None
        )
        private, public = _try_setup_client_authentication(args)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        # flwr supernode register KEY.pub
        registered = try_load_public_key(site.public_key)
        assert registered == public_key_to_bytes(public)
        line = site.public_key.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(f" fedbrats-{site.site}\n")
        assert site.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    # The server key is plain PKCS#8 PEM, as uvicorn (Python's ssl) reads it.
    serialization.load_pem_private_key(consortium.server_key.read_bytes(), None)


def test_loopback_names_and_argument_checks():
    assert parse_hosts(None) == ("localhost", "127.0.0.1")
    assert parse_hosts("fl.example.org,[::1]", include_loopback=False) == ("fl.example.org", "::1")
    hosts = parse_hosts(["FL.Example.org", "127.0.0.1"])
    assert hosts == ("fl.example.org", "127.0.0.1", "localhost")
    for bad in ("https://fl.example.org", "fl.example.org:9092", "*.example.org", "a_b.org"):
        with pytest.raises(CertsError, match="neither an IP address nor a DNS name"):
            parse_hosts(bad)
    with pytest.raises(CertsError, match="no server host"):
        parse_hosts(None, include_loopback=False)
    assert parse_sites(None) == ("GLI", "SSA", "PED", "MEN", "MET")
    with pytest.raises(CertsError, match="given twice"):
        parse_sites("GLI,gli")
    with pytest.raises(CertsError, match="not usable as a folder name"):
        parse_sites("../etc")


def test_refuses_to_overwrite_and_writes_nothing(tmp_path):
    out = tmp_path / "pki"
    existing = out / "sites" / "MET" / "met.key"
    existing.parent.mkdir(parents=True)
    existing.write_text("keep me")
    with pytest.raises(CertsError, match=r"met\.key already exists.*--force"):
        make_consortium(out, sites="GLI,MET")
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["met.key"]


def test_force_replaces_everything_with_a_new_ca(consortium):
    old_ca = consortium.ca_cert.read_bytes()
    with pytest.raises(CertsError, match=r"ca\.crt already exists \(and 9 more\)"):
        make_consortium(consortium.out, sites="GLI,MET")
    consortium.server_key.chmod(0o644)  # a wider mode must not survive the replacement
    again = make_consortium(consortium.out, sites="GLI,MET", force=True)
    assert again.ca_cert.read_bytes() != old_ca
    assert all(_mode(p) == 0o600 for p in again.private_paths())
    _cert(again.server_cert).verify_directly_issued_by(_cert(again.ca_cert))
    assert not list(consortium.out.rglob("*.tmp"))


def test_cli(tmp_path, capsys):
    out = tmp_path / "pki"
    args = ["certs", "--out", str(out), "--sites", "GLI,SSA", "--server-host", "fl.example.org"]
    assert main([*args, "--server-host", "10.1.2.3,fl2.example.org", "--days", "10"]) == 0
    text = capsys.readouterr().out
    assert "sites/SSA/ssa.key" in text and "SHA-256 fingerprint of ca.crt" in text
    assert "fl.example.org, 10.1.2.3, fl2.example.org, localhost, 127.0.0.1" in text
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().out
    assert main([*args, "--force", "--no-loopback"]) == 0
    san = _cert(out / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert main([*args, "--force", "--days", "0"]) == 2
    assert "days must be a positive" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A real SuperLink with these files
# --------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def _https_get(port: int, context: ssl.SSLContext, host: str, path: str = "/health") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            return _read_all(tls)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except (ConnectionError, TimeoutError, ssl.SSLError):
        pass
    return b"".join(chunks)


@pytest.mark.skipif(
    not (BIN / "flower-superlink").exists(), reason="flower-superlink not installed"
)
def test_superlink_serves_tls_and_authenticates_registered_sites(tmp_path):
    files = make_consortium(tmp_path / "pki", sites="GLI,MET")
    other = make_consortium(tmp_path / "other", sites="GLI")  # another consortium's CA
    port = free_port()
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "fed"\n\n[superlink.fed]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{files.ca_cert}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc

    def log_of(name: str) -> str:
        return (logs / f"{name}.log").read_text(errors="replace")

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=60
        )

    context = ssl.create_default_context(cafile=str(files.ca_cert))
    try:
        link = start(
            "superlink",
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(files.ca_cert),
            "--ssl-certfile", str(files.server_cert),
            "--ssl-keyfile", str(files.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation", "process",
            "--database", str(flwr_home / "state.db"),
            "--host", "127.0.0.1",
            "--port", str(port),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert link.poll() is None, f"SuperLink exited:\n{log_of('superlink')}"
            try:
                reply = _https_get(port, context, "127.0.0.1")
                if reply:
                    break
            except (ConnectionRefusedError, ConnectionResetError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"SuperLink not up:\n{log_of('superlink')}"
            time.sleep(0.3)

        # TLS against the consortium CA works, for both loopback names.
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert _https_get(port, context, "localhost").startswith(b"HTTP/1.1 200")
        # ... and fails against another CA, or for a name the certificate does not carry.
        wrong_ca = ssl.create_default_context(cafile=str(other.ca_cert))
        with pytest.raises(ssl.SSLCertVerificationError):
            _https_get(port, wrong_ca, "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _https_get(port, context, "fl.example.org")
        # Plain text gets no HTTP answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert not _read_all(raw).startswith(b"HTTP/")

        # Node authentication: register GLI's public key with Flower's own CLI (over TLS, with
        # the CA from config.toml); GLI's SuperNode then connects, MET's (unregistered) cannot.
        gli, met = files.sites
        done = flwr("supernode", "register", str(gli.public_key), "fed")
        assert done.returncode == 0 and "registered successfully" in done.stdout, done
        common = ["--superlink", f"127.0.0.1:{port}", "--root-certificates", str(gli.ca_cert)]
        node_gli = start(
            "supernode-gli",
            str(BIN / "flower-supernode"), *common,
            "--auth-supernode-private-key", str(gli.private_key),
            "--isolation", "process", "--port", str(free_port()),
        )  # fmt: skip
        node_met = start(
            "supernode-met",
            str(BIN / "flower-supernode"), *common,
            "--auth-supernode-private-key", str(met.private_key),
            "--isolation", "process", "--port", str(free_port()), "--max-retries", "1",
        )  # fmt: skip
        deadline = time.monotonic() + 40
        while True:
            assert node_gli.poll() is None, f"GLI SuperNode exited:\n{log_of('supernode-gli')}"
            listed = flwr("supernode", "list", "fed", "--format", "json")
            nodes = json.loads(listed.stdout).get("nodes", []) if listed.returncode == 0 else []
            if any(n.get("status") == "online" for n in nodes):
                break
            assert time.monotonic() < deadline, f"GLI never online:\n{listed.stdout}"
            time.sleep(0.5)
        assert len(nodes) == 1  # only the registered key
        assert node_met.wait(timeout=30) != 0
        assert "Failed to activate SuperNode" in log_of("supernode-met")
    finally:
        for proc in reversed(procs):
            _stop(proc)
