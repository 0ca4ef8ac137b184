"""Read-decide-write on a JetStream KV bucket: the one compare-and-set loop of the gateway.

A record is read with its revision, a pure `change` decides the new record (or that nothing is to be
written, or raises the refusal), and the write lands only if the key is still at that revision
(`Nats-Expected-Last-Subject-Sequence`; revision 0 means "must not exist"). A writer that lost the race
reads again and decides again, up to `CAS_ATTEMPTS` times, then the caller gets `Conflict`.

A write may carry a per-message TTL (`Nats-TTL`, nats-server 2.11+, on buckets created by nats-py 2.16,
whose streams allow it): the server forgets the record then, which keeps a bucket of short-lived records
(token families, revocation markers, nonces) bounded without a sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, InvalidKeyError, KeyNotFoundError
from nats.js.kv import KeyValue

from sdk.errors import Conflict
from sdk.subjects import Names

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Compare-and-set rounds on one key before giving up with `Conflict`.
CAS_ATTEMPTS = 5
#: How long the server keeps the marker of an expired record: a watcher that starts meanwhile (its first
#: delivery takes well under a second) sees it.
MARKER_TTL_S = 10.0
#: JetStream's answers to a write whose expected last sequence is stale (10164 on a cluster).
_WRONG_LAST_SEQUENCE = (10071, 10164)

_encoder = msgspec.json.Encoder()


class Versioned(NamedTuple, Generic[T]):
    value: T
    revision: int


class Changed(NamedTuple, Generic[T]):
    """What a successful `update` replaced (None: the key did not exist), what it wrote, at which revision."""

    before: T | None
    after: T
    revision: int


class Bucket:
    """A KV bucket with typed reads, compare-and-set writes and per-record TTLs."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, name: str) -> None:
        self.js = js
        self.kv = kv
        self.name = name
        self._prefix = f"$KV.{name}."

    @classmethod
    async def open(cls, js: JetStreamContext, name: str) -> Bucket:
        return cls(js, await js.key_value(name), name)

    async def allow_ttl(self, marker_ttl_s: float = MARKER_TTL_S) -> None:
        """Let writes carry a TTL (a bucket created before nats-py turned that on needs it), and have the
        server leave a delete marker when a record expires: a watcher counting the records it was
        promised (`updates()` returning None) then hears of the expired ones instead of waiting forever."""
        info = await self.js.stream_info(f"KV_{self.name}")
        if not info.config.allow_msg_ttl or not info.config.subject_delete_marker_ttl:
            config = info.config.evolve(allow_msg_ttl=True, subject_delete_marker_ttl=marker_ttl_s)
            await self.js.update_stream(config)
            logger.info("bucket %s now expires records with a TTL, leaving markers for %.0f s", self.name, marker_ttl_s)

    async def load(self, key: str, decode: Callable[[bytes], T]) -> Versioned[T] | None:
        """The record under `key` and its revision, or None."""
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, InvalidKeyError):
            return None
        return Versioned(decode(entry.value or b""), entry.revision or 0)

    async def write(
        self, key: str, value: Any, *, revision: int | None = None, ttl_s: float | None = None
    ) -> int | None:
        """Write `value` (a Struct or builtins, as JSON) and return its revision; with `revision`, only if
        the key is still there (0: only if it does not exist): None when another writer got there first."""
        headers = {} if revision is None else {Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)}
        if ttl_s is not None:
            # Whole seconds, at least one (the server's unit); never shorter than asked.
            headers[Header.MSG_TTL] = f"{max(1, math.ceil(ttl_s))}s"
        try:
            ack = await self.js.publish(f"{self._prefix}{key}", _encoder.encode(value), headers=headers or None)
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return ack.seq

    async def create(self, key: str, value: Any, *, ttl_s: float | None = None) -> int | None:
        """Write `value` only if `key` does not exist; None if it does."""
        return await self.write(key, value, revision=0, ttl_s=ttl_s)

    async def update(
        self,
        key: str,
        decode: Callable[[bytes], T],
        change: Callable[[T | None], T | None],
        *,
        ttl_s: Callable[[T], float | None] | None = None,
        what: str,
    ) -> Changed[T] | None:
        """Read, `change`, write if unchanged meanwhile; retried on a lost race. `change` gets the current
        record (None: absent) and returns the new one, or None when there is nothing to write (then
        `update` returns None), or raises the refusal. `ttl_s` gives a record's TTL (None: no expiry)."""
        for _ in range(CAS_ATTEMPTS):
            loaded = await self.load(key, decode)
            before = loaded.value if loaded is not None else None
            after = change(before)
            if after is None:
                return None
            expected = loaded.revision if loaded is not None else 0
            revision = await self.write(key, after, revision=expected, ttl_s=ttl_s(after) if ttl_s else None)
            if revision is not None:
                return Changed(before, after, revision)
        raise Conflict(f"{what} kept changing")


class KeyMirror:
    """Keys of a bucket mirrored in memory by a KV watch: `start` loads every key of the family `names`,
    then the watch applies each change in the background. Subclasses say what a change does (`apply`)."""

    def __init__(self, kv: KeyValue, names: Names) -> None:
        self._kv = kv
        self._names = names
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        """Whether the mirror is loaded and follows the bucket (between `start` and `stop`)."""
        return self._task is not None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Load every key, then follow changes in the background."""
        self._watcher = await self._kv.watch(self._names.below)
        while (entry := await self._watcher.updates(timeout=timeout_s)) is not None:
            self.apply(entry)
        self._task = asyncio.create_task(self._follow(self._watcher), name=f"watch-{self._names.prefix}")

    async def stop(self) -> None:
        """Idempotent: a second call finds nothing left to stop."""
        watcher, task = self._watcher, self._task
        self._watcher = self._task = None
        if watcher is not None:
            await watcher.stop()
        if task is not None:
            await task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self.apply(entry)

    def apply(self, entry: KeyValue.Entry) -> None:
        raise NotImplementedError
