"""The projections' own status (`proj.status`, `gpuctl projections status`): each read model's version,
the position and lag of each folded stream, and the progress of a read-model upgrade in flight."""

from __future__ import annotations

import msgspec

from sdk.api.decoding import Strict


class GetProjectionsStatus(Strict):
    """No fields: the status of whichever projections replica answers."""


class ReadModelStatus(msgspec.Struct, kw_only=True):
    name: str
    #: The version this code folds.
    version: int
    #: The version of the file reads are answered from (older than `version` while an upgrade runs).
    serving_version: int | None


class StreamPosition(msgspec.Struct, kw_only=True):
    stream: str
    #: The last sequence applied to the read models that answer reads.
    position: int
    last_seq: int
    lag: int


class UpgradeProgress(msgspec.Struct, kw_only=True):
    """A new file being folded from the log while the old one answers reads."""

    path: str
    #: Applied so far, and the end of the log it must reach before it takes over (moves while events arrive).
    positions: dict[str, int]
    targets: dict[str, int]
    started_at_ms: int


class ProjectionsStatus(msgspec.Struct, kw_only=True):
    db: str
    models: list[ReadModelStatus]
    streams: list[StreamPosition]
    upgrade: UpgradeProgress | None = None
