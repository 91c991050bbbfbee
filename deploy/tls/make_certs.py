#!/usr/bin/env python3
"""Make a private CA and mutual-TLS certificates for a Dask cluster.

    python deploy/tls/make_certs.py OUTDIR [--host NAME_OR_IP ...] [--days N]

writes into OUTDIR:

    ca.pem                   CA certificate: give it to every scheduler, worker and client
    ca-key.pem               CA private key: keep it offline, it signs new certificates
    scheduler.pem, scheduler-key.pem
    worker.pem,    worker-key.pem
    client.pem,    client-key.pem

Every leaf certificate is valid for both TLS server and client use (Dask
workers both listen and connect) and names the given hosts in its subject
alternative names (Dask does not check host names, but other tools do).
Keys are ECDSA P-256, written with mode 0600. Needs only ``cryptography``
(``pip install "mixedscale[cluster]"`` brings it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("scheduler", "worker", "client")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "scheduler")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mixedscale"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, private=True)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_certs(
    outdir: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    roles: Sequence[str] = ROLES,
    days: int = 365,
    ca_name: str = "mixedscale dask CA",
) -> dict[str, Path]:
    """Write a CA and one certificate per role into ``outdir``; return the file paths.

    Keys of the result: ``ca``, ``ca-key`` and, per role, ``ROLE`` and ``ROLE-key``.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.pem", "ca-key": out / "ca-key.pem"}
    _write_cert(paths["ca"], ca_cert)
    _write_key(paths["ca-key"], ca_key)

    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for role in roles:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"dask-{role}"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_san(hosts), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths[role] = out / f"{role}.pem"
        paths[f"{role}-key"] = out / f"{role}-key.pem"
        _write_cert(paths[role], cert)
        _write_key(paths[f"{role}-key"], key)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="directory to write the PEM files into")
    parser.add_argument(
        "--host", action="append", dest="hosts", metavar="NAME_OR_IP",
        help="host name or IP for the subject alternative names (repeatable); "
             f"default: {' '.join(DEFAULT_HOSTS)}",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    args = parser.parse_args(argv)
    paths = make_certs(args.outdir, hosts=args.hosts or DEFAULT_HOSTS, days=args.days)
    for name, path in paths.items():
        print(f"{name:15} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
