"""TLS: the scheduler's server context, clients' verifying context, and `orch certs init`.

Serving and verifying use only the standard library's ``ssl``. Making
certificates (``make_certs``) needs the optional ``cryptography`` package
(``pip install 'orch[tls]'``); it is imported only there, so the zipapp and a
plain install never need it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from orch.core.errors import ConfigError

INSTALL_HINT = ("orch certs init needs the 'cryptography' package: pip install 'orch[tls]' "
                "(or make a CA and a server certificate with openssl and set tls.cert, tls.key and tls.ca)")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The scheduler's TLS context: TLS 1.2 or newer, the given certificate chain and key."""
    for name, value in (("tls.cert", cert), ("tls.key", key)):
        if not value:
            raise ConfigError(f"{name} is required to serve TLS (both tls.cert and tls.key)", field=name)
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{name}: no such file {value}", field=name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot load tls.cert {cert} with tls.key {key}: {e}", field="tls.cert") from None
    return ctx


def client_context(ca: str | None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``ca`` (a PEM file of a private CA) if given."""
    if ca:
        path = Path(ca).expanduser()
        if not path.is_file():
            raise ConfigError(f"tls.ca: no such file {ca}", field="tls.ca")
        try:
            ctx = ssl.create_default_context(cafile=str(path))
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load the CA certificate {ca}: {e}", field="tls.ca") from None
        # Trusting a server certificate itself (not only a CA) works too.
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def cert_files(folder: Path) -> CertFiles:
    return CertFiles(folder / "ca.pem", folder / "ca-key.pem", folder / "server.pem", folder / "server-key.pem")


def make_certs(folder: Path, hosts: list[str], *, days: int = 825, force: bool = False) -> CertFiles:
    """A small CA and a server certificate signed by it for ``hosts`` (names and IP addresses).

    Writes ``ca.pem``, ``ca-key.pem``, ``server.pem``, ``server-key.pem`` (keys mode 0600).
    """
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None

    names: list[str] = []
    for h in [*hosts, *DEFAULT_HOSTS]:
        h = h.strip()
        if h and h not in names:
            names.append(h)
    sans: list[x509.GeneralName] = []
    for h in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not _HOST_RE.fullmatch(h) or len(h) > 253:
                raise ConfigError(f"--host {h!r} is neither an IP address nor a host name", field="host") from None
            sans.append(x509.DNSName(h))

    files = cert_files(folder)
    existing = [p for p in (files.ca, files.ca_key, files.cert, files.key) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; pass --force to replace the certificates", field="dir")
    folder.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orch private CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.ca_key, pem_key(ca_key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.key, pem_key(key), 0o600)
    return files


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches only this machine (``localhost``, 127.0.0.0/8, ::1)."""
    h = host.strip().strip("[]")
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
