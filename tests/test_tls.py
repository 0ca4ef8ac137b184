"""TLS for the HTTP gateway and for NATS, with a self-signed certificate: refused while verification is
on (the default), accepted with verification off or with the certificate as the trust anchor."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nats.errors import Error as NatsError

from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.errors import BadRequest, Unavailable
from sdk.http import HttpClient
from sdk.tls import client_context, context_from_env
from tests.conftest import serving_gateway


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert file, key file)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpu-fabric test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_gateway_over_https_is_verified_by_default(
    nats_server: EmbeddedNats, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert_file, key_file = certificate
    async with serving_gateway(nats_server.url, tmp_path / "secrets", tls_cert=cert_file, tls_key=key_file) as url:
        assert url.startswith("https://")
        async with HttpClient(url) as verifying:
            with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await verifying.health()
        async with HttpClient(url, verify=False) as trusting:
            assert (await trusting.health())["status"] == "ok"
        async with HttpClient(url, verify=str(cert_file)) as pinned:
            assert (await pinned.health())["status"] == "ok"


async def test_nats_over_tls_is_verified_by_default(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert_file, key_file = certificate
    with EmbeddedNats(tmp_path / "nats", tls_cert=cert_file, tls_key=key_file) as server:
        assert server.url.startswith("tls://")
        with pytest.raises((ssl.SSLError, NatsError, OSError)):
            await connect(
                server.url, name="test-tls", tls=ssl.create_default_context(), wait_s=5, allow_reconnect=False
            )
        for context in (client_context(cert_file), client_context(verify=False)):
            nc = await connect(server.url, name="test-tls", tls=context, wait_s=5)
            await nc.jetstream().account_info()
            await nc.close()


def test_verification_can_be_turned_off_only_in_dev_and_test(certificate: tuple[Path, Path]) -> None:
    assert context_from_env({}) is None
    pinned = context_from_env({"GF_TLS_CA": str(certificate[0])})
    assert pinned is not None and pinned.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(BadRequest, match="GF_ENV"):
        context_from_env({"GF_TLS_VERIFY": "false"})
    with pytest.raises(BadRequest, match="GF_ENV"):
        context_from_env({"GF_TLS_VERIFY": "false", "GF_ENV": "production"})
    off = context_from_env({"GF_TLS_VERIFY": "false", "GF_ENV": "dev"})
    assert off is not None and off.verify_mode == ssl.CERT_NONE
