"""The HTTP API against its own OpenAPI document: a bounded schemathesis run as an operator finds no
server error, every response conforms to the document, and what the document allows is accepted.
The document's constraints are the server's (job types, ranges, patterns, no unknown fields)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sdk.local import LocalStack
from tests.conftest import running_stack

CONFIG = Path(__file__).with_name("openapi_fuzz.toml")
#: The whole run (every phase, about 1,000 cases) takes about 20 s on two idle cores; this leaves room
#: for a busy machine inside the test's 120 s.
FUZZ_TIMEOUT_S = 110


@pytest.fixture(scope="module")
async def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """A platform of the fuzzer's own (it creates keys and jobs by the hundred), without workers."""
    async with running_stack(tmp_path_factory.mktemp("fuzz"), []) as stack:
        yield stack


@pytest.fixture
async def operator(fuzz_stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fuzz_stack.http_url) as raw:
        tokens = (await raw.post("/api/v1/auth/token", json={"api_key": fuzz_stack.operator_key})).json()
        raw.headers["Authorization"] = f"Bearer {tokens['access_token']}"
        yield raw


async def test_min_seq_beyond_the_end_of_the_log_is_refused_at_once(operator: httpx.AsyncClient) -> None:
    submitted = (await operator.post("/api/v1/jobs", json={"type": "echo"})).json()
    last = submitted["seq"]
    for path in (f"/api/v1/jobs/{submitted['id']}", "/api/v1/jobs"):
        started = time.monotonic()
        response = await operator.get(path, params={"min_seq": last + 10_000})
        assert time.monotonic() - started < 2, "a min_seq that can never be reached must not be waited for"
        assert response.status_code == 400
        body = response.json()
        assert body["code"] == "bad_request"
        assert body["details"]["min_seq"] == last + 10_000 and body["details"]["last_seq"] >= last
        assert f"beyond the end of JOBS (its last sequence is {body['details']['last_seq']})" in body["message"]
    read = await operator.get(f"/api/v1/jobs/{submitted['id']}", params={"min_seq": last})
    assert (read.status_code, read.json()["id"]) == (200, submitted["id"])


async def test_the_document_publishes_what_the_server_enforces(operator: httpx.AsyncClient) -> None:
    document = (await operator.get("/schema/openapi.json")).json()
    schemas = document["components"]["schemas"]
    submit = schemas["SubmitJob"]
    assert submit["properties"]["type"]["enum"] == ["echo", "llm", "image", "embedding"]
    assert submit["additionalProperties"] is False
    assert (submit["if"]["properties"]["type"]["enum"], submit["then"]["required"]) == (["llm", "image", "embedding"], ["model"])
    opening = schemas["OpenSession"]
    assert opening["then"]["required"] == ["model"] and opening["allOf"] == submit["allOf"]
    assert [rule["then"]["required"] for rule in submit["allOf"]] == [["region"], ["region"]]
    assert schemas["IssueTokens"]["properties"]["api_key"]["pattern"].startswith("^gfk_")
    assert schemas["CreateEnrollment"]["properties"]["ttl_s"]["maximum"] == 30 * 86400
    defaults = document["paths"]["/api/v1/config/defaults"]["put"]["requestBody"]["content"]["application/json"]
    assert defaults["schema"] == {"$ref": "#/components/schemas/WorkerConfigChanges"}
    assert set(document["paths"]["/api/v1/jobs"]["post"]["responses"]) >= {"201", "200", "400", "401", "503"}

    # ... and the server refuses what the document excludes, with the reason.
    for body, reason in [
        ({"type": "llm"}, "`model` is required for llm jobs"),
        ({"type": "echo", "colour": "red"}, "unknown field `colour`"),
        ({"type": "sleep"}, "Invalid enum value 'sleep'"),
        ({"type": "echo", "priority": 1001}, "Expected `int` <= 1000"),
    ]:
        response = await operator.post("/api/v1/jobs", json=body)
        assert (response.status_code, response.json()["code"]) == (400, "bad_request"), body
        assert reason in str(response.json()), response.json()
    response = await operator.put("/api/v1/config/defaults", json={"max_concurrency": 0})
    assert (response.status_code, response.json()["code"]) == (400, "bad_request")
    response = await operator.get("/api/v1/workers/bad%20id")
    assert response.status_code == 400, "an id that cannot be a subject token is bad input, not a server error"


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzz_stack: LocalStack, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color",
        "run", f"{fuzz_stack.http_url}/schema/openapi.json", "--seed", "1",
    ]
    env = {**os.environ, "GF_FUZZ_API_KEY": fuzz_stack.operator_key or ""}
    log = tmp_path / "schemathesis.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT)
        try:
            await asyncio.wait_for(process.wait(), FUZZ_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"schemathesis ran over {FUZZ_TIMEOUT_S}s:\n{log.read_text()[-4000:]}") from None
    report = log.read_text(errors="replace")
    assert process.returncode == 0, report[-8000:]
    assert "Selected: 38/38" in report and "Stateful" in report, report[-3000:]
