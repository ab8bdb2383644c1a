"""The HTTP side: an OpenAI-compatible FastAPI app over the engine.

Routes: `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, and (with `allow_adapter_api`) vLLM's
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter`. Every route but `/health`
checks the API key when one is set; bodies over the size limit are refused before they are
read whole; every error body is OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tilpass.serve import bridge
from tilpass.serve.adapters import AdapterCache, AdapterError, check_name, resolve_inside
from tilpass.serve.engine import Engine
from tilpass.serve.metrics import CONTENT_TYPE, ServeMetrics
from tilpass.serve.sampling import SamplingParams
from tilpass.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    Sampling,
    UnloadAdapterRequest,
    parse,
)

BASE_ALIASES = ("base", "__base__")
ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)


@dataclass(frozen=True)
class Limits:
    """What one request and the server as a whole may ask for."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_queue: int = 64
    max_batch: int = 16
    max_body_bytes: int = 1 << 20
    context_length: int | None = None  # the model's; prompt + max_tokens must fit

    def describe(self) -> str:
        return (
            f"max_prompt_tokens={self.max_prompt_tokens} max_tokens={self.max_tokens} "
            f"max_queue={self.max_queue} max_batch={self.max_batch} "
            f"max_body_bytes={self.max_body_bytes}"
        )


@dataclass
class Server:
    """Everything the routes use: the engine, its adapters, the tokenizer and settings."""

    engine: Engine
    adapters: AdapterCache
    tokenizer: Any
    metrics: ServeMetrics
    model_id: str
    limits: Limits
    api_key: str | None = None
    allow_adapter_api: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None = the base model)."""
        if model == self.model_id or model in BASE_ALIASES:
            return None
        try:
            self.adapters.known(model)
        except AdapterError as exc:
            raise ApiError(exc.status, str(exc), code=exc.code, param="model") from None
        return model


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, counting as they arrive."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self.refuse(scope, receive, send)
            return
        counted = 0

        async def limited() -> Message:
            nonlocal counted
            message = await receive()
            counted += len(message.get("body", b""))
            if counted > self.limit:
                raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self.refuse(scope, receive, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, f"the request body is over {self.limit} bytes (--max-body-bytes)")
        await error.response()(scope, receive, send)


class BodyTooLarge(Exception):
    """A body grew past the limit while it was read."""


def create_app(server: Server) -> FastAPI:
    """The FastAPI app; the engine starts and stops with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next: Any) -> Response:
        response = await checked(server, request, call_next)
        path = request.url.path
        route = path if path in ROUTES else "other"  # bounded label values
        server.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, limit=server.limits.max_body_bytes)
    add_routes(app, server)
    return app


async def checked(server: Server, request: HttpRequest, call_next: Any) -> Response:
    """The API key check, then the route, with errors in OpenAI's shape."""
    if server.api_key and request.url.path != "/health":
        sent = request.headers.get("authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {server.api_key}".encode()):
            return ApiError(401, "missing or wrong API key", code="invalid_api_key").response()
    try:
        return await call_next(request)
    except ApiError as exc:
        return exc.response()


