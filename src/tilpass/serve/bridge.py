"""The bridge between the async HTTP side and the engine's worker thread: a request's events
arrive in an `asyncio.Queue`; a non-streaming answer collects them, a streaming one turns them
into server-sent events. A client that goes away cancels its request, which frees its row."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request as HttpRequest

from tilpass.serve.engine import Engine, Event, Overloaded, Request
from tilpass.serve.sampling import SamplingParams
from tilpass.serve.schemas import ApiError

DISCONNECT_POLL_S = 0.25


class EventQueue:
    """Thread-safe sink for the engine: events land in an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class Generation:
    """One accepted request as the HTTP side sees it."""

    request: Request
    events: EventQueue
    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    next_check: float = 0.0  # monotonic time of the next check for a disconnected client

    def cancel(self) -> None:
        self.request.cancelled.set()

    async def next(self, http: HttpRequest | None = None) -> Event:
        """The next event; a non-streaming caller checks for a client that went away every
        `DISCONNECT_POLL_S` seconds, also while tokens keep arriving."""
        while True:
            if http is not None and time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await http.is_disconnected():
                    self.cancel()
                    raise ClientGone()
            try:
                event = await asyncio.wait_for(self.events.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if event.kind == "token" and event.token is not None:
                self.completion_tokens += 1
                self.token_ids.append(event.token)
            return event

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def start(
    engine: Engine,
    prompt: list[int],
    adapter: str | None,
    params: SamplingParams,
    kind: str,
    model: str,
) -> Generation:
    """Submit a request to the engine (429 / 503 at once when it has no room)."""
    events = EventQueue(asyncio.get_running_loop())
    request = Request(uuid.uuid4().hex, adapter, prompt, params, events)
    try:
        engine.submit(request)
    except Overloaded as exc:
        raise ApiError(exc.status, str(exc), code="overloaded") from None
    return Generation(request, events, kind, model, len(prompt))


def raise_error(event: Event) -> None:
    """An engine error event as an `ApiError`."""
    if event.kind == "error":
        raise ApiError(event.status, event.message)


async def collect(gen: Generation, http: HttpRequest) -> tuple[str, str]:
    """(text, finish_reason) once the request has finished."""
    parts: list[str] = []
    while True:
        event = await gen.next(http)
        raise_error(event)
        if event.kind == "finish":
            return "".join(parts), event.finish_reason or "stop"
        parts.append(event.text)


def body(gen: Generation, text: str, finish: str, with_ids: bool) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    entry: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if gen.kind == "text_completion":
        entry["text"] = text
    else:
        entry["message"] = {"role": "assistant", "content": text}
    if with_ids:
        entry["token_ids"] = list(gen.token_ids)
    return {
        "id": prefix(gen) + gen.id,
        "object": gen.kind,
        "created": gen.created,
        "model": gen.model,
        "choices": [entry],
        "usage": gen.usage(),
    }


def prefix(gen: Generation) -> str:
    return "cmpl-" if gen.kind == "text_completion" else "chatcmpl-"


def chunk(gen: Generation, entry: dict[str, Any] | None, usage: bool = False) -> str:
    """One server-sent event with a streamed chunk."""
    payload: dict[str, Any] = {
        "id": prefix(gen) + gen.id,
        "object": "text_completion" if gen.kind == "text_completion" else "chat.completion.chunk",
        "created": gen.created,
        "model": gen.model,
        "choices": [] if entry is None else [entry],
    }
    if usage:
        payload["usage"] = gen.usage()
    return f"data: {json.dumps(payload)}\n\n"


def stream_entry(gen: Generation, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    """A streamed `choices[0]`: `text` for completions, a `delta` for chat."""
    entry: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if gen.kind == "text_completion":
        entry["text"] = text
    elif finish is not None and not text:
        entry["delta"] = {}
    else:
        entry["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    return entry


async def first_event(gen: Generation, http: HttpRequest) -> Event:
    """The first event, awaited before a stream starts so an early error gets its status."""
    event = await gen.next(http)
    raise_error(event)
    return event


async def stream(gen: Generation, first: Event, with_usage: bool) -> AsyncIterator[str]:
    """Server-sent events ending in `data: [DONE]`; closing it early cancels the request."""
    try:
        if gen.kind == "chat.completion":
            yield chunk(gen, stream_entry(gen, "", None, first=True))
        event = first
        while event.kind != "finish":
            if event.kind == "error":  # after the headers went out: report it in the stream
                yield f"data: {json.dumps({'error': {'message': event.message}})}\n\n"
                return
            if event.text:
                yield chunk(gen, stream_entry(gen, event.text, None, first=False))
            event = await gen.next()
        yield chunk(gen, stream_entry(gen, "", event.finish_reason, first=False))
        if with_usage:
            yield chunk(gen, None, usage=True)
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # a no-op once finished; frees the row when the client went away
