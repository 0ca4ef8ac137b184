"""Group commit for the JOBS stream: appends issued while a batch is on its way go together in the next
one, as a JetStream atomic batch (ADR-50), so a burst of appends costs the server one fsync per batch
instead of one per event.

Nothing is given up for it. Every event keeps its own expected sequence (checked by the server for each
message of a batch), each caller is answered only once its batch is stored and fsynced, and a batch lands
whole or not at all. A batch the server refuses as a whole (one expected sequence moved: another writer got
there first) is appended again one event at a time, so every caller gets its own outcome, the same
`PubAck` or `WrongLastSequence` that `sdk.log.append` would have given it. An append with a message id
(idempotent submission: the server's de-duplication does not apply inside atomic batches) goes alone.

A lone append is sent at once, as before; batches form only while a batch is in flight, so the group
commit adds no latency when the log is idle. The JOBS stream allows atomic batches (`sdk.log`); a server
or stream without them refuses the first batch, and the appender sends one event at a time from then on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import msgspec
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NoStreamResponseError

from sdk import subjects
from sdk.events import Event, encoder
from sdk.log import append, append_headers, refusal

logger = logging.getLogger(__name__)

#: The most events in one atomic batch (the server refuses batches over 1,000 messages).
MAX_BATCH = 500
#: How long the commit of a batch may take before its outcome counts as unknown (as a lone publish's).
COMMIT_TIMEOUT_S = 5.0


class _Outcome(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    count: int = 0
    error: dict[str, object] | None = None


_outcome = msgspec.json.Decoder(_Outcome)


@dataclass(eq=False)
class _Pending:
    subject: str
    data: bytes
    headers: dict[str, str]
    expected_seq: int | None
    done: asyncio.Future[js_api.PubAck]


class GroupCommit:
    """Appends to JOBS subjects, grouped into atomic batches under load; `append` as `sdk.log.append`."""

    def __init__(self, js: JetStreamContext, max_batch: int = MAX_BATCH) -> None:
        self._js = js
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        #: False once the server refused atomic batches themselves: one event at a time from then on.
        self.atomic = True

    async def append(
        self, subject: str, event: Event, *, expected_seq: int | None = None, msg_id: str | None = None
    ) -> js_api.PubAck:
        """Append one event (see `sdk.log.append`), in the next batch."""
        if msg_id is not None or not self.atomic:
            return await append(self._js, subject, event, expected_seq=expected_seq, msg_id=msg_id)
        done: asyncio.Future[js_api.PubAck] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(subject, encoder.encode(event), append_headers(event, expected_seq), expected_seq, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return await done

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                if len(batch) == 1 or not self.atomic or not await self._atomic(batch):
                    await self._one_by_one(batch)
            except Exception as exc:  # the flusher must answer every caller, whatever happened
                for pending in batch:
                    _settle(pending.done, error=exc)

    async def _atomic(self, batch: list[_Pending]) -> bool:
        """Send `batch` as one atomic batch; False when the server refused it as a whole."""
        nc = self._js._nc
        batch_id = secrets.token_hex(8)
        for n, pending in enumerate(batch[:-1], 1):
            headers = {**pending.headers, js_api.Header.BATCH_ID: batch_id, js_api.Header.BATCH_SEQUENCE: str(n)}
            await nc.publish(pending.subject, pending.data, headers=headers)
        last = batch[-1]
        headers = {**last.headers, js_api.Header.BATCH_ID: batch_id, js_api.Header.BATCH_SEQUENCE: str(len(batch)),
                   js_api.Header.BATCH_COMMIT: "1"}
        try:
            reply = await nc.request(last.subject, last.data, headers=headers, timeout=COMMIT_TIMEOUT_S)
        except Exception as exc:  # the outcome is unknown, as for a lone publish that timed out
            if isinstance(exc, NoRespondersError):
                # What `js.publish` says for it: no stream leader answers now (failing over); callers map
                # it to "unavailable, try again", never to an internal error.
                exc = NoStreamResponseError()
            for pending in batch:
                _settle(pending.done, error=exc)
            return True
        outcome = _outcome.decode(reply.data)
        if outcome.error is not None:
            if outcome.error.get("err_code") not in subjects.WRONG_LAST_SEQUENCE_ERR_CODES:
                self.atomic = False
                logger.warning("JOBS refused an atomic batch (%s); appending one event at a time", outcome.error)
            return False
        first_seq = outcome.seq - outcome.count + 1  # an atomic batch is stored contiguously
        for n, pending in enumerate(batch):
            _settle(pending.done, js_api.PubAck(stream=outcome.stream, seq=first_seq + n))
        return True

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        async def one(pending: _Pending) -> None:
            try:
                ack = await self._js.publish(pending.subject, pending.data, headers=pending.headers)
            except APIError as exc:
                _settle(pending.done, error=refusal(exc, pending.subject, pending.expected_seq))
            except Exception as exc:
                _settle(pending.done, error=exc)
            else:
                _settle(pending.done, ack)

        await asyncio.gather(*(one(pending) for pending in batch))


def _settle(done: asyncio.Future[js_api.PubAck], ack: js_api.PubAck | None = None, *, error: Exception | None = None) -> None:
    """Answer a caller, unless it stopped waiting (cancelled)."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(ack)  # type: ignore[arg-type]
