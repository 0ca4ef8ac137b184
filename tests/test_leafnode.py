"""A far region with its own NATS leaf server: the region's worker connects to it nearby, and through it
registers, takes its jobs and reports them to the platform (docs/deployment.md, "Far regions")."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdk.broker import LeafNats
from sdk.http import HttpClient
from tests.conftest import running_stack, wait_until

pytestmark = pytest.mark.slow


async def test_a_worker_runs_jobs_through_its_regions_leaf_server(tmp_path: Path) -> None:
    async with running_stack(tmp_path, [], leafnodes=True) as stack:
        leaf = LeafNats(stack.leafnode_urls, secrets_dir=stack.secrets_dir, log_file=stack.logs / "nats-leaf.log")
        leaf.start()
        try:
            # The worker knows only the leaf server's URL: everything it does goes through the leaf.
            stack.start_worker("far", "far-region", env={"NATS_URL": leaf.address})
            async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
                async def online() -> bool:
                    return any(w.name == "far" and w.status == "online" for w in await http.workers())

                await wait_until(online, 90, "the far worker")
                accepted = await http.submit("echo", params={"via": "leaf"}, region="far-region")
                done = await http.wait(accepted.id, timeout_s=60)
                assert (done.status, done.result) == ("completed", {"via": "leaf"})
                far = next(w for w in await http.workers() if w.name == "far")
                assert (done.worker_id, far.region) == (far.id, "far-region")
        finally:
            stack.children["worker-far"].stop()
            leaf.stop()
