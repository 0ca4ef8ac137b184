"""Continuous batching: every job on one loaded LLM shares one decode loop, in one thread per model.

The jobs that arrive between two decode steps are prefilled together (their prompts left-padded, in
one forward pass), then join the running batch: their KV caches are left-padded to the batch's length and stacked under the others', with an
attention mask that hides the padding and position ids that count only its own tokens, so each row
computes what it would alone. Each step decodes one token for every row. A job that finishes (its
`max_new_tokens`, an end-of-sequence token, a stop string), is cancelled or fails leaves at once: its
row is dropped and padding no row needs any more is trimmed.

Admission is bounded by `max_batch_size` rows and `max_batch_tokens`, the KV-cache budget: each job
reserves its prompt plus its `max_new_tokens`. A job alone is always admitted, so nothing waits forever.

Prefill is bounded too, so jobs joining never stall the ones decoding for long: while rows decode, one
step prefills at most `max_prefill_tokens` prompt tokens. Short prompts join together within that budget;
a longer prompt is prefilled in chunks of it, one chunk between two decode steps, its cache growing until
the whole prompt is in and it joins (chunked prefill, as vLLM and TGI do). An idle model prefills
whatever arrived at once: nobody waits behind it.
A failure inside a job's own code (its sampler, its text) fails that job only; a failed prefill is
retried job by job, so it fails only the job that causes it; a failed decode step fails the jobs in it,
as no row's share of the error can be told apart.
"""

from __future__ import annotations

import collections
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from worker.engines.base import EngineError
from worker.engines.running import delivered_together, on_device

logger = logging.getLogger(__name__)

#: Per layer, the keys and values of every row: [rows, heads, length, head_dim] each.
KV = list[tuple[torch.Tensor, torch.Tensor]]

#: Prompt tokens one step may prefill while rows decode: a decode step waits for at most a forward pass
#: of this many tokens. Large enough that prompts of a few hundred tokens join in one pass.
MAX_PREFILL_TOKENS = 512


@dataclass
class _Chunked:
    """A long prompt being prefilled a chunk per step: its own cache, and how many tokens are in it."""

    sequence: Sequence
    cache: DynamicCache
    done: int = 0


@dataclass(eq=False)
class Sequence:
    """One job as the decode loop sees it. Its callbacks run in the loop's thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    #: The next token from the logits of the last position ([vocab]).
    pick: Callable[[torch.Tensor], int]
    #: Takes each new token; True when the job's text reached a stop string.
    on_token: Callable[[int], bool]
    #: Called once with the finish reason (`stop`, `length`) or the error that ended the job.
    finish: Callable[[str | None, BaseException | None], None]
    eos_ids: frozenset[int]
    #: Set when the job is cancelled or its caller stops waiting.
    halt: threading.Event
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens

    def take(self, token: int) -> str | None:
        """Record one generated token; the finish reason when it ends the job."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        if token in self.eos_ids:
            return "stop"
        if self.on_token(token):
            return "stop"
        return "length" if len(self.tokens) >= self.max_new_tokens else None


