"""`python -m scheduler`: one scheduler instance (leader or hot standby) until SIGINT/SIGTERM (or until the
supervisor that started it is gone). `gpuctl up` runs it as a child; `gpuctl scheduler` runs it alone."""

from __future__ import annotations

from typing import Annotated

from cyclopts import App, Parameter

from scheduler.service import serve
from sdk.connection import nats_url_from_env
from sdk.metrics import DEFAULT_METRICS_HOST, MetricsHostFlag, MetricsPortFlag
from sdk.process import NatsUrlFlag, run_until_signal

app = App(name="python -m scheduler", help="Run a scheduler (the leader places jobs; others wait as standbys).")


@app.default
def scheduler(
    *,
    nats_url: NatsUrlFlag = None,
    instance_id: Annotated[str | None, Parameter(env_var="SCHEDULER_ID")] = None,
    metrics_port: MetricsPortFlag = None,
    metrics_host: MetricsHostFlag = DEFAULT_METRICS_HOST,
) -> None:
    """Run a scheduler (the leader places jobs; another instance waits as a hot standby).

    Parameters
    ----------
    instance_id
        This instance's name in the leader lease (default: host name and PID).
    """
    run_until_signal(
        lambda stop: serve(nats_url_from_env(nats_url), stop, instance_id, metrics_port=metrics_port, metrics_host=metrics_host)
    )


if __name__ == "__main__":
    app()
