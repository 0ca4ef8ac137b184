"""The worker's direct sessions (`sdk.direct` tells the whole story): requests on `direct.<worker_id>`,
checked offline and run at once, with no scheduler and nothing appended.

A request carries its session token; `sdk.direct.verify_token` checks it with the platform's public key
from the runtime config (`session_key`): signed by the platform, for this worker, not expired. The token
names the job type and model, so a session runs what it was opened for and nothing else. The requests
of one session run one at a time (the session holds one slot). A streamed request gets its text as
`StreamChunk`s on its reply inbox, then the `DirectResult` marked by `STREAM_END_HEADER`, as a job's
stream ends with the job; an error reply ends it early.

The platform ends a session on `direct.<worker_id>.end` (clients cannot publish there) and gets its
usage: requests, generated tokens and errors. An ended session's token is refused from then on; a
draining worker refuses every request, so clients learn at once to open a session elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from sdk import subjects
from sdk.api import StreamChunk, decode
from sdk.direct import DirectRequest, DirectResult, EndSession, SessionClaims, SessionUsage, check_claims, read_token
from sdk.endpoints import STREAMED, Endpoints
from sdk.errors import JobError, PlatformError, SessionEnded, Timeout
from sdk.events import Assignment, encoder, now_ms
from worker.engines.base import EngineError, JobContext
from worker.execution import EngineHost
from worker.outcomes import Interrupted, preflight

logger = logging.getLogger(__name__)

#: The longest one direct request may run (a session's expiry bounds it too).
MAX_REQUEST_S = 300.0
#: Ended sessions remembered, so their tokens stay refused until they expire anyway.
MAX_ENDED = 10_000
#: Verified tokens remembered (a worker serves a handful of sessions; past this the cache starts over).
MAX_VERIFIED = 1_000


@dataclass(eq=False, kw_only=True)
class DirectServer(EngineHost):
    #: Set once the worker drains: every request is refused (`session_ended`, reason `worker_draining`).
    draining: bool = field(default=False, init=False)
    _usage: dict[str, SessionUsage] = field(default_factory=dict, init=False)
    _turns: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    _ended: OrderedDict[str, str] = field(default_factory=OrderedDict, init=False)
    _endpoints: Endpoints | None = field(default=None, init=False)
    #: (session key, token) -> its verified claims.
    _verified: dict[tuple[str, str], SessionClaims] = field(default_factory=dict, init=False)
    #: Set whenever no session's usage is left to hand over.
    _collected: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def start(self, worker_id: str) -> None:
        self._endpoints = Endpoints(self.link.nc, queue="direct", name=f"worker {worker_id} (direct)")
        await self._endpoints.serve({
            subjects.direct_subject(worker_id): self._request,
            subjects.direct_end_subject(worker_id): self._end,
        })

    async def collected(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) until the platform has ended every session that has usage: once it
        sees this worker draining it ends them and collects their counts, so the log accounts for them."""
        if self._usage and timeout_s > 0:
            self._collected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._collected.wait(), timeout_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Take no more requests; those running get `grace_s`, then an `unavailable` answer."""
        if self._endpoints is not None:
            await self._endpoints.stop(grace_s=grace_s)

    # --- Requests ------------------------------------------------------------------------------------

    async def _request(self, msg: Msg) -> Any:
        req: DirectRequest = decode(msg.data, DirectRequest)
        assert self.link.worker_id is not None
        claims = check_claims(self._read(req.token), worker_id=self.link.worker_id, now_ms=now_ms())
        reason = self._ended.get(claims.session_id) or ("worker_draining" if self.draining else None)
        if reason is not None:
            raise SessionEnded(f"session {claims.session_id} is over ({reason}); open another", {"reason": reason})
        usage = self._usage.setdefault(claims.session_id, SessionUsage())
        async with self._turns.setdefault(claims.session_id, asyncio.Lock()):
            usage.requests += 1
            try:
                result = await self._run(claims, req, msg.reply if req.stream else None)
            except PlatformError:
                usage.errors += 1
                raise
        if isinstance(result, dict) and isinstance(result.get("completion_tokens"), int):
            usage.tokens += result["completion_tokens"]
        if req.stream and msg.reply:
            await self.link.nc.publish(
                msg.reply, encoder.encode(DirectResult(result=result)), headers={subjects.STREAM_END_HEADER: "1"}
            )
            return STREAMED
        return DirectResult(result=result)

    async def _run(self, claims: SessionClaims, req: DirectRequest, stream_to: str | None) -> Any:
        """The engine's result, or the error to answer (an engine's code in `details.code`)."""
        timeout_s = min(MAX_REQUEST_S, (claims.expires_at_ms - now_ms()) / 1000)
        a = Assignment(
            job_id=claims.session_id, attempt=1, job_type=claims.job_type, model=claims.model, params=req.params,
            timeout_s=timeout_s,
        )
        refusal = preflight(a, self.engines, self.config.current)
        if refusal is not None:
            raise JobError(refusal.message, {"code": refusal.code})
        streamed = 0

        async def emit(text: str) -> None:
            nonlocal streamed
            assert stream_to is not None
            await self.link.nc.publish(stream_to, encoder.encode(StreamChunk(offset=streamed, text=text)))
            streamed += len(text)

        ctx = JobContext(claims.session_id, 1, req.params, emit=emit if stream_to else None)
        try:
            return await self.run(a, ctx, timeout_s, cancellable=False)
        except Interrupted:
            raise Timeout(f"the request ran past {timeout_s:.0f}s") from None
        except EngineError as exc:
            raise JobError(exc.message, {"code": exc.code, **(exc.details or {})}) from None

    def _read(self, token: str) -> SessionClaims:
        """The token's signed claims; verified once per token and session key (a signature check costs
        more than the rest of a request), then remembered until the session ends."""
        key = (self.config.current.session_key, token)
        claims = self._verified.get(key)
        if claims is None:
            claims = read_token(*key)
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = claims
        return claims

    # --- The platform ends a session -----------------------------------------------------------------

    async def _end(self, msg: Msg) -> SessionUsage:
        req: EndSession = decode(msg.data, EndSession)
        self._ended[req.session_id] = req.reason
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        self._turns.pop(req.session_id, None)
        for key in [key for key, claims in self._verified.items() if claims.session_id == req.session_id]:
            del self._verified[key]
        usage = self._usage.pop(req.session_id, SessionUsage())
        if not self._usage:
            self._collected.set()
        logger.info("direct session %s ended (%s) after %d requests", req.session_id, req.reason, usage.requests)
        return usage
