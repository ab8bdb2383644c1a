"""The bridge between the async HTTP side and the engine's worker thread: a request's events
arrive in an `asyncio.Queue`; a non-streaming answer collects them, a streaming one turns them
into server-sent events. A client that goes away cancels its request, which frees its row."""

from __future__ import annotations

import asyncio
import contextlib
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

    def cancel(self) -> None:
        self.request.cancelled.set()

    async def next(self) -> Event:
        """The next event (`ClientGone` once `watch` saw the client disconnect)."""
        event = await self.events.queue.get()
        if event.kind == "gone":
            raise ClientGone()
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


async def watch(gen: Generation, http: HttpRequest) -> None:
    """Wait for the client to disconnect; then cancel the request (its row is freed at the
    next step) and wake whoever waits for its events."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    gen.cancel()
    gen.events.queue.put_nowait(Event("gone"))


@contextlib.asynccontextmanager
async def watching(gen: Generation, http: HttpRequest) -> AsyncIterator[None]:
    """`watch` the client while the block waits for events (a streamed response stops
    watching before it starts: the response then notices a disconnect itself)."""
    task = asyncio.create_task(watch(gen, http))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


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


async def collect(gen: Generation) -> tuple[str, str]:
    """(text, finish_reason) once the request has finished."""
    parts: list[str] = []
    while True:
        event = await gen.next()
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


async def first_event(gen: Generation) -> Event:
    """The first event, awaited before a stream starts so an early error gets its status."""
    event = await gen.next()
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
