"""`python -m gateway`: the HTTP gateway and the `api.>` NATS endpoints, until SIGINT/SIGTERM (or until the
supervisor that started it is gone). `gpuctl up` runs it as a child; `gpuctl gateway` runs it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter, validators

from gateway.auth import AuthSettings
from gateway.main import serve
from sdk.connection import nats_url_from_env
from sdk.metrics import DEFAULT_METRICS_HOST, MetricsHostFlag, MetricsPortFlag
from sdk.process import NatsUrlFlag, run_until_signal

app = App(name="python -m gateway", help="Run the HTTP gateway and the `api.>` NATS endpoints.")

Seconds = Annotated[float, Parameter(validator=validators.Number(gt=0))]


@app.default
def gateway(
    *,
    nats_url: NatsUrlFlag = None,
    http_port: Annotated[int, Parameter(validator=validators.Number(gte=1, lte=65535))] = 8000,
    host: str = "127.0.0.1",
    secrets_dir: Annotated[Path, Parameter(env_var="GF_SECRETS_DIR")] = Path(".data/secrets"),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    access_ttl_s: Seconds = 900.0,
    worker_credentials_max_age_s: Seconds = 86400.0,
    metrics_port: MetricsPortFlag = None,
    metrics_host: MetricsHostFlag = DEFAULT_METRICS_HOST,
    reuse_port: bool = False,
) -> None:
    """Run the HTTP gateway and the `api.>` NATS endpoints.

    Parameters
    ----------
    secrets_dir
        Where the master key lives, and the first operator API key (both created there, mode 0600, on
        first run).
    tls_cert
        Serve HTTPS with this certificate (PEM); `tls_key` is its private key.
    access_ttl_s
        How long an access token is valid.
    worker_credentials_max_age_s
        Workers rotate credentials older than this (they are told at a heartbeat).
    reuse_port
        Share `http_port` with other gateways on this machine (SO_REUSEPORT): the kernel spreads new
        connections over every gateway that listens there.
    """
    settings = AuthSettings(access_ttl_s=access_ttl_s, worker_credentials_max_age_s=worker_credentials_max_age_s)
    run_until_signal(
        lambda stop: serve(
            nats_url_from_env(nats_url), host, http_port, stop,
            secrets_dir=secrets_dir, settings=settings, tls_cert=tls_cert, tls_key=tls_key,
            metrics_port=metrics_port, metrics_host=metrics_host, reuse_port=reuse_port,
        )
    )


if __name__ == "__main__":
    app()
