"""The continuous-batching engine: one worker thread runs prefill and decode steps.

Named state: `waiting` (requests not started, FIFO), `running` (one `Sequence` per row of the
batch) and the batch's KV cache. Each step, in order:

1. run queued commands (adapter load / unload) between steps, so the model never changes
   under a forward pass;
2. drop cancelled sequences (a client that went away) and free their rows;
3. admit waiting requests up to `max_batch` rows, loading their adapters on demand;
4. run the model, in one of two ways, chosen once per engine (`use_packed`):
   - packed (`packed.PackedBatch`, for models whose attention goes through Hugging Face's
     attention registry with SDPA): one forward pass over the new tokens of every sequence
     laid end to end, decode tokens and prompt chunks together, each token routed to its
     own adapter, keys and values in a fixed slot per sequence (`slots.SlotCache`);
   - padded (any other model): the admitted prompts in one left-padded prefill pass whose
     rows then join `batch` (`kv.BatchCache`), and one decode pass for every running row.

Either way a row's positions and the keys it attends to are what its own `generate` call
would use, so greedy output equals that adapter's `generate` output token for token.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from tilpass.inputs import extend_inputs
from tilpass.routing import BASE_ID, Routing, routed
from tilpass.serve.adapters import AdapterCache, AdapterError, CacheFull
from tilpass.serve.kv import BatchCache
from tilpass.serve.packed import MAX_STEP_TOKENS, PackedBatch
from tilpass.serve.sampling import SamplingParams, TextTracker, next_tokens
from tilpass.serve.slots import supports_slots


@dataclass
class Event:
    """What the engine tells a request's consumer: new text, the end, or an error."""

    kind: str  # "token", "finish" or "error"
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    status: int = 500
    message: str = ""


@dataclass
class Request:
    """One generation request, as submitted (adapter None = the base model)."""

    id: str
    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)


@dataclass
class Sequence:
    """A running request's state: its text so far, its generator and its last token."""

    request: Request
    tracker: TextTracker
    generator: torch.Generator | None
    last: int = -1
    first_token_at: float | None = None

    @property
    def generated(self) -> int:
        return len(self.tracker.tokens)


