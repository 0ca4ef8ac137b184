"""How the gateway logs the errors it answers: a refusal it answers on purpose is one line (info for a
4xx, warning for a 503), an unexpected error (a 500) its whole traceback, so a log is not buried under
tracebacks of 404s. The end-to-end check (a real 404 in a real gateway's log) is in test_security_e2e."""

from __future__ import annotations

import logging
import traceback

import pytest
from litestar.exceptions import NotFoundException
from litestar.types import Scope
from nats.errors import NoServersError

from gateway.http import log_error
from sdk.errors import JobNotFound, Unauthorized

SCOPE: Scope = {"type": "http", "method": "GET", "path": "/api/v1/jobs/j-1"}  # type: ignore[typeddict-item]


def log_raised(exc: Exception, caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    caplog.clear()
    try:
        raise exc
    except Exception as raised:
        log_error(logging.getLogger("litestar"), SCOPE, traceback.format_exception(raised))
    [record] = caplog.records
    return record


@pytest.mark.parametrize(
    ("exc", "level", "line"),
    [
        (JobNotFound("job j-1 not found"), logging.INFO, "GET /api/v1/jobs/j-1: 404 job j-1 not found"),
        (Unauthorized("token expired"), logging.INFO, "GET /api/v1/jobs/j-1: 401 token expired"),
        (NotFoundException("Not Found"), logging.INFO, "GET /api/v1/jobs/j-1: 404 Not Found"),
        (NoServersError(), logging.WARNING, "GET /api/v1/jobs/j-1: 503 NoServersError"),
    ],
)
def test_an_answered_error_is_one_line(
    exc: Exception, level: int, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    record = log_raised(exc, caplog)
    assert (record.levelno, record.getMessage()) == (level, line)
    assert record.exc_info is None


def test_an_unexpected_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    record = log_raised(KeyError("surprise"), caplog)
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert message.startswith("GET /api/v1/jobs/j-1: unexpected error\nTraceback")
    assert "KeyError: 'surprise'" in message
