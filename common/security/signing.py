"""Signed students: the consortium's Ed25519 key, detached file signatures, signed arrays.

The coordinator makes one Ed25519 key pair for the consortium (``fedbrats keys --out DIR``):

=====================  ====================================================  ===================
file                   what it is                                            kept by
=====================  ====================================================  ===================
``consortium.key``     the private signing key (PKCS#8 PEM, unencrypted,     the server only
                       created with mode 0600)                               (``signing-key``)
``consortium.pub``     the public key (SubjectPublicKeyInfo PEM)             every site
                                                                             (``consortium-public-key``)
                                                                             and every user of
                                                                             ``fedbrats predict``
=====================  ====================================================  ===================

What is signed:

* **Files** (:func:`sign_file`, :func:`verify_file`): every checkpoint the server writes and the
  final ``student.pt`` get a detached ``<file>.sig`` next to them. The signed message is
  ``b"fedbrats-file-signature/1\\0" + SHA-256(file bytes)``; the ``.sig`` file is one text line,
  ``fedbrats-signature/1 ed25519-sha256 <base64 of the 64-byte signature>``.
* **Arrays** (:func:`sign_arrays`, :func:`verify_arrays`): the student the server sends to the
  sites in each ``train``/``evaluate``/``evaluate.final`` instruction. The signed message is
  ``b"fedbrats-arrays-signature/1\\0" + SHA-256(canonical bytes)``, where the canonical bytes of a
  state dict are, for every key in sorted order: the key (UTF-8, length-prefixed), the dtype
  (numpy's little-endian ``dtype.str``, e.g. ``<f4``, length-prefixed), the number of dimensions
  and each dimension (unsigned 64-bit little-endian), the number of bytes of data, then the raw
  values in C order, little-endian. Equal arrays give equal bytes whatever container carries them
  (torch tensors, numpy arrays, Flower ``Array``/``ArrayRecord``), so the server signs what it
  sends and a site verifies what it received.

A signature authenticates *who* made the student (the holder of the consortium key) and that not
one bit changed since; it says nothing about freshness (an older signed student is still validly
signed). TLS protects the channel; signatures protect the artefact wherever it is copied.

``cryptography`` is imported inside the functions, so that ``fedbrats --help`` stays fast.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import logging
import os
import stat
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedbrats.common.utils.arrays import to_numpy
from fedbrats.common.utils.files import write_exclusive
from fedbrats.common.wire import SIGNATURE_CONFIG_KEY  # re-exported: the key of the signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGNATURE_CONFIG_KEY",
    "SIG_SUFFIX",
    "SignatureError",
    "arrays_digest",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "public_key_fingerprint",
    "register_keys",
    "sig_path",
    "sign_arrays",
    "sign_file",
    "verify_arrays",
    "verify_file",
]

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "consortium.key"
PUBLIC_KEY_NAME = "consortium.pub"
SIG_SUFFIX = ".sig"

_FILE_CONTEXT = b"fedbrats-file-signature/1\0"
_ARRAYS_CONTEXT = b"fedbrats-arrays-signature/1\0"
_SIG_HEADER = "fedbrats-signature/1 ed25519-sha256"
_SIG_LEN = 64


class SignatureError(ValueError):
    """A signature is missing, malformed, or does not match the data and the public key."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def generate_keypair(out_dir: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``out_dir/consortium.key`` (0600) and ``consortium.pub``.

    Refuses (:class:`FileExistsError` naming the file) to replace either file unless ``force``.
    Returns ``(private_key_path, public_key_path)``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    private, public = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not force:
        for p in (private, public):
            if p.exists():
                raise FileExistsError(
                    f"{p} already exists; not overwriting it (pass --force to replace the "
                    "key pair; every site then needs the new public key)"
                )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_exclusive(private, private_pem, 0o600, replace=force)
    write_exclusive(public, public_pem, 0o644, replace=force)
    return private, public


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (PKCS#8 PEM, as :func:`generate_keypair` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(
            f"{path}: cannot read the signing key ({e.strerror or e}); expected the "
            f"consortium's Ed25519 private key ({PRIVATE_KEY_NAME} from fedbrats keys)"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(
            f"{path}: not an unencrypted PEM private key ({e}); expected the consortium's "
            f"Ed25519 private key ({PRIVATE_KEY_NAME} from fedbrats keys)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"{path}: a {type(key).__name__.lstrip('_')}, expected an Ed25519 private key "
            f"({PRIVATE_KEY_NAME} from fedbrats keys)"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s: private signing key is readable by others (mode %o); chmod 600 it",
                    path, mode)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path`` (SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(
            f"{path}: cannot read the public key ({e.strerror or e}); expected the "
            f"consortium's Ed25519 public key ({PUBLIC_KEY_NAME} from fedbrats keys)"
        ) from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        hint = " (this is a private key: give the .pub file)" if b"PRIVATE KEY" in data else ""
        raise SignatureError(
            f"{path}: not a PEM public key{hint} ({e}); expected the consortium's Ed25519 public "
            f"key ({PUBLIC_KEY_NAME} from fedbrats keys)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"{path}: a {type(key).__name__.lstrip('_')}, expected an Ed25519 public key "
            f"({PUBLIC_KEY_NAME} from fedbrats keys)"
        )
    return key


def _private(key: Ed25519PrivateKey | str | Path) -> Ed25519PrivateKey:
    return load_private_key(key) if isinstance(key, str | Path) else key


def _public(key: Ed25519PublicKey | str | Path) -> Ed25519PublicKey:
    return load_public_key(key) if isinstance(key, str | Path) else key


def public_key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | str | Path) -> str:
    """``SHA256:<hex>`` of the raw public key: short enough to compare over the phone."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, str | Path):
        text = Path(key).read_bytes()
        key = _private(key) if b"PRIVATE KEY" in text else _public(key)
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def sig_path(path: str | Path) -> Path:
    """The detached signature of ``path``: ``<path>.sig``."""
    path = Path(path)
    return path.with_name(path.name + SIG_SUFFIX)


def _file_message(path: Path) -> bytes:
    from fedbrats.common.utils.files import file_sha256

    return _FILE_CONTEXT + file_sha256(path)


def sign_file(path: str | Path, private_key: Ed25519PrivateKey | str | Path) -> Path:
    """Write the detached signature ``<path>.sig`` of ``path``; returns its path.

    ``private_key``: a key or the path of the consortium's private key file.
    """
    path = Path(path)
    signature = _private(private_key).sign(_file_message(path))
    out = sig_path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{_SIG_HEADER} {base64.b64encode(signature).decode()}\n")
    tmp.replace(out)
    return out


def _read_sig(path: Path) -> bytes:
    sp = sig_path(path)
    if not sp.exists():
        raise SignatureError(
            f"{path}: no signature ({sp.name} not found next to it); expected a detached "
            "signature written by the run's server (run setting signing-key)"
        )
    try:
        text = sp.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SignatureError(f"{path}: signature file {sp} unreadable ({e})") from None
    prefix = _SIG_HEADER + " "
    if not text.startswith(prefix):
        raise SignatureError(
            f"{path}: malformed signature file {sp}: expected a line "
            f"'{_SIG_HEADER} <base64>', found {text[:60]!r}"
        )
    try:
        sig = base64.b64decode(text[len(prefix):].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{path}: malformed signature file {sp}: not base64") from None
    if len(sig) != _SIG_LEN:
        raise SignatureError(
            f"{path}: malformed signature file {sp}: expected a {_SIG_LEN}-byte Ed25519 "
            f"signature, found {len(sig)} bytes"
        )
    return sig


def verify_file(path: str | Path, public_key: Ed25519PublicKey | str | Path) -> None:
    """Check ``path`` against its ``<path>.sig`` and the consortium's public key.

    Raises :class:`SignatureError` naming the file when the file or its signature is missing,
    the signature is malformed, or it does not match (the file was changed, or signed with
    another key).
    """
    from cryptography.exceptions import InvalidSignature

    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{path}: file not found; nothing to verify")
    sig = _read_sig(path)
    key = _public(public_key)
    try:
        key.verify(sig, _file_message(path))
    except InvalidSignature:
        raise SignatureError(
            f"{path}: signature does not match: the file was changed after it was signed, or "
            f"signed with another key than {public_key_fingerprint(key)}; refusing to use it"
        ) from None


# --------------------------------------------------------------------------------------------
# Arrays (a state dict in a message)
# --------------------------------------------------------------------------------------------


def arrays_digest(arrays: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical bytes of a state dict (see the module docstring)."""
    h = hashlib.sha256()

    def chunk(b: bytes) -> None:
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    h.update(struct.pack("<Q", len(arrays)))
    for name in sorted(arrays):
        arr = to_numpy(arrays[name])
        le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        arr = np.ascontiguousarray(arr, dtype=le)
        chunk(str(name).encode("utf-8"))
        chunk(arr.dtype.str.replace("|", "<").encode("ascii"))
        h.update(struct.pack("<Q", arr.ndim))
        for dim in arr.shape:
            h.update(struct.pack("<Q", dim))
        chunk(arr.tobytes(order="C"))
    return h.digest()


def sign_arrays(arrays: Mapping[str, Any], private_key: Ed25519PrivateKey | str | Path) -> bytes:
    """The 64-byte Ed25519 signature of a state dict (tensors, numpy arrays or Flower Arrays)."""
    return _private(private_key).sign(_ARRAYS_CONTEXT + arrays_digest(arrays))


def verify_arrays(arrays: Mapping[str, Any], signature: bytes | None,
                  public_key: Ed25519PublicKey | str | Path, what: str = "student") -> None:
    """Check a state dict against its signature; :class:`SignatureError` if missing or wrong."""
    from cryptography.exceptions import InvalidSignature

    if signature is None or (isinstance(signature, bytes | bytearray) and not signature):
        raise SignatureError(
            f"{what}: no signature; this site requires a student signed with the consortium key "
            "(node setting consortium-public-key), so the server must run with signing-key set"
        )
    if not isinstance(signature, bytes | bytearray) or len(signature) != _SIG_LEN:
        found = (f"{len(signature)} bytes" if isinstance(signature, bytes | bytearray)
                 else type(signature).__name__)
        raise SignatureError(
            f"{what}: malformed signature: expected {_SIG_LEN} bytes of Ed25519 signature, "
            f"found {found}"
        )
    key = _public(public_key)
    try:
        key.verify(bytes(signature), _ARRAYS_CONTEXT + arrays_digest(arrays))
    except InvalidSignature:
        raise SignatureError(
            f"{what}: signature does not match: the arrays were changed after signing, or "
            f"signed with another key than the consortium's ({public_key_fingerprint(key)}); "
            "refusing to use them"
        ) from None


# --------------------------------------------------------------------------------------------
# fedbrats keys
# --------------------------------------------------------------------------------------------


def _run_keys(args: argparse.Namespace) -> int:
    try:
        private, public = generate_keypair(args.out, force=args.force)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"private signing key: {private} (mode 0600; the server's signing-key, keep it there)")
    print(f"public key:          {public} (give it to every site: consortium-public-key, and "
          "to users of fedbrats predict --public-key)")
    print(f"fingerprint:         {public_key_fingerprint(public)}")
    return 0


def register_keys(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "keys",
        help="make the consortium's Ed25519 key pair for signed students",
        description=(
            f"Write a new Ed25519 key pair: {PRIVATE_KEY_NAME} (PKCS#8 PEM, created with mode "
            f"0600) and {PUBLIC_KEY_NAME} (PEM). The server signs every checkpoint, the final "
            "student.pt (detached .sig files) and the student it sends each round with the "
            "private key (run setting signing-key=PATH); sites verify with the public key "
            "(node setting consortium-public-key=PATH), and fedbrats predict --public-key PATH "
            "refuses an unsigned or changed student file. No file is overwritten without "
            "--force; exits 2 on an error."
        ),
    )
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the key pair to")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key pair (every site then needs the new .pub)")
    p.set_defaults(func=_run_keys)
    return p
