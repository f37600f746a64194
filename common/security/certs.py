"""Consortium certificates and SuperNode keys: ``fedbrats certs``.

One command, with the ``cryptography`` package only, writes everything a deployment needs for TLS
and Flower's node authentication:

=============================  ==========================================  =====================
file                           what it is                                  kept by
=============================  ==========================================  =====================
``ca.crt``                     consortium CA certificate (self-signed,     everyone (public)
                               ``CA:true, pathlen:0``, key usage
                               keyCertSign + cRLSign)
``ca.key``                     the CA's private key (PKCS#8 PEM, 0600)     the coordinator,
                                                                           offline
``server.pem``                 the SuperLink's TLS certificate, signed by  SuperLink host
                               the CA (SANs: every ``--server-host``,
                               extended key usage serverAuth)
``server.key``                 its private key (PKCS#8 PEM, 0600)          SuperLink host only
``sites/<SITE>/<site>.key``    the site's node-authentication private key  that site only
                               (ECDSA P-384, OpenSSH format, 0600)
``sites/<SITE>/<site>.pub``    its public key (OpenSSH one-line format)    registered at the
                                                                           SuperLink
``sites/<SITE>/ca.crt``        a copy of ``ca.crt``                        that site
=============================  ==========================================  =====================

Formats, checked against the flwr 1.41 source:

* ``flower-supernode --auth-supernode-private-key`` reads its file with
  ``cryptography``'s ``load_ssh_private_key`` and requires an ``EllipticCurvePrivateKey``: the
  OpenSSH private-key format (``-----BEGIN OPENSSH PRIVATE KEY-----``), unencrypted. A PEM/PKCS#8
  key is rejected ("Unable to parse the private key file").
* ``flwr supernode register KEY.pub CONNECTION`` reads the public key with ``load_ssh_public_key``
  and requires an EC key on a NIST curve (P-192 ... P-521): the one-line OpenSSH format
  (``ecdsa-sha2-nistp384 AAAA... comment``). P-384 is what Flower itself generates
  (``flwr.supercore.primitives.asymmetric.generate_key_pairs``) and what its docs make with
  ``ssh-keygen -t ecdsa -b 384``.
* ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``
  hands the certificate and key to uvicorn (Python's ``ssl``, PEM) for its single HTTP endpoint.

Loopback names. Unless ``include_loopback`` is False, the server certificate always also names
``localhost`` and ``127.0.0.1``: with the default ``--isolation subprocess`` the SuperLink starts
its own ``flower-superexec``, which connects back to the SuperLink's ``--host:--port`` (a bind-all
``0.0.0.0`` becomes ``127.0.0.1``) over TLS, checking the certificate against ``ca.crt``; without
those names every ServerApp run would fail to start. Loopback names give nothing away: only a
process on the SuperLink's own host can reach them.

Private keys are created with ``os.open(..., 0o600)`` (never chmod-ed afterwards) and no file is
ever replaced unless ``force`` is set; with it, each file is written to a temporary file in the
same folder and renamed over the old one, so a replaced private key never keeps an old, wider mode.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fedbrats.common.data.contract import POPULATIONS
from fedbrats.common.utils.files import write_exclusive

if TYPE_CHECKING:  # cryptography is imported where it is used: `fedbrats --help` stays fast
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CURVE",
    "DEFAULT_DAYS",
    "DEFAULT_SITES",
    "LOOPBACK_HOSTS",
    "CertsError",
    "ConsortiumFiles",
    "SiteFiles",
    "consortium_paths",
    "fingerprint",
    "make_ca",
    "make_consortium",
    "make_server_certificate",
    "make_site_key",
    "parse_hosts",
    "parse_sites",
]

CURVE: Final[str] = "secp384r1"
"""Curve of every key written (CA, server and site keys): NIST P-384."""

DEFAULT_DAYS: Final[int] = 365
"""Validity of the certificates, in days."""

DEFAULT_SITES: Final[tuple[str, ...]] = POPULATIONS

LOOPBACK_HOSTS: Final[tuple[str, ...]] = ("localhost", "127.0.0.1")
"""Always in the server certificate unless ``include_loopback=False`` (see the module docstring)."""

PRIVATE_MODE: Final[int] = 0o600
PUBLIC_MODE: Final[int] = 0o644

_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class CertsError(ValueError):
    """Bad arguments, or a file that exists and would be overwritten."""


@dataclass(frozen=True)
class SiteFiles:
    """One site's files (see the module docstring)."""

    site: str
    private_key: Path
    public_key: Path
    ca_cert: Path


