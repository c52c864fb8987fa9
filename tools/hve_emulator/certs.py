"""A private CA and a localhost server certificate, so clients can verify TLS for real.

The CA key is never written to disk: the state dir can only ever impersonate localhost, even
if a developer added ca.pem to a trust store. When the server certificate needs renewing, a
new CA is minted as well and clients simply re-read ca.pem.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:  # Serialises concurrent first starts on one state dir (POSIX only; best effort elsewhere).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server-key.pem"
SERVER_DNS_NAMES = ("localhost",)
SERVER_IPS = (ipaddress.ip_address("127.0.0.1"),)
VALIDITY = dt.timedelta(days=365)
# A certificate this close to expiry is replaced, so a long-running dev stack never trips on it.
RENEW_BEFORE = dt.timedelta(days=7)
# Backdated by a day: a client whose clock is behind the one that made the certificate (a process
# under tools/test_hours.sh's faked clock, a VM that slept) still finds it valid.
BACKDATE = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertPaths:
    ca_file: Path
    cert_file: Path
    key_file: Path


def ensure_certificates(state_dir: Path, now: dt.datetime | None = None) -> CertPaths:
    """Reuse the CA and server certificate in state_dir if valid now, else create new ones (one
    made by a clock that is ahead of this one is not yet valid here, and is replaced too)."""
    now = now or dt.datetime.now(dt.UTC)
    state_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(state_dir / CA_FILE, state_dir / CERT_FILE, state_dir / KEY_FILE)
    with _locked(state_dir / ".certs.lock"):
        if not _still_valid(paths, now):
            _create(paths, now)
    return paths


def server_tls_context(paths: CertPaths) -> ssl.SSLContext:
    """Server side of STARTTLS: TLS 1.2 minimum, as HVE requires."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(paths.cert_file, paths.key_file)
    return context


def _create(paths: CertPaths, now: dt.datetime) -> None:
    not_before = now - BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "HVE emulator local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in SERVER_DNS_NAMES]
                + [x509.IPAddress(ip) for ip in SERVER_IPS]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a reader never sees a new certificate next to an old key.
    _write_atomic(paths.key_file, key_pem, mode=0o600)
    _write_atomic(paths.cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_atomic(paths.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))


def _still_valid(paths: CertPaths, now: dt.datetime) -> bool:
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_file.read_bytes())
        server_cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
        server_key = serialization.load_pem_private_key(paths.key_file.read_bytes(), None)
    except (OSError, ValueError):
        return False
    deadline = now + RENEW_BEFORE
    if any(cert.not_valid_after_utc <= deadline for cert in (ca_cert, server_cert)):
        return False
    if any(cert.not_valid_before_utc > now for cert in (ca_cert, server_cert)):
        return False  # made by a clock ahead of this one
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if _public_der(server_key.public_key()) != _public_der(server_cert.public_key()):
        return False
    try:
        san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(SERVER_DNS_NAMES) <= set(san.get_values_for_type(x509.DNSName)) and set(
        SERVER_IPS
    ) <= set(san.get_values_for_type(x509.IPAddress))


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
