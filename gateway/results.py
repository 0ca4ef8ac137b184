"""Large results (images) in the `results` object store, written and read only by the gateway.

Workers cannot touch the object store (their NATS identities have no `$O.>` or stream API subjects): a
worker uploads a result of the job attempt it holds, signed, to `api.workers.result.<worker_id>`; the
gateway checks that the attempt is the worker's now, caps the size (`MAX_RESULT_BYTES`) and the count
per attempt (`MAX_RESULTS_PER_ATTEMPT`), and stores it create-only as `<job_id>/<attempt>.<n>` with
the content type it checked. Serving, it reads only objects named under the job's own id, and answers
with the content type stored with the object, not one a result claims.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError, ObjectNotFoundError

from sdk import subjects
from sdk.api import (
    MAX_RESULTS_PER_ATTEMPT,
    MAX_UPLOAD_BODY_BYTES,
    ResultContentType,
    ResultStored,
    UploadResult,
    decode,
)
from sdk.errors import Conflict, JobNotFound, StaleAttempt
from sdk.jobs import HELD_BY_WORKER, Job

logger = logging.getLogger(__name__)

CONTENT_TYPE_HEADER = "Content-Type"


def decode_upload(data: bytes) -> UploadResult:
    """The upload in a request body; `BadRequest` (nothing stored) when it is too large or malformed."""
    upload: UploadResult = decode(data, UploadResult, max_bytes=MAX_UPLOAD_BODY_BYTES)
    return upload


async def store_result(js: JetStreamContext, job: Job | None, worker_id: str, upload: UploadResult) -> ResultStored:
    """Store `upload` for the attempt `worker_id` holds now; refused (nothing stored) otherwise."""
    if job is None:
        raise JobNotFound(f"job {upload.job_id} not found")
    if job.worker_id != worker_id or job.attempt != upload.attempt or job.status not in HELD_BY_WORKER:
        raise StaleAttempt(
            f"job {job.id} is at attempt {job.attempt} on {job.worker_id} ({job.status.value}); "
            f"{worker_id} uploaded for attempt {upload.attempt}",
            {"attempt": job.attempt},
        )
    store = await js.object_store(subjects.RESULTS_BUCKET)
    for n in range(MAX_RESULTS_PER_ATTEMPT):
        name = f"{job.id}/{upload.attempt}.{n}"
        try:
            await store.get_info(name)
        except (ObjectNotFoundError, NotFoundError):
            meta = js_api.ObjectMeta(name=name, headers={CONTENT_TYPE_HEADER: [upload.content_type]})
            await store.put(name, upload.data, meta=meta)
            logger.info("stored result %s (%d bytes, %s) from %s", name, len(upload.data), upload.content_type, worker_id)
            return ResultStored(object=name)
    raise Conflict(f"job {job.id} attempt {upload.attempt} already stored {MAX_RESULTS_PER_ATTEMPT} results")


async def read_result(js: JetStreamContext, job: Job, index: int) -> tuple[bytes, str]:
    """The bytes and content type of a completed job's result `index`: an object of this job only."""
    refs = job.result.get("images", []) if isinstance(job.result, dict) else []
    if not 0 <= index < len(refs) or not isinstance(refs[index], dict):
        raise JobNotFound(f"job {job.id} has no stored result {index} ({len(refs)} stored)")
    name = refs[index].get("object")
    if not isinstance(name, str) or not name.startswith(f"{job.id}/"):
        # A result may only name what the gateway stored for this job (`store_result`).
        raise JobNotFound(f"result {index} of job {job.id} is not stored by the platform")
    store = await js.object_store(subjects.RESULTS_BUCKET)
    try:
        obj = await store.get(name)
    except (ObjectNotFoundError, NotFoundError):
        raise JobNotFound(f"result {index} of job {job.id} is no longer stored") from None
    stored_type = ((obj.info.headers or {}).get(CONTENT_TYPE_HEADER) or [""])[0]
    if stored_type not in ResultContentType.__args__:  # type: ignore[attr-defined]
        raise JobNotFound(f"result {index} of job {job.id} was not stored by the platform")
    return obj.data or b"", stored_type
