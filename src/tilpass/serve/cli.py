"""`tilpass serve`: load the base model and adapters, print the URL, model, adapters and
limits, and serve the OpenAI-compatible API on uvicorn until SIGINT / SIGTERM.

Building the parser imports nothing heavy; the server's modules load when the command runs.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

API_KEY_ENV = "TILPASS_API_KEY"


def add_serve_parser(sub: Any) -> None:
    """The `tilpass serve` subcommand."""
    from tilpass.pretrained import DEFAULT_MODEL

    p = sub.add_parser(
        "serve",
        help="serve the model and its adapters over an OpenAI-compatible HTTP API",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or local directory")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load the adapter in DIR under NAME at start-up (repeatable)",
    )
    p.add_argument("--adapter-dir", default=None, help="load adapters named in requests from here")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--api-key", default=None, help=f"require this key (or set ${API_KEY_ENV})")
    p.add_argument(
        "--allow-adapter-loading",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    limits = p.add_argument_group("limits")
    for flag, default, text in (
        ("--max-prompt-tokens", 4096, "longest prompt accepted, in tokens"),
        ("--max-tokens", 1024, "largest max_tokens a request may ask for"),
        ("--max-queue", 64, "requests that may wait; beyond, answer 429"),
        ("--max-batch", 16, "sequences decoded together"),
        ("--max-body-bytes", 1 << 20, "largest request body"),
        ("--max-adapters", 8, "adapters in the on-demand cache"),
        ("--max-adapter-bytes", 1 << 30, "bytes of adapter files in the on-demand cache"),
        ("--shutdown-timeout", 10, "seconds SIGTERM waits for in-flight requests"),
    ):
        limits.add_argument(flag, type=int, default=default, help=text)
    p.set_defaults(func=cmd_serve)


def parse_adapters(items: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` pairs, checked."""
    from tilpass.serve.adapters import check_name

    pairs = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not directory:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        pairs.append((check_name(name), Path(directory)))
    return pairs


def positive(args: argparse.Namespace) -> None:
    for key in ("max_prompt_tokens", "max_tokens", "max_queue", "max_batch", "max_body_bytes"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1")


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `tilpass serve` until stopped."""
    import uvicorn

    positive(args)
    server = build_server(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # clients that connect before uvicorn accepts wait in the backlog
    host, port = sock.getsockname()[:2]
    adapters = ", ".join(e.name for e in server.adapters.listing()) or "(none)"
    print(
        f"tilpass serve: http://{host}:{port}/v1  model={server.model_id}  adapters={adapters}  "
        f"adapter_dir={args.adapter_dir or '(none)'}  limits: {server.limits.describe()} "
        f"max_adapters={args.max_adapters} max_adapter_bytes={args.max_adapter_bytes}  "
        f"api_key={'on' if server.api_key else 'off'}",
        flush=True,
    )
    from tilpass.serve.api import create_app

    # The engine answers what is still running after --shutdown-timeout with 503; uvicorn
    # waits a little longer, so those answers go out before it closes the connections.
    config = uvicorn.Config(
        create_app(server),
        log_level="warning",
        timeout_graceful_shutdown=args.shutdown_timeout + 2,
    )
    graceful_server(config, lambda: server.engine.begin_stop(args.shutdown_timeout)).run(
        sockets=[sock]
    )
    print("tilpass serve: stopped", flush=True)
    return 0


def graceful_server(config: Any, on_exit: Callable[[], None]) -> Any:
    """uvicorn's server, except that a SIGTERM or SIGINT it shut down on is not raised again
    afterwards (uvicorn re-raises it), so the command ends with its own message and code 0;
    `on_exit` runs as the signal arrives (the engine stops admitting and starts its clock)."""
    import contextlib
    import signal
    import threading
    from collections.abc import Iterator

    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer(config)


def build_server(args: argparse.Namespace) -> Any:
    """Load the model and adapters and build the server's state."""
    import torch

    from tilpass.model import AdaptedModel
    from tilpass.pretrained import load_model
    from tilpass.serve.adapters import AdapterCache
    from tilpass.serve.api import Limits, Server
    from tilpass.serve.engine import Engine
    from tilpass.serve.metrics import ServeMetrics

    pairs = parse_adapters(args.adapter)
    adapter_dir = Path(args.adapter_dir) if args.adapter_dir else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise ValueError(f"--adapter-dir {adapter_dir} is not a directory")
    base, tokenizer = load_model(args.model, dtype=torch.float32)
    model = AdaptedModel(base).eval()
    cache = AdapterCache(model, adapter_dir, args.max_adapters, args.max_adapter_bytes)
    for name, directory in pairs:
        cache.load(name, directory, pinned=True)
    context = getattr(base.config, "max_position_embeddings", None)
    limits = Limits(
        args.max_prompt_tokens,
        args.max_tokens,
        args.max_queue,
        args.max_batch,
        args.max_body_bytes,
        context,
    )
    metrics = ServeMetrics()
    engine = Engine(model, tokenizer, cache, limits.max_batch, limits.max_queue, metrics)
    model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
    return Server(
        engine,
        cache,
        tokenizer,
        metrics,
        model_id,
        limits,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allow_adapter_api=args.allow_adapter_loading,
    )
