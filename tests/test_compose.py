"""docker-compose.yml cannot drift from the code: Docker does not run here, so the file is validated
against the Compose specification's JSON schema, and each service's command line runs as a local
process with the service's environment (`.env.example` plus its `environment`), compose host names
pointing at a local nats-server and its volumes at temp dirs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sdk.broker import ISSUER_VARIABLE, EmbeddedNats, free_port, nats_server_binary
from sdk.http import HttpClient
from sdk.status import parse_metrics
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NATS_NODES = ("nats-1", "nats-2", "nats-3")
PLATFORM = ("gateway", "scheduler-1", "scheduler-2", "projections")


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], value)


class Service:
    """A compose service as a local process: its command and environment, with host names and volumes
    mapped to this machine."""

    def __init__(self, name: str, spec: dict[str, Any], root: Path, hosts: dict[str, str]) -> None:
        self.name = name
        self.env = {**env_example(), **{k: str(v) for k, v in (spec.get("environment") or {}).items()}}
        for key, value in self.env.items():
            value = interpolate(value, self.env)
            for host, local in hosts.items():
                value = value.replace(host, local)
            self.env[key] = value
        self.mounts: dict[str, Path] = {}
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            local = root / name / target.lstrip("/")
            if source.startswith("./"):  # a bind mount: the repository's file, copied where it is mounted
                local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, local)
            else:
                local.mkdir(parents=True, exist_ok=True)
            self.mounts[target] = local
        self.command = [self._local(arg) for arg in spec["command"]]

    def _local(self, arg: str) -> str:
        for target, local in self.mounts.items():
            if arg == target or arg.startswith(f"{target}/"):
                return str(local) + arg[len(target):]
        return arg

    def flag(self, name: str, value: str) -> None:
        self.command[self.command.index(name) + 1] = value

    def start(self) -> subprocess.Popen[bytes]:
        program = {"python": sys.executable, "gpu-worker": str(Path(sys.executable).parent / "gpu-worker")}
        argv = [program.get(self.command[0], self.command[0]), *self.command[1:]]
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def own_metrics_port(service: Service) -> int:
    """Give the service a free port of this machine for its own metrics (each container has :9100)."""
    port = free_port()
    service.flag("--metrics-port", str(port))
    for variable in ("GF_METRICS_HOST", "GPU_WORKER_METRICS_HOST"):
        if variable in service.env:
            service.env[variable] = "127.0.0.1"
    return port


async def own_metrics(port: int) -> dict[str, float]:
    """A scrape of a service's own metrics port: each sample (name and labels) with its value."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_the_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors


