"""Schemathesis hooks of `test_openapi_fuzz.py` (named in `openapi_fuzz.toml`).

- The fuzzing stack has no worker, so a job it submits stays queued until its `timeout_s`, and a wait
  or a stream on it lasts as long (up to 7 days). A valid `timeout_s` is shortened to a few seconds,
  so those long polls end soon with `expired`; invalid values are left as they are, to be refused.
- The fuzzer must not stop its own submissions: a valid queue limit it sends becomes "no limit" (the
  route is still called; invalid values are left, to be refused), or every later submission would be
  a 429 and the run would test no more of them.
- The fuzzer must not revoke the API key it runs with (the stateful phase finds its id in the key
  list): every later request would be a 401, and the run would test nothing more.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

#: Long enough to see a job queued; short enough that a stream of it ends inside the run.
JOB_TIMEOUT_S = 2.0
#: The longest `timeout_s` a submission accepts (`sdk.api.SubmitJob`).
MAX_JOB_TIMEOUT_S = 7 * 86400


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    method = case.method.upper()
    if method == "POST" and case.path == "/api/v1/jobs" and isinstance(case.body, dict):
        timeout_s = case.body.get("timeout_s", 300.0)
        if type(timeout_s) in (int, float) and JOB_TIMEOUT_S < timeout_s <= MAX_JOB_TIMEOUT_S:
            case.body["timeout_s"] = JOB_TIMEOUT_S
    if method == "PUT" and case.path == "/api/v1/config/limits" and isinstance(case.body, dict):
        for limit in ("max_queued", "max_queued_per_client"):
            if type(case.body.get(limit)) is int and case.body[limit] >= 0:
                case.body[limit] = None
    own_key = os.environ["GF_FUZZ_API_KEY"].removeprefix("gfk_").partition(".")[0]
    if method == "DELETE" and case.path_parameters and case.path_parameters.get("key_id") == own_key:
        case.path_parameters["key_id"] = "0" * 16  # a key that does not exist: still a real request