def add_routes(app: FastAPI, server: Server) -> None:
    """Attach every route."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards(server)}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        body = parse(CompletionRequest, await request.body())
        prompt = completion_prompt(server, body)
        return await generate(server, request, body, prompt, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest) -> Response:
        body = parse(ChatRequest, await request.body())
        return await generate(server, request, body, chat_prompt(server, body), "chat.completion")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HttpRequest) -> Response:
        body = parse(LoadAdapterRequest, await request.body())
        return await change_adapters(server, "load", body.lora_name, body.lora_path)

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HttpRequest) -> Response:
        body = parse(UnloadAdapterRequest, await request.body())
        return await change_adapters(server, "unload", body.lora_name, None)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(404)
    async def not_found(request: HttpRequest, exc: Exception) -> Response:
        return ApiError(404, f"no route {request.method} {request.url.path}").response()

    @app.exception_handler(405)
    async def not_allowed(request: HttpRequest, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()


def model_cards(server: Server) -> list[dict[str, Any]]:
    """`/v1/models` entries: the base model, then every loaded adapter."""
    base = {
        "id": server.model_id,
        "object": "model",
        "created": server.created,
        "owned_by": "tilpass",
        "root": server.model_id,
        "parent": None,
    }
    adapters = [
        {**base, "id": e.name, "root": e.name, "parent": server.model_id}
        for e in server.adapters.listing()
    ]
    return [base, *adapters]


def completion_prompt(server: Server, body: CompletionRequest) -> list[int]:
    """The prompt's token ids (a string is tokenized as `tokenizer(prompt)` does)."""
    if isinstance(body.prompt, list):
        vocab = len(server.tokenizer)
        if not body.prompt or any(t < 0 or t >= vocab for t in body.prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(body.prompt)
    return list(server.tokenizer(body.prompt)["input_ids"])


def chat_prompt(server: Server, body: ChatRequest) -> list[int]:
    """The conversation through the model's chat template, with the assistant turn opened."""
    if getattr(server.tokenizer, "chat_template", None) is None:
        raise ApiError(
            400, f"the model {server.model_id} has no chat template; use /v1/completions"
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = server.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    return list(server.tokenizer(text, add_special_tokens=False)["input_ids"])


def sampling(server: Server, body: Sampling, prompt: list[int]) -> SamplingParams:
    """The request's decoding settings, checked against the limits."""
    limits = server.limits
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt) > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens, over the limit of {limits.max_prompt_tokens}",
            param="prompt",
        )
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    room = limits.max_tokens
    if limits.context_length is not None:
        room = min(room, limits.context_length - len(prompt))
    if room < 1:
        raise ApiError(400, f"the prompt fills the model's context ({limits.context_length})")
    if asked is not None and asked > room:
        raise ApiError(
            400,
            f"max_tokens={asked} is over what this request may generate ({room}: the server's "
            f"limit {limits.max_tokens}, and the model's context {limits.context_length} minus "
            f"{len(prompt)} prompt tokens)",
            param="max_tokens",
        )
    return SamplingParams(
        max_tokens=asked or room,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
    )


async def generate(
    server: Server, request: HttpRequest, body: Sampling, prompt: list[int], kind: str
) -> Response:
    """Run one completion: stream it as server-sent events, or answer once finished."""
    adapter = server.adapter_for(body.model)
    params = sampling(server, body, prompt)
    gen = bridge.start(server.engine, prompt, adapter, params, kind, body.model)
    server.metrics.prompt_tokens.inc(len(prompt))
    try:
        async with bridge.watching(gen, request):
            if body.stream:
                first = await bridge.first_event(gen)
            else:
                text, finish = await bridge.collect(gen)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = bridge.stream(gen, first, usage)
            return StreamingResponse(events, media_type="text/event-stream")
    except bridge.ClientGone:
        return Response(status_code=499)
    except BaseException:
        gen.cancel()
        raise
    return JSONResponse(bridge.body(gen, text, finish, body.return_token_ids))


async def change_adapters(server: Server, action: str, name: str, path: str | None) -> Response:
    """Load or unload an adapter on the worker thread (vLLM's routes and answers)."""
    if not server.allow_adapter_api:
        raise ApiError(
            404, "adapter loading over HTTP is off; start the server with --allow-adapter-loading"
        )
    adapters = server.adapters
    engine = server.engine
    try:
        check_name(name)
        if name == server.model_id or name in BASE_ALIASES:
            raise AdapterError(f"{name!r} is the base model's name")
        if action == "load":
            target = adapter_path(adapters, path or "")
            future = engine.call(lambda: adapters.load(name, target, pinned=True))
        else:
            future = engine.call(lambda: adapters.unload(name, engine.busy_adapters()))
        await asyncio.wrap_future(future)
    except AdapterError as exc:
        raise ApiError(exc.status, str(exc), code=exc.code, param="lora_name") from None
    done = "added" if action == "load" else "removed"
    return PlainTextResponse(f"Success: LoRA adapter '{name}' {done} successfully.")


def adapter_path(adapters: AdapterCache, path: str) -> Path:
    """An adapter path from a load request, resolved inside the adapter directory (an
    absolute path is accepted only when it lies there)."""
    if adapters.adapter_dir is None:
        raise AdapterError("the server has no --adapter-dir to load adapters from")
    root = adapters.adapter_dir.resolve()
    relative = path
    if Path(path).is_absolute():
        if not Path(path).is_relative_to(root):
            raise AdapterError(f"adapter path {path!r} is outside the adapter directory")
        relative = str(Path(path).relative_to(root))
    return resolve_inside(root, relative)