def test_the_compose_file_describes_the_platform() -> None:
    services = compose()["services"]
    assert set(services) == {*NATS_NODES, *PLATFORM, "worker"}
    assert services["worker"]["profiles"] == ["gpu"]
    assert all("profiles" not in services[name] for name in (*NATS_NODES, *PLATFORM))
    # A cluster of three: each node routes to every node, and has a name and a store of its own.
    cluster = (ROOT / "deploy" / "nats-cluster.conf").read_text()
    assert {f"nats-route://{node}:6222" for node in NATS_NODES} <= set(re.findall(r"nats-route://[\w-]+:6222", cluster))
    assert len({services[node]["environment"]["GF_NATS_NAME"] for node in NATS_NODES}) == 3
    # Secrets from `.env` only; every named volume declared; each store on a volume.
    for name, spec in services.items():
        assert spec["env_file"] == ".env", name
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in compose()["volumes"], (name, volume)
    assert "${GF_PLATFORM_PASSWORD}" in services["gateway"]["environment"]["NATS_URL"]
    # Both images run as a user, and check their health.
    for dockerfile in ("Dockerfile", "Dockerfile.worker"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(r"^USER (?!root)\w+", text, re.M), dockerfile
        assert "HEALTHCHECK" in text, dockerfile
        for source in re.findall(r"^COPY (\S+)", text, re.M):
            assert (ROOT / source).exists(), (dockerfile, source)
    assert "FROM nvidia/cuda" in (ROOT / "Dockerfile.worker").read_text()


@pytest.mark.parametrize("node", NATS_NODES)
def test_each_nats_node_config_is_valid(node: str, tmp_path: Path) -> None:
    service = Service(node, compose()["services"][node], tmp_path, {})
    assert service.command[0] == "nats-server"
    argv = [nats_server_binary(), *service.command[1:], "-t"]
    run = subprocess.run(argv, env={**os.environ, **service.env}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """The cluster's stand-in: one nats-server with the platform's nats.conf and `.env.example`'s passwords
    and auth callout issuer."""
    variables = {k: v for k, v in env_example().items() if k.endswith("_PASSWORD") or k == ISSUER_VARIABLE}
    server = EmbeddedNats(tmp_path / "nats", env=variables)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def platform(broker: EmbeddedNats, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Every platform service of the compose file, started from its command line."""
    hosts = {f"{node}:4222": f"127.0.0.1:{broker.port}" for node in NATS_NODES}
    specs = compose()["services"]
    services = {name: Service(name, specs[name], tmp_path / "volumes", hosts) for name in PLATFORM}
    port = free_port()
    services["gateway"].flag("--http-port", str(port))
    metrics_ports = {name: own_metrics_port(service) for name, service in services.items()}
    procs = {name: service.start() for name, service in services.items()}
    try:
        yield {
            "url": f"http://127.0.0.1:{port}", "services": services, "procs": procs, "hosts": hosts,
            "metrics_ports": metrics_ports,
        }
    finally:
        for proc in procs.values():
            stop(proc)


async def test_the_platform_services_run_from_their_compose_command_lines(
    platform: dict[str, Any], tmp_path: Path
) -> None:
    key_file = platform["services"]["gateway"].mounts["/data"] / "secrets" / "operator.key"

    async def key_written() -> bool:
        assert all(proc.poll() is None for proc in platform["procs"].values()), "a service exited"
        return key_file.exists()

    await wait_until(key_written, 60, "the gateway's first operator key")
    async with HttpClient(platform["url"], api_key=key_file.read_text().strip()) as http:
        async def up() -> bool:
            try:
                await http.workers()  # the projections answer
            except Exception:
                return False
            leaders = parse_metrics(await http.metrics_text()).get("gf_scheduler_leader", [])
            return any(s.labels["holder"] in ("scheduler-1", "scheduler-2") for s in leaders)

        await wait_until(up, 60, "the projections and a scheduler leader")

        # The GPU profile's worker, from its own command line, enrolled with a token in its environment.
        worker = Service("worker", compose()["services"]["worker"], tmp_path / "volumes", platform["hosts"])
        worker.env["GPU_WORKER_ENROLLMENT_TOKEN"] = (await http.create_enrollment_token()).enrollment_token
        worker.command += ["--engines", "echo"]  # this machine has no GPU: the test needs no torch
        worker_port = own_metrics_port(worker)
        proc = worker.start()
        try:
            async def online() -> bool:
                return any(w.name == "compose-gpu" and w.status == "online" for w in await http.workers())

            await wait_until(online, 60, "the compose worker to come online")
            job = await http.submit("echo", params={"from": "compose"})
            assert (await http.wait(job.id, timeout_s=30)).result == {"from": "compose"}
            await each_service_serves_its_own_metrics(platform["metrics_ports"], worker_port)
        finally:
            await asyncio.to_thread(stop, proc)


async def each_service_serves_its_own_metrics(ports: dict[str, int], worker_port: int) -> None:
    """Each service's `--metrics-port` (as compose gives it) answers its process metrics and its own."""
    scraped = {name: await own_metrics(port) for name, port in {**ports, "worker": worker_port}.items()}
    for name, samples in scraped.items():
        assert samples["process_resident_memory_bytes"] > 0, name
        assert samples["process_cpu_seconds_total"] > 0, name
    gateway = scraped["gateway"]
    assert sum(v for k, v in gateway.items() if k.startswith("gf_http_requests_total{")) > 0
    assert not any(k.startswith("gf_queue_depth") for k in gateway)  # the fleet is on the API's /metrics only
    schedulers = [scraped["scheduler-1"], scraped["scheduler-2"]]
    assert sorted(s["scheduler_leader"] for s in schedulers) == [0, 1]  # one leader, one hot standby
    assert sum(s["scheduler_assignments_total"] for s in schedulers) >= 1
    assert all(s["scheduler_workers_known"] >= 1 for s in schedulers)
    assert scraped["projections"]["projections_applied_seq{stream=JOBS}"] >= 1
    assert scraped["worker"]["gpu_worker_jobs_done_total"] == 1  # the job above
    assert scraped["worker"]["gpu_worker_connected"] == 1
