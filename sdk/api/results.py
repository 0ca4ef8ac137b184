"""Large results a worker uploads through the gateway (`api.workers.result.<worker_id>`, signed), which
checks the job's attempt and stores them in the `results` object store (`gateway.results`)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from sdk.api.decoding import Strict, Token

#: The largest result a worker may upload in one request, in bytes.
MAX_RESULT_BYTES = 4 * 1024 * 1024
#: An upload is one JSON message: the bytes base64-encoded plus a little metadata (under the NATS
#: server's 8 MB max_payload).
MAX_UPLOAD_BODY_BYTES = MAX_RESULT_BYTES * 4 // 3 + 4096
#: How many results one job attempt may store.
MAX_RESULTS_PER_ATTEMPT = 16
#: The content types the gateway stores and serves results as.
ResultContentType = Literal["image/png", "image/jpeg", "image/webp"]


class UploadResult(Strict):
    """A worker stores a large result of a job attempt it holds."""

    job_id: Token
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    content_type: ResultContentType
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_RESULT_BYTES)]


class ResultStored(msgspec.Struct, kw_only=True):
    """Where the gateway stored an uploaded result: `<job_id>/<attempt>.<n>`, for the job's result."""

    object: str
