"""The gateway's commands and queries, shared by the HTTP API and the NATS endpoints: one `Gateway`.

Each concept lives in its own module, as one part of `Gateway`: jobs (`gateway.jobs`), workers
(`gateway.workers`), their runtime config (`gateway.worker_config`), regions, queue limits and
placement explanations (`gateway.geo`, `gateway.backpressure`), direct sessions (`gateway.direct`); credentials are `gateway.auth`'s.
The parts name the resources they use (`nc`, `js`, `feed`, ...); `Gateway` owns them and their lifecycle.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

from gateway.admin import Admin
from gateway.auth import Credentials, Principal
from gateway.backpressure import Backpressure
from gateway.direct import DirectCommands
from gateway.feed import JobFeed
from gateway.follow import JobFold, JobsFollower
from gateway.geo import GeoCommands
from gateway.jobs import JobCommands, require_connected
from gateway.kv import Bucket
from gateway.worker_config import WorkerConfigs
from gateway.workers import WorkerCommands
from sdk import subjects
from sdk.api import Accepted, IssueTokens, JobReport, RefreshTokens, TokenPair, WorkerReport
from sdk.group_commit import GroupCommit

logger = logging.getLogger(__name__)


class Gateway(JobCommands, WorkerCommands, WorkerConfigs, GeoCommands, DirectCommands):
    def __init__(
        self, nc: NatsClient, credentials: Credentials, job_folds: Sequence[JobFold] = (), feed: JobFeed | None = None
    ) -> None:
        """`job_folds`: more folds of the whole JOBS log for the gateway's one follower to feed (the
        metrics'), beside its own job feed and queue depth; `feed`: the job feed, when not the default."""
        self.nc = nc
        self.js = nc.jetstream()
        self.feed = feed if feed is not None else JobFeed(nc)
        self.log = GroupCommit(self.js)
        self.credentials = credentials
        self.admin = Admin(self.js, credentials)
        self.backpressure = Backpressure(self.js)
        self.jobs_follower = JobsFollower(self.js, [self.feed, self.backpressure.depth, *job_folds])
        self.session_signer = credentials.session_signer

    async def start(self) -> None:
        self.config_bucket = await Bucket.open(self.js, subjects.WORKER_CONFIG_BUCKET)
        self.platform_config = await Bucket.open(self.js, subjects.PLATFORM_CONFIG_BUCKET)
        await self.publish_session_key()
        await self.backpressure.start()
        await self.jobs_follower.start()

    async def stop(self) -> None:
        await self.jobs_follower.stop()
        await self.backpressure.stop()
        await self.feed.stop()

    async def report(self, worker_id: str, report: WorkerReport) -> Accepted:
        """A worker's report: about one of its jobs (an event on the job) or about itself."""
        require_connected(self.nc)
        if isinstance(report, JobReport):
            return await self.report_job(worker_id, report)
        return await self.report_self(worker_id, report)

    # --- Credentials ------------------------------------------------------------------------------

    async def issue_tokens(self, req: IssueTokens) -> TokenPair:
        return await self.credentials.issue_tokens(req.api_key)

    async def refresh_tokens(self, req: RefreshTokens) -> TokenPair:
        return await self.credentials.refresh(req.refresh_token)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <access token>` header; `Unauthorized` (with the
        reason) when it is missing, malformed, expired or revoked."""
        return self.credentials.verify_authorization(authorization)

    # --- Health ------------------------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        """Each dependency's state; NATS must answer a round trip within a second."""
        state = {"nats": "down", "jetstream": "down"}
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=1)
                state["nats"] = "ok"
                await self.js.account_info()
                state["jetstream"] = "ok"
            except Exception as exc:  # any failure here is the answer, not an error
                logger.debug("health check: %s", exc)
        return state
