"""Turning a job's token stream into text that always ends equal to the job's final result.

Chunks travel on core NATS (`stream.<job_id>`, not in the log), so a reader that subscribes late misses
the start, and nothing is replayed. Each chunk carries its character offset: a reader passes on chunks
while they are contiguous, stops at a gap, and at the end completes the text from the job's result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import msgspec

from sdk.api import JobView, StreamChunk

chunk_decoder = msgspec.json.Decoder(StreamChunk)


class TextAssembler:
    def __init__(self) -> None:
        self.received_chars = 0
        #: True once a chunk was missed: the rest comes from the final text.
        self.gap = False

    def feed(self, data: bytes) -> str | None:
        """The text to pass on for this chunk, or None (a repeat, anything after a gap, or junk, which
        is skipped: it must not end the stream)."""
        try:
            chunk = chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if self.gap or chunk.offset + len(chunk.text) <= self.received_chars:
            return None
        if chunk.offset > self.received_chars:
            self.gap = True
            return None
        text = chunk.text[self.received_chars - chunk.offset :]
        self.received_chars += len(text)
        return text

    def finish(self, job: JobView) -> str:
        """What the reader has not seen yet of a completed job's text."""
        final = job.result.get("text", "") if isinstance(job.result, dict) else ""
        return final[self.received_chars :] if isinstance(final, str) else ""


async def assemble(chunks: asyncio.Queue[bytes], finished: Awaitable[JobView]) -> AsyncIterator[str | JobView]:
    """Text pieces from `chunks` as they come, until `finished` gives the job; then the rest of its
    text, and last the job itself (whatever its status: the caller decides what a failure means)."""
    assembler = TextAssembler()
    done = asyncio.ensure_future(finished)
    try:
        while not done.done():
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
            elif text := assembler.feed(getter.result()):
                yield text
        while not chunks.empty():
            if text := assembler.feed(chunks.get_nowait()):
                yield text
        job = done.result()
        if job.status == "completed" and (rest := assembler.finish(job)):
            yield rest
        yield job
    finally:
        done.cancel()
