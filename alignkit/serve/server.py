"""`alignkit serve --model M`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

```
alignkit serve --model smollm2-135m-instruct            # http://127.0.0.1:8000/  (the page), /v1/... (the API)
```

Pieces: `protocol` (the OpenAI wire format, pure), `worker` (the thread that owns the decoding `Scheduler`),
`api` (the starlette app), this module (loading, the command, and `BackgroundServer` for tests and benchmarks).
docs/serving.md describes the API, the batching design and measured throughput.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from alignkit.errors import CheckpointError, ConfigError, UserError
from alignkit.generation.cli import load_model
from alignkit.model import DTYPES

if TYPE_CHECKING:
    from alignkit.serve.worker import BatchWorker, SchedulerLike

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[serve]"'


def require_web_stack() -> None:
    """Fail with the install command when the optional web packages are missing."""
    missing = []
    for name in ("starlette", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"alignkit serve needs {' and '.join(missing)}, which are not installed; run "
                        f"`{INSTALL_HINT}` (or `pip install {' '.join(missing)}`).")


def add_serve_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve a model over HTTP: POST /v1/chat/completions and /v1/completions (streamed or not), GET "
        "/v1/models and /health, and a chat page at /. Concurrent requests are decoded together (continuous "
        "batching). Binds 127.0.0.1 unless --host says otherwise.",
    )
    parser.add_argument("--model", required=True,
                        help="an HF model directory, a .gguf file, an alignkit run, or smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/ requests (default: no key)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="most sequences decoded together in one step (default 8); also the largest n")
    parser.add_argument("--max-queue", type=int, default=128,
                        help="sequences that may wait for a batch slot; beyond that requests get 429 (default 128)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may take, waiting included, before it is stopped (default 600)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as 'model' (default: the model's directory or file name)")
    parser.set_defaults(func=run_serve)


def default_model_name(path: str) -> str:
    p = Path(path)
    if not p.exists():
        return path  # an alias such as smollm2-135m-instruct
    return (p.stem if p.is_file() else p.resolve().name) or "model"


def make_scheduler(model: Any, tokenizer: Any, max_batch_size: int) -> SchedulerLike:
    from alignkit.generation.scheduler import Scheduler

    # The server owns the model: its weights stay packed between requests (repacking them after every idle moment
    # cost ~1.3 s of first-token time per request on SmolLM2); the worker closes the scheduler when it stops.
    return Scheduler(model, tokenizer, max_batch_size=max_batch_size, release_when_idle=False)


def build_app(model: Any, tokenizer: Any, *, model_name: str, max_batch_size: int = 8, max_queue: int = 128,
              api_key: str | None = None, timeout: float = 600.0, scheduler: SchedulerLike | None = None,
              **app_options: Any) -> tuple[Any, BatchWorker]:
    """`(app, worker)` for a loaded model; start the worker before serving and close it after.

    `scheduler` replaces the default `Scheduler(model, tokenizer, max_batch_size=...)` (tests use stand-ins)."""
    require_web_stack()
    from alignkit.serve.api import create_app
    from alignkit.serve.protocol import ServerLimits
    from alignkit.serve.worker import BatchWorker

    if max_batch_size < 1 or max_queue < 0 or timeout <= 0:
        raise ConfigError(f"--max-batch-size must be >= 1, --max-queue >= 0 and --timeout > 0; got "
                          f"{max_batch_size}, {max_queue} and {timeout}.")
    if tokenizer is None:
        raise CheckpointError(f"{model_name}: the checkpoint has no tokenizer (tokenizer.json); the server needs "
                              "one to read prompts. Copy the base model's tokenizer files into the directory.")
    if scheduler is None:
        scheduler = make_scheduler(model, tokenizer, max_batch_size)
    worker = BatchWorker(scheduler, max_batch_size=max_batch_size, max_queue=max_queue)
    limits = ServerLimits(model_name=model_name, context_length=model.config.max_position_embeddings,
                          vocab_size=model.config.vocab_size, max_n=max_batch_size)
    app = create_app(worker, tokenizer, limits, api_key=api_key, timeout=timeout, **app_options)
    return app, worker


def run_serve(args: argparse.Namespace) -> int:
    require_web_stack()
    import uvicorn

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}.")
    model, tokenizer = load_model(args.model, args.dtype, purpose="the server needs one to read prompts")
    name = args.served_model_name or default_model_name(args.model)
    app, worker = build_app(model, tokenizer, model_name=name, max_batch_size=args.max_batch_size,
                            max_queue=args.max_queue, api_key=args.api_key, timeout=args.timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        logger.warning(f"serving on {args.host} without --api-key: anyone who can reach this address can use it")
    worker.start()
    logger.info(f"serving '{name}' at http://{args.host}:{args.port}/ (chat page) and /v1 (API)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        worker.close()
    return 0


class BackgroundServer:
    """Runs an app with uvicorn in a daemon thread on 127.0.0.1 and a free port (tests, benchmarks, screenshots).

    ```python
    with BackgroundServer(app) as server:
        httpx.get(server.url + "/health")
    ```
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                     timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self.config)
        self.startup_timeout = startup_timeout
        self.thread = threading.Thread(target=self.server.run, name="alignkit-serve-http", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (is the port free?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