class Batcher:
    """The decode loop of one loaded model; `submit` hands it a job, `close` ends it (at unload)."""

    def __init__(self, model: PreTrainedModel, *, max_batch_size: int, max_batch_tokens: int) -> None:
        self.model = model
        # transformers 5 renamed `past_key_values` to `cache`; 4.x knows only the old name.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = MAX_PREFILL_TOKENS
        self._pending: collections.deque[Sequence] = collections.deque()
        #: The long prompt being prefilled in chunks, if any (admitted: it counts as a row).
        self._chunked: _Chunked | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: The batch: its rows in order, their caches stacked, which cache columns are real tokens,
        #: the position of each row's next token, and the token each row feeds next.
        self._rows: list[Sequence] = []
        self._kv: KV = []
        #: The cache the next step extends in place; rebuilt from `_kv` only when rows join or leave.
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        self._next = torch.zeros(0, dtype=torch.long)
        #: The most rows the batch held at once, and the most prompt tokens one forward pass prefilled
        #: while rows were decoding (for tests and benchmarks).
        self.peak_rows = 0
        self.peak_prefill_tokens = 0

    def submit(self, sequence: Sequence) -> None:
        with self._changed:
            if self._closed:
                raise EngineError("model_unloaded", "the model was unloaded")
            self._pending.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llm-batch", daemon=True)
                self._thread.start()
            self._changed.notify()

    def close(self) -> None:
        """Stop taking jobs and wait for the loop to end; jobs still in it end as cancelled."""
        with self._changed:
            self._closed = True
            thread = self._thread
            chunked = [self._chunked.sequence] if self._chunked else []
            for sequence in [*self._pending, *chunked, *self._rows]:
                sequence.halt.set()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._rows and not self._pending and self._chunked is None:
                    self._thread = None  # a later submit starts a new loop
                    return
                # An idle model prefills all that came at once; a busy one bounds what its rows wait for.
                budget = self.max_prefill_tokens if self._rows else sys.maxsize
                joining = self._admit(budget) if self._chunked is None else []
            # What the step sends (tokens, text, finished jobs) reaches the event loop as one wake-up.
            with torch.inference_mode(), delivered_together():
                if self._chunked is not None:
                    self._continue_chunked(budget)
                elif len(joining) == 1 and len(joining[0].prompt_ids) > budget:
                    self._chunked = _Chunked(joining[0], DynamicCache())
                    self._continue_chunked(budget)
                else:
                    self._join(joining)
                self._leave([row for row in self._rows if row.halt.is_set()], "cancelled")
                if self._rows:
                    self._step()

    def _admit(self, budget: int) -> list[Sequence]:
        """The pending jobs that join now, first come first served: within the batch's limits, and whole
        prompts within `budget` tokens (a longer one joins alone, in chunks)."""
        joining: list[Sequence] = []
        reserved = sum(row.reserved_tokens for row in self._rows)
        prompt_tokens = 0
        while self._pending and len(self._rows) + len(joining) < self.max_batch_size:
            candidate = self._pending[0]
            alone = not self._rows and not joining
            if not alone and reserved + candidate.reserved_tokens > self.max_batch_tokens:
                break  # it waits for room rather than being overtaken
            if joining and prompt_tokens + len(candidate.prompt_ids) > budget:
                break  # it joins at the next step
            joining.append(self._pending.popleft())
            reserved += candidate.reserved_tokens
            prompt_tokens += len(candidate.prompt_ids)
            if prompt_tokens > budget:
                break  # a long prompt, prefilled in chunks on its own
        return joining

    def _continue_chunked(self, budget: int) -> None:
        """Prefill the next chunk of the long prompt; once it is all in, the job joins like any other."""
        assert self._chunked is not None
        chunked = self._chunked
        sequence = chunked.sequence
        if sequence.halt.is_set():
            self._chunked = None
            sequence.finish(None, EngineError("cancelled", "the job was cancelled"))
            return
        start, end = chunked.done, min(chunked.done + budget, len(sequence.prompt_ids))
        device = self.model.device
        try:
            out = on_device(
                self.model,
                input_ids=torch.tensor([sequence.prompt_ids[start:end]], device=device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                position_ids=torch.arange(start, end, device=device)[None],
                use_cache=True,
                **{self._cache_arg: chunked.cache},
            )
        except BaseException as exc:
            self._chunked = None
            sequence.finish(None, exc)
            return
        self._note_prefill(end - start)
        chunked.done = end
        if end < len(sequence.prompt_ids):
            return
        self._chunked = None
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        self._add_rows([sequence], _layers(_cache_of(out)), mask, out.logits[:, -1])

    def _join(self, joining: list[Sequence]) -> None:
        """Prefill the jobs admitted together in one forward pass and add the ones that go on as rows.
        If that pass fails, each is prefilled alone, so a failure is charged to its own job only."""
        for sequence in [s for s in joining if s.halt.is_set()]:
            sequence.finish(None, EngineError("cancelled", "the job was cancelled"))
        joining = [s for s in joining if not s.halt.is_set()]
        if not joining:
            return
        try:
            kv, mask, logits = on_device(self._prefill, [s.prompt_ids for s in joining])
        except BaseException as exc:
            if len(joining) > 1:
                for sequence in joining:
                    self._join([sequence])
            else:
                joining[0].finish(None, exc)
            return
        self._note_prefill(int(mask.sum()))
        self._add_rows(joining, kv, mask, logits)

    def _note_prefill(self, tokens: int) -> None:
        if self._rows:
            self.peak_prefill_tokens = max(self.peak_prefill_tokens, tokens)

    def _add_rows(self, joining: list[Sequence], kv: KV, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Give each prefilled job its first token from `logits`; those that go on become rows."""
        going_on: list[int] = []
        tokens: list[int] = []
        for index, sequence in enumerate(joining):
            try:
                token = sequence.pick(logits[index])
                reason = sequence.take(token)
            except BaseException as exc:
                sequence.finish(None, exc)
                continue
            if reason is not None:
                sequence.finish(reason, None)
                continue
            going_on.append(index)
            tokens.append(token)
        if going_on:
            rows = torch.tensor(going_on, device=mask.device)
            kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]
            self._stack([joining[i] for i in going_on], kv, mask.index_select(0, rows), tokens)

    def _prefill(self, prompts: list[list[int]]) -> tuple[KV, torch.Tensor, torch.Tensor]:
        """The prompts left-padded to one width, run at once: their caches, masks and last logits."""
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{self._cache_arg: DynamicCache()},
        )
        return _layers(_cache_of(out)), mask, out.logits[:, -1]

    def _stack(self, sequences: list[Sequence], kv: KV, row_mask: torch.Tensor, tokens: list[int]) -> None:
        """Add prefilled jobs as the batch's last rows, left-padding whichever side is shorter."""
        device = row_mask.device
        width = max(row_mask.shape[1], self._mask.shape[1])
        if self._rows:
            self._kv = [
                (torch.cat([_pad_left(k, width), _pad_left(nk, width)]), torch.cat([_pad_left(v, width), _pad_left(nv, width)]))
                for (k, v), (nk, nv) in zip(self._kv, kv)
            ]
        else:
            self._kv = kv
        self._cache = None
        self._mask = torch.cat([_pad_left(self._mask.to(device), width), _pad_left(row_mask, width)])
        lengths = torch.tensor([len(s.prompt_ids) for s in sequences], device=device)
        self._positions = torch.cat([self._positions.to(device), lengths])
        self._next = torch.cat([self._next.to(device), torch.tensor(tokens, device=device)])
        self._rows += sequences
        self.peak_rows = max(self.peak_rows, len(self._rows))

    def _step(self) -> None:
        mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long, device=self._mask.device)], 1)
        try:
            out = on_device(
                self.model,
                input_ids=self._next[:, None],
                attention_mask=mask,
                position_ids=self._positions[:, None],
                use_cache=True,
                **{self._cache_arg: self._cache or DynamicCache(ddp_cache_data=self._kv)},
            )
        except BaseException as exc:
            logger.warning("a decode step of %d jobs failed: %s", len(self._rows), exc)
            self._leave(list(self._rows), exc)
            return
        self._cache = _cache_of(out)
        self._kv, self._mask = _layers(self._cache), mask
        self._positions = self._positions + 1
        logits = out.logits[:, -1]
        greedy = logits.argmax(dim=-1).tolist()
        ended: dict[int, str | BaseException] = {}
        chosen: list[int] = []
        for index, row in enumerate(self._rows):
            try:
                token = greedy[index] if row.pick is pick_greedy else row.pick(logits[index])
                chosen.append(token)
                if (reason := row.take(token)) is not None:
                    ended[index] = reason
            except BaseException as exc:
                chosen.append(0)
                ended[index] = exc
        self._next = torch.tensor(chosen, device=self._next.device)
        for index, reason in ended.items():
            row = self._rows[index]
            row.finish(None, reason) if isinstance(reason, BaseException) else row.finish(reason, None)
        self._drop(set(ended))

    def _leave(self, rows: list[Sequence], why: str | BaseException) -> None:
        """End `rows` (cancelled, or failed with `why`) and take them out of the batch."""
        if not rows:
            return
        error = EngineError("cancelled", "the job was cancelled") if why == "cancelled" else why
        assert isinstance(error, BaseException)
        for row in rows:
            row.finish(None, error)
        self._drop({index for index, row in enumerate(self._rows) if row in rows})

    def _drop(self, indices: set[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        self._cache = None
        if not keep:
            self._kv, self._mask = [], torch.zeros((0, 0), dtype=torch.long)
            self._positions = self._next = torch.zeros(0, dtype=torch.long)
            return
        rows = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, rows)
        # Columns that are padding in every remaining row hold nothing anyone attends to.
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._mask = mask[:, start:]
        self._kv = [(k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:]) for k, v in self._kv]
        self._positions = self._positions.index_select(0, rows)
        self._next = self._next.index_select(0, rows)


def pick_greedy(logits: torch.Tensor) -> int:
    """The most likely token (the decode loop takes it for the whole batch at once)."""
    return int(logits.argmax())


def _cache_of(out: Any) -> Any:
    return getattr(out, "cache", None) or out.past_key_values


def _layers(cache: Any) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros before its last-but-one (cache) or last (mask) dimension up to `width`."""
    dim = -2 if tensor.dim() == 4 else -1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)
