"""TLS for the HTTP gateway and for NATS, with a certificate from a local CA: refused while verification is
on (the default), accepted with verification off or with that CA as the trust anchor."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from nats.errors import Error as NatsError

from sdk.broker import EmbeddedNats
from sdk.certs import NodeCertificate, node_certificate
from sdk.connection import connect
from sdk.errors import BadRequest, Unavailable
from sdk.http import HttpClient
from sdk.tls import client_context, context_from_env
from tests.conftest import serving_gateway


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> NodeCertificate:
    """A certificate for 127.0.0.1 and localhost from a local CA no system trusts (as `gpuctl up` makes)."""
    return node_certificate(tmp_path_factory.mktemp("tls"), "localhost")


async def test_gateway_over_https_is_verified_by_default(
    nats_server: EmbeddedNats, tmp_path: Path, certificate: NodeCertificate
) -> None:
    cert_file, key_file, ca_file = certificate.cert_file, certificate.key_file, certificate.ca_file
    async with serving_gateway(nats_server.url, tmp_path / "secrets", tls_cert=cert_file, tls_key=key_file) as url:
        assert url.startswith("https://")
        async with HttpClient(url) as verifying:
            with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await verifying.health()
        async with HttpClient(url, verify=False) as trusting:
            assert (await trusting.health())["status"] == "ok"
        async with HttpClient(url, verify=str(ca_file)) as pinned:
            assert (await pinned.health())["status"] == "ok"


async def test_nats_over_tls_is_verified_by_default(tmp_path: Path, certificate: NodeCertificate) -> None:
    with EmbeddedNats(tmp_path / "nats", tls_cert=certificate.cert_file, tls_key=certificate.key_file) as server:
        assert server.url.startswith("tls://")
        with pytest.raises((ssl.SSLError, NatsError, OSError)):
            await connect(
                server.url, name="test-tls", tls=ssl.create_default_context(), wait_s=5, allow_reconnect=False
            )
        for context in (client_context(certificate.ca_file), client_context(verify=False)):
            nc = await connect(server.url, name="test-tls", tls=context, wait_s=5)
            await nc.jetstream().account_info()
            await nc.close()


def test_verification_can_be_turned_off_only_in_dev_and_test(certificate: NodeCertificate) -> None:
    assert context_from_env({}) is None
    pinned = context_from_env({"GF_TLS_CA": str(certificate.ca_file)})
    assert pinned is not None and pinned.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(BadRequest, match="GF_ENV"):
        context_from_env({"GF_TLS_VERIFY": "false"})
    with pytest.raises(BadRequest, match="GF_ENV"):
        context_from_env({"GF_TLS_VERIFY": "false", "GF_ENV": "production"})
    off = context_from_env({"GF_TLS_VERIFY": "false", "GF_ENV": "dev"})
    assert off is not None and off.verify_mode == ssl.CERT_NONE