class Overloaded(Exception):
    """The queue is full or the engine is stopping: answer 429 / 503 at once."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Observer:
    """Hooks the engine calls (metrics); the default does nothing."""

    def on_step(self, waiting: int, running: int, adapters: int) -> None: ...
    def on_first_token(self, seq: Sequence) -> None: ...
    def on_finish(self, seq: Sequence, reason: str) -> None: ...


class Engine:
    """Continuous batching over an `AdaptedModel`, on one worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapters: AdapterCache,
        max_batch: int = 16,
        max_queue: int = 64,
        observer: Observer | None = None,
        packed: bool | None = None,
        max_step_tokens: int = MAX_STEP_TOKENS,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self.batch = BatchCache()
        self.decode_routing: Routing | None = None  # kept while the batch's rows stay the same
        self.commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.deadline: float | None = None  # when stopping: running requests end by then
        self.thread = threading.Thread(target=self.loop, name="tilpass-engine", daemon=True)
        self.device = next(model.parameters()).device  # inputs go there; sampling on CPU
        self.eos = eos_ids(model, tokenizer)
        self.pad = pad_id(tokenizer)
        self.cache_keyword = (
            "cache" if accepts(model.get_base_model(), "cache") else ("past_key_values")
        )
        self.max_step_tokens = max_step_tokens
        self.use_packed = supports_slots(model.get_base_model()) if packed is None else packed
        self.packed = self.new_packed()

    def new_packed(self) -> PackedBatch | None:
        """An empty packed batch (None on the padded path)."""
        if not self.use_packed:
            return None
        return PackedBatch(self.model, self.max_batch, self.max_step_tokens)

    # -- the API side (any thread) ----------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request, or raise `Overloaded` at once when there is no room."""
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down", 503)
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(
                    f"the queue is full ({self.max_queue} waiting requests); retry later", 429
                )
            self.waiting.append(request)
            self.cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the worker thread between two steps; its result comes in the future."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down", 503)
            self.commands.append((fn, future))
            self.cond.notify()
        return future

    def busy_adapters(self) -> set[str]:
        """Adapters that running sequences use (worker thread)."""
        return {s.request.adapter for s in self.running if s.request.adapter is not None}

    def counts(self) -> tuple[int, int]:
        """(waiting, running) now."""
        with self.cond:
            return len(self.waiting), len(self.running)

    def begin_stop(self, grace: float) -> None:
        """Refuse new work and answer waiting requests 503 now; running sequences may finish
        within `grace` seconds, after which they are answered 503 too (a second call keeps
        the first deadline)."""
        with self.cond:
            if self.stopping:
                return
            self.stopping = True
            self.deadline = time.monotonic() + grace
            waiting, self.waiting = list(self.waiting), deque()
            self.cond.notify()
        for request in waiting:
            request.sink(Event("error", status=503, message="the server is shutting down"))

    def stop(self, timeout: float = 10.0) -> None:
        """`begin_stop(timeout)`, then wait for the worker thread to finish."""
        self.begin_stop(timeout)
        if self.thread.ident is not None:
            self.thread.join(timeout + 5.0)

    # -- the worker thread ------------------------------------------------------------------
    def loop(self) -> None:
        """Step until stopped and idle."""
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.commands or self.stopping):
                    self.cond.wait()
                if self.stopping and not self.running and not self.commands:
                    return
            self.run_commands()
            if self.stopping and self.deadline is not None and time.monotonic() > self.deadline:
                message = "the server shut down before this request finished (--shutdown-timeout)"
                self.fail_all(message, status=503)
                continue
            try:
                self.step()
            except Exception as exc:  # a bug or out of memory: fail the batch, keep serving
                traceback.print_exc()
                self.fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")

    def run_commands(self) -> None:
        while True:
            with self.cond:
                if not self.commands:
                    return
                fn, future = self.commands.popleft()
            self.decode_routing = None  # the model's adapters may change
            try:
                with torch.no_grad():
                    future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def step(self) -> None:
        """One scheduling step: retire cancelled rows, admit and prefill, decode."""
        self.retire([i for i, s in enumerate(self.running) if s.request.cancelled.is_set()])
        admitted = self.admit()
        if self.packed is not None:
            self.packed_step(admitted)
        else:
            if admitted:
                self.prefill(admitted)
            if self.running:
                self.decode()
        waiting, running = self.counts()
        self.observer.on_step(waiting, running, len(self.adapters.listing()))

    def admit(self) -> list[Sequence]:
        """Take waiting requests into the batch while rows are free."""
        admitted: list[Sequence] = []
        while len(self.running) + len(admitted) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            if request.cancelled.is_set():
                continue
            if request.adapter is not None:
                busy = self.busy_adapters() | {
                    s.request.adapter for s in admitted if s.request.adapter
                }
                try:
                    self.adapters.ensure(request.adapter, busy)
                except CacheFull as exc:
                    if not busy:  # nothing will free a slot: answer now
                        request.sink(Event("error", status=exc.status, message=str(exc)))
                        continue
                    with self.cond:  # wait at the front until a running sequence finishes
                        self.waiting.appendleft(request)
                    break
                except AdapterError as exc:
                    request.sink(Event("error", status=exc.status, message=str(exc)))
                    continue
            tracker = TextTracker(self.tokenizer, request.params.stop)
            admitted.append(Sequence(request, tracker, request.params.generator()))
        return admitted

    def adapter_id(self, seq: Sequence) -> int:
        """A row's adapter id (-1 = base), looked up now (ids are stable)."""
        name = seq.request.adapter
        return BASE_ID if name is None else int(self.model.adapter_id(name))

    def row_ids(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's adapter id (-1 = base)."""
        ids = [self.adapter_id(s) for s in seqs]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def packed_step(self, admitted: list[Sequence]) -> None:
        """The admitted sequences take slots; one packed pass feeds every running sequence
        its next token or prompt chunk, and the rows whose input ended get a token."""
        assert self.packed is not None
        self.running.extend(admitted)  # first: a failure below then answers them too
        for seq in admitted:
            self.packed.join(id(seq), self.adapter_id(seq), seq.request.prompt)
        if not self.running:
            return
        keys, logits = self.packed.step([(id(s), s.last) for s in self.running])
        by_key = {id(s): s for s in self.running}
        if keys:
            self.emit([by_key[k] for k in keys], logits)

    def prefill(self, seqs: list[Sequence]) -> None:
        """Run the admitted prompts (left-padded) and add their rows to the batch."""
        width = max(len(s.request.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            prompt = s.request.prompt
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        routing = Routing(self.row_ids(seqs))
        layers = [layer for layer in self.model.adapter_layer_list() if layer.EXTENDS_INPUTS]
        _, kwargs = extend_inputs(layers, (), kwargs, routing)
        cache = DynamicCache()
        logits = self.forward(kwargs, cache, routing)
        self.batch.append(cache, kwargs["attention_mask"])
        self.running.extend(seqs)
        self.decode_routing = None
        self.emit(seqs, logits)

    def decode(self) -> None:
        """One token for every running row."""
        mask, positions = self.batch.step_inputs()
        ids = torch.tensor([[s.last] for s in self.running], dtype=torch.long, device=self.device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        assert self.batch.cache is not None
        if self.decode_routing is None:  # its token grouping is then built once, not per step
            self.decode_routing = Routing(self.row_ids(self.running))
        logits = self.forward(kwargs, self.batch.cache, self.decode_routing)
        self.emit(list(self.running), logits)

    def forward(self, kwargs: dict[str, Any], cache: DynamicCache, routing: Routing) -> Any:
        """Last-position logits (B, V) of one pass through the base model, routed per row."""
        kwargs = {**kwargs, self.cache_keyword: cache, "use_cache": True, "logits_to_keep": 1}
        with torch.inference_mode(), routed(routing):
            out = self.model.get_base_model()(**kwargs)
        return out.logits[:, -1].float().cpu()  # (B, V)

    def emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each row's token, send its text, and retire the rows that finished."""
        tokens = next_tokens(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        finished: set[int] = set()
        for seq, token in zip(seqs, tokens, strict=True):
            seq.last = token
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.observer.on_first_token(seq)
            special = token in self.eos and not seq.request.params.ignore_eos
            text = seq.tracker.add(token, special)
            seq.request.sink(Event("token", text=text, token=token))
            reason = finish_reason(seq, special)
            if reason is not None:
                rest = seq.tracker.flush()
                if rest:
                    seq.request.sink(Event("token", text=rest))
                seq.request.sink(Event("finish", finish_reason=reason))
                self.observer.on_finish(seq, reason)
                finished.add(id(seq))
        self.retire([i for i, s in enumerate(self.running) if id(s) in finished])

    def retire(self, rows: list[int]) -> None:
        """Remove rows from the batch (finished or cancelled)."""
        if not rows:
            return
        for row in rows:
            seq = self.running[row]
            if seq.request.cancelled.is_set():
                self.observer.on_finish(seq, "cancelled")
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        if self.packed is not None:
            for row in rows:
                self.packed.leave(id(self.running[row]))
        else:
            self.batch.keep(keep)
        self.running = [self.running[i] for i in keep]
        self.decode_routing = None

    def fail_all(self, message: str, status: int = 500) -> None:
        """Answer every running request with an error and start an empty batch."""
        for seq in self.running:
            seq.request.sink(Event("error", status=status, message=message))
            self.observer.on_finish(seq, "cancelled" if status == 503 else "error")
        self.running = []
        self.batch = BatchCache()
        self.packed = self.new_packed()
        self.decode_routing = None


def finish_reason(seq: Sequence, special: bool) -> str | None:
    """ "stop" (end of sequence or a stop string), "length" (max_tokens) or None."""
    if special or seq.tracker.stopped:
        return "stop"
    if seq.generated >= seq.request.params.max_tokens:
        return "length"
    return None


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a sequence: the generation config's (as `generate` uses), else
    the tokenizer's end-of-sequence token."""
    config = getattr(model.get_base_model(), "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def pad_id(tokenizer: Any) -> int:
    """The token that fills padded (masked) prompt positions."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def accepts(module: Any, keyword: str) -> bool:
    """Whether `module.forward` takes `keyword` (the KV cache argument was renamed)."""
    import inspect

    return keyword in inspect.signature(module.forward).parameters