@dataclass(frozen=True)
class ConsortiumFiles:
    """Every file ``make_consortium`` writes."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: tuple[SiteFiles, ...] = ()
    server_hosts: tuple[str, ...] = ()
    """The names and addresses in the server certificate's SAN, in order."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """SHA-256 fingerprints (hex, colon-separated) of ``ca.crt`` and ``server.pem``."""

    def all_paths(self) -> list[Path]:
        out = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for s in self.sites:
            out += [s.private_key, s.public_key, s.ca_cert]
        return out

    def private_paths(self) -> list[Path]:
        return [self.ca_key, self.server_key, *(s.private_key for s in self.sites)]


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


def _split(values: str | Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def _host_entry(host: str) -> x509.GeneralName:
    from cryptography import x509

    text = host.strip()
    if text.startswith("[") and text.endswith("]"):  # [::1]
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertsError(
            f"server host {host!r} is neither an IP address nor a DNS name (expected e.g. "
            "'superlink.example.org', '10.0.0.5' or '::1'; no ports, schemes or wildcards)"
        )
    return x509.DNSName(name)


def parse_hosts(
    hosts: str | Iterable[str] | None, include_loopback: bool = True
) -> tuple[str, ...]:
    """Canonical, de-duplicated server hosts (comma-separated or repeated), loopback appended.

    Raises :class:`CertsError` for an entry that is neither an IP address nor a DNS name, and when
    no host is left (``include_loopback=False`` and none given).
    """
    out: list[str] = []
    for h in [*_split(hosts), *(LOOPBACK_HOSTS if include_loopback else ())]:
        entry = _host_entry(h)
        canonical = str(entry.value)
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise CertsError("no server host: give --server-host, or keep the loopback names")
    return tuple(out)


def parse_sites(sites: str | Iterable[str] | None) -> tuple[str, ...]:
    """Site names (comma-separated or repeated); :data:`DEFAULT_SITES` when none is given.

    A name is 1-64 letters, digits, ``_`` or ``-``, starting with a letter or digit; names must be
    unique ignoring case (they become folder and file names).
    """
    names = _split(sites) or list(DEFAULT_SITES)
    seen: dict[str, str] = {}
    for name in names:
        if not _SITE_NAME.match(name):
            raise CertsError(
                f"site name {name!r} is not usable as a folder name: expected 1-64 letters, "
                "digits, '_' or '-', starting with a letter or digit (e.g. GLI, hospital-3)"
            )
        if name.lower() in seen:
            raise CertsError(f"site {name!r} is given twice (as {seen[name.lower()]!r})")
        seen[name.lower()] = name
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Keys and certificates (in memory)
# --------------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _validity(days: int, now: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if isinstance(days, bool) or int(days) != days or days < 1:
        raise CertsError(f"days must be a positive whole number, got {days!r}")
    start = (now or dt.datetime.now(dt.UTC)) - _CLOCK_SKEW
    return start, start + _CLOCK_SKEW + dt.timedelta(days=int(days))


def make_ca(
    key: ec.EllipticCurvePrivateKey,
    days: int = DEFAULT_DAYS,
    common_name: str = "fedbrats consortium CA",
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A self-signed CA certificate: ``CA:true, pathlen:0``, key usage keyCertSign + cRLSign."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    start, end = _validity(days, now)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbrats consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )


def make_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The SuperLink's TLS certificate, signed by the CA.

    ``hosts`` (DNS names and IP addresses) all go into the subject alternative names; the first is
    also the subject's common name. Extended key usage serverAuth.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise CertsError("the server certificate needs at least one host")
    start, end = _validity(days, now)
    san = x509.SubjectAlternativeName([_host_entry(h) for h in hosts])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbrats consortium"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start, ca_cert.not_valid_before_utc))
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def make_site_key(comment: str = "") -> tuple[bytes, bytes]:
    """A new node-authentication key pair: (OpenSSH private key, OpenSSH public key line).

    ECDSA on P-384, the private key unencrypted (``flower-supernode`` cannot read a passphrase),
    the public line ``ecdsa-sha2-nistp384 AAAA... comment`` ending with a newline.
    """
    from cryptography.hazmat.primitives import serialization

    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public += b" " + comment.encode("ascii")
    return private, public + b"\n"


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, as ``AB:CD:...`` (what ``openssl x509 -fingerprint
    -sha256`` prints), for checking a copy out of band."""
    from cryptography.hazmat.primitives import serialization

    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def consortium_paths(out: str | Path, sites: Sequence[str]) -> ConsortiumFiles:
    """Where every file goes (nothing is written)."""
    root = Path(out)
    return ConsortiumFiles(
        out=root,
        ca_cert=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        sites=tuple(
            SiteFiles(
                site=s,
                private_key=root / "sites" / s / f"{s.lower()}.key",
                public_key=root / "sites" / s / f"{s.lower()}.pub",
                ca_cert=root / "sites" / s / "ca.crt",
            )
            for s in sites
        ),
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start; replace an existing file only if ``force``."""
    try:
        write_exclusive(path, data, mode, replace=force)
    except FileExistsError:
        if force:  # a stale temporary file, not ``path``
            raise
        raise CertsError(
            f"{path} already exists; not overwriting it (pass --force to replace it)"
        ) from None


def make_consortium(
    out: str | Path,
    sites: str | Iterable[str] | None = None,
    server_hosts: str | Iterable[str] | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    include_loopback: bool = True,
) -> ConsortiumFiles:
    """Write a new consortium CA, the SuperLink's certificate and one key pair per site.

    ``sites`` and ``server_hosts`` are lists or comma-separated strings (``sites`` defaults to the
    five populations). Every argument is checked, and every target path is checked for an existing
    file, before anything is generated or written: without ``force`` an existing file is a
    :class:`CertsError` naming it and nothing is written. Returns the paths written.
    """
    site_names = parse_sites(sites)
    hosts = parse_hosts(server_hosts, include_loopback=include_loopback)
    _validity(days, None)
    paths = consortium_paths(out, site_names)
    if paths.out.exists() and not paths.out.is_dir():
        raise CertsError(f"{paths.out} exists and is not a folder")
    existing = [p for p in paths.all_paths() if p.exists() or p.is_symlink()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CertsError(
            f"{existing[0]} already exists{more}; not overwriting any file "
            "(pass --force to replace them all with a new CA and new keys)"
        )

    from cryptography.hazmat.primitives import serialization

    now = dt.datetime.now(dt.UTC)
    ca_key = _new_key()
    ca_cert = make_ca(ca_key, days, now=now)
    server_key = _new_key()
    server_cert = make_server_certificate(server_key, ca_cert, ca_key, hosts, days, now=now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    # Private keys first: a run that dies half-way leaves no certificate without its key.
    _write(paths.ca_key, _pem_private(ca_key), PRIVATE_MODE, force)
    _write(paths.ca_cert, ca_pem, PUBLIC_MODE, force)
    _write(paths.server_key, _pem_private(server_key), PRIVATE_MODE, force)
    _write(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, force
    )
    for site in paths.sites:
        private, public = make_site_key(comment=f"fedbrats-{site.site}")
        _write(site.private_key, private, PRIVATE_MODE, force)
        _write(site.public_key, public, PUBLIC_MODE, force)
        _write(site.ca_cert, ca_pem, PUBLIC_MODE, force)

    return ConsortiumFiles(
        out=paths.out,
        ca_cert=paths.ca_cert,
        ca_key=paths.ca_key,
        server_cert=paths.server_cert,
        server_key=paths.server_key,
        sites=paths.sites,
        server_hosts=hosts,
        fingerprints={"ca.crt": fingerprint(ca_cert), "server.pem": fingerprint(server_cert)},
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def format_consortium(files: ConsortiumFiles) -> str:
    """What was written, for whom, and the next steps, as plain text."""

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(files.out))
        except ValueError:
            return str(p)

    rows = [
        ("file", "mode", "what", "kept by"),
        (rel(files.ca_cert), "0644", "consortium CA certificate", "everyone"),
        (rel(files.ca_key), "0600", "CA private key", "coordinator, offline"),
        (rel(files.server_cert), "0644", "SuperLink TLS certificate", "SuperLink host"),
        (rel(files.server_key), "0600", "SuperLink TLS private key", "SuperLink host only"),
    ]
    for s in files.sites:
        rows.append((rel(s.private_key), "0600", f"{s.site} node-auth private key", f"{s.site}"))
        rows.append((rel(s.public_key), "0644", f"{s.site} node-auth public key", "SuperLink"))
        rows.append((rel(s.ca_cert), "0644", "copy of ca.crt", f"{s.site}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"wrote {len(rows) - 1} files to {files.out}:"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append("server certificate names: " + ", ".join(files.server_hosts))
    for name, fp in files.fingerprints.items():
        lines.append(f"SHA-256 fingerprint of {name}: {fp}")
    lines.append("")
    lines.append("next:")
    lines.append(
        "  SuperLink: flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem "
        "--ssl-keyfile server.key --enable-supernode-auth"
    )
    lines.append(
        "  register each site: flwr supernode register sites/<SITE>/<site>.pub <CONNECTION>"
    )
    lines.append(
        "  each site: flower-supernode --root-certificates ca.crt "
        "--auth-supernode-private-key <site>.key ..."
    )
    return "\n".join(lines)


def _run(args) -> int:
    try:
        files = make_consortium(
            args.out,
            sites=args.sites,
            server_hosts=args.server_host,
            days=args.days,
            force=args.force,
            include_loopback=not args.no_loopback,
        )
    except CertsError as e:
        print(f"error: {e}")
        return 2
    print(format_consortium(files))
    return 0


def register_certs(subparsers) -> None:
    p = subparsers.add_parser(
        "certs",
        help="make the consortium CA, the SuperLink's TLS certificate and the sites' node keys",
        description=(
            "Write a new consortium CA (ca.crt, ca.key), the SuperLink's TLS certificate signed "
            "by it (server.pem, server.key; subject alternative names: every --server-host, plus "
            "localhost and 127.0.0.1 unless --no-loopback), and one ECDSA P-384 key pair per site "
            "for Flower's node authentication (sites/<SITE>/<site>.key in OpenSSH format for "
            "flower-supernode --auth-supernode-private-key, <site>.pub for flwr supernode "
            "register, and a copy of ca.crt). Private keys are created with mode 0600. No file "
            "is ever overwritten without --force; exits 2 on an error."
        ),
    )
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the files to")
    p.add_argument(
        "--sites",
        metavar="SITE,...",
        default=",".join(DEFAULT_SITES),
        help=f"comma-separated site names, one key pair each (default {','.join(DEFAULT_SITES)})",
    )
    p.add_argument(
        "--server-host",
        metavar="HOST",
        action="append",
        default=None,
        help="DNS name or IP address the sites use to reach the SuperLink; repeat it or separate "
        "with commas for several (all go into the certificate)",
    )
    p.add_argument(
        "--no-loopback",
        action="store_true",
        help="leave localhost and 127.0.0.1 out of the server certificate (then the SuperLink "
        "must run with --host set to one of the --server-host names, or its own SuperExec "
        "cannot connect)",
    )
    p.add_argument(
        "--days",
        metavar="N",
        type=int,
        default=DEFAULT_DAYS,
        help=f"validity of the CA and server certificates in days (default {DEFAULT_DAYS})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing files (a new CA: every site needs the new ca.crt and keys)",
    )
    p.set_defaults(func=_run)
