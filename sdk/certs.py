"""A local certificate authority for the routes between the nodes of a cluster `gpuctl up --cluster N
--route-tls` runs on one machine: a CA made on first use (kept in the secrets dir, the key 0600) and one
certificate per node signed by it, for 127.0.0.1 and localhost, good for a route's both ends (server and
client auth: each node verifies the other against the CA). A deployment over several machines brings
certificates of its own CA instead (docs/deployment.md, "Three machines")."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdk.private_files import write_private

logger = logging.getLogger(__name__)

CA_NAME = "gpu-fabric local CA"
CA_VALID_DAYS = 3650
NODE_VALID_DAYS = 365


@dataclass(frozen=True)
class NodeCertificate:
    """The files a node's `tls {}` block names."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def local_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `folder` (`ca.pem`, `ca.key`), made on first use."""
    cert_file, key_file = folder / "ca.pem", folder / "ca.key"
    if cert_file.exists() and key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), f"{key_file} is not the EC key this module writes"
        return x509.load_pem_x509_certificate(cert_file.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (
        _builder(CA_NAME, name, key.public_key(), CA_VALID_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(key_file, _key_pem(key))
    write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    logger.info("made a local CA for the cluster's routes in %s", folder)
    return cert, key


def node_certificate(folder: Path, node: str) -> NodeCertificate:
    """`<folder>/<node>.pem` and `<node>.key`, signed by the CA in `folder`; made on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = local_ca(folder)
    files = NodeCertificate(folder / f"{node}.pem", folder / f"{node}.key", folder / "ca.pem")
    if files.cert_file.exists() and files.key_file.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(node, ca_cert.subject, key.public_key(), NODE_VALID_DAYS)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.key_file, _key_pem(key))
    write_private(files.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return files
