"""The ASGI app: OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models`, plus `/health` and the chat page.

Handlers do the cheap work on the event loop (read a bounded body, check the key, validate, tokenize) and hand the
prompt to the `BatchWorker`; the answer comes back as token events on an asyncio queue. The completion endpoints
return `_CompletionResponse`, an ASGI callable that owns the `receive` channel for the rest of the request, so it
notices a client that hangs up (streamed or not) and cancels its sequences at once instead of decoding for nobody.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from alignkit.serve import protocol
from alignkit.serve.protocol import APIError, Choice, ParsedRequest, ServerLimits
from alignkit.serve.worker import BatchWorker, EngineFailed, QueueFull, RequestHandle

logger = logging.getLogger(__name__)

# A chat that fills SmolLM2's 8k context is ~40 KB of text; 512 KiB leaves room for long contexts while a
# runaway client cannot make the server buffer megabytes per request.
DEFAULT_MAX_BODY_BYTES = 512 * 1024


class _Disconnected(Exception):
    pass


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) one over `limit` bytes before reading it when Content-Length says so."""
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit:,} bytes; send a "
                         "shorter prompt.", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Disconnected() from None
    return b"".join(chunks)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up. The body has been read already, so the next message is the disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _CompletionResponse:
    """Runs one completion request to its end, streamed as server-sent events or sent as one JSON object."""

    def __init__(self, app_state: ServerState, request: ParsedRequest, handle: RequestHandle) -> None:
        self.state, self.request, self.handle = app_state, request, handle
        self.id = protocol.new_id(request.kind)
        self.created = protocol.now()
        self.choices = [Choice(index=i) for i in range(request.params.n)]

    async def _events(self, watcher: asyncio.Task[None]) -> AsyncIterator[list[Any]]:
        """Each step's events for this request until every sample has finished; raises _Disconnected or a 504."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.timeout
        remaining = self.request.params.n
        while remaining:
            getter = asyncio.ensure_future(self.handle.queue.get())
            done, _ = await asyncio.wait({getter, watcher}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if watcher in done:
                    raise _Disconnected()
                raise APIError(504, f"The request did not finish within this server's timeout of "
                               f"{self.state.timeout:g} seconds; ask for fewer tokens or retry when it is less busy.",
                               type="timeout_error", code="timeout")
            item = getter.result()
            if isinstance(item, EngineFailed):
                raise APIError(500, f"The server failed while generating: {item}", type="server_error")
            for event in item:
                choice = self.choices[event.sample_index]
                choice.text.append(event.text or "")
                choice.token_ids.append(event.token_id)
                choice.logprobs.append(event.raw_logprob)
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    remaining -= 1
            yield item

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            if self.request.stream:
                await self._stream(send, watcher)
            else:
                await self._whole(scope, send, watcher)
        except (_Disconnected, OSError):
            pass  # the client left; the finally below frees its sequences
        finally:
            watcher.cancel()
            self.state.worker.cancel(self.handle)  # no-op when it has finished

    async def _whole(self, scope: Scope, send: Send, watcher: asyncio.Task[None]) -> None:
        try:
            async for _ in self._events(watcher):
                pass
        except APIError as e:
            await error_response(e)(scope, _never_receive, send)
            return
        body = protocol.full_response(self.request, self.id, self.created, self.choices, self.state.decode_token)
        await JSONResponse(body)(scope, _never_receive, send)

    async def _stream(self, send: Send, watcher: asyncio.Task[None]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def emit(data: dict[str, Any] | str) -> None:
            await send({"type": "http.response.body", "body": protocol.sse(data), "more_body": True})

        request = self.request
        if request.kind == "chat":  # OpenAI opens each choice with the assistant role and empty content
            for choice in self.choices:
                await emit(protocol.stream_chunk(request, self.id, self.created, choice.index, text="",
                                                 finish_reason=None, role=True))
        offsets = [0] * len(self.choices)
        try:
            async for events in self._events(watcher):
                for event in events:
                    logprobs = None
                    if request.logprobs:
                        tokens = [self.state.decode_token([event.token_id])]
                        index = event.sample_index
                        logprobs = (protocol.chat_logprobs(tokens, [event.raw_logprob]) if request.kind == "chat"
                                    else protocol.completion_logprobs(tokens, [event.raw_logprob], offsets[index]))
                        offsets[index] += len(tokens[0])
                    if event.text or logprobs is not None:
                        await emit(protocol.stream_chunk(request, self.id, self.created, event.sample_index,
                                                         text=event.text, finish_reason=None, logprobs=logprobs))
                    if event.finish_reason is not None:
                        await emit(protocol.stream_chunk(request, self.id, self.created, event.sample_index,
                                                         text=None if request.kind == "chat" else "",
                                                         finish_reason=event.finish_reason))
        except APIError as e:
            # Headers are gone already; OpenAI's clients raise on an event carrying an "error" object.
            await emit(e.body())
        else:
            if request.include_usage:
                tokens = sum(len(c.token_ids) for c in self.choices)
                await emit(protocol.usage_chunk(request, self.id, self.created, tokens))
        await emit("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _never_receive() -> dict[str, Any]:
    raise RuntimeError("the response body does not read from the client")


class ServerState:
    """Everything the handlers share: the worker, the tokenizer, the limits and the settings."""

    def __init__(self, worker: BatchWorker, tokenizer: Any, limits: ServerLimits, *, api_key: str | None,
                 timeout: float, max_body_bytes: int) -> None:
        self.worker, self.tokenizer, self.limits = worker, tokenizer, limits
        self.api_key, self.timeout, self.max_body_bytes = api_key, timeout, max_body_bytes

    def decode_token(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            what = "No API key was sent" if not header else "The API key is wrong"
            raise APIError(401, f"{what}; send it as the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")


def create_app(worker: BatchWorker, tokenizer: Any, limits: ServerLimits, *, api_key: str | None = None,
               timeout: float = 600.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The server's ASGI app. The caller starts and closes `worker` (see `alignkit.serve.server`)."""
    state = ServerState(worker, tokenizer, limits, api_key=api_key, timeout=timeout, max_body_bytes=max_body_bytes)
    page = resources.files("alignkit.serve").joinpath("static/index.html").read_bytes()

    def completion_endpoint(parse: Callable[[dict[str, Any], ServerLimits, Any], ParsedRequest]) -> Any:
        async def endpoint(request: Request) -> Any:
            try:
                state.check_key(request)
                body = protocol.parse_json_body(await _read_body(request, state.max_body_bytes))
                parsed = parse(body, state.limits, state.tokenizer)
                try:
                    handle = state.worker.submit(parsed.prompt_ids, parsed.params)
                except QueueFull as e:
                    raise APIError(429, f"The server is at capacity ({e}); retry shortly.",
                                   type="rate_limit_error", code="queue_full") from None
            except APIError as e:
                headers = {"retry-after": "1"} if e.status == 429 else None
                return error_response(e, headers)
            except _Disconnected:
                return Response(status_code=499)
            return _CompletionResponse(state, parsed, handle)

        return endpoint

    async def models(request: Request) -> JSONResponse:
        try:
            state.check_key(request)
        except APIError as e:
            return error_response(e)
        card = {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "alignkit",
                "context_length": limits.context_length}
        if "name" in request.path_params:
            if request.path_params["name"] != limits.model_name:
                return error_response(APIError(404, f"The model '{request.path_params['name'][:100]}' does not "
                                               f"exist on this server; it serves '{limits.model_name}'.",
                                               param="model", code="model_not_found"))
            return JSONResponse(card)
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": limits.model_name, "sequences": worker.held,
                             "capacity": worker.capacity, "steps": worker.steps})

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 "script-src 'self' 'unsafe-inline'"})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (f"There is no {request.method} {request.url.path} on this server; it has POST "
                   "/v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health and the chat page at /."
                   if kind else str(exc.detail))
        return error_response(APIError(exc.status_code, message, code=kind))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "The server hit an internal error; see its log.", type="server_error"))

    routes = [
        Route("/v1/chat/completions", completion_endpoint(protocol.parse_chat), methods=["POST"]),
        Route("/v1/completions", completion_endpoint(protocol.parse_completion), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", index, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.serve = state
    return app
