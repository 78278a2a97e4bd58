"""The OpenAI-compatible HTTP API over a ServingLoop: completions, chat completions, streaming (SSE),
models, tokenize/detokenize, version, health and Prometheus metrics. Request bodies are checked
against the models of `protocol.py`, which are also the served OpenAPI schema (/openapi.json).

Every failure a client can meet is an OpenAI-shaped error: a response, or the last event of a stream
(a stream that has started cannot change its status). `/health` tells a load balancer what clients
would find: 503 while the server stops, or while its ranks make no progress."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi import Path as FastApiPath
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from mnemosyne_hpc.config import ServerConfig
from mnemosyne_hpc.engine.request import RequestError
from mnemosyne_hpc.serving.inputs import InputProcessor, tokenizing_threads
from mnemosyne_hpc.serving.logprobs import LogprobFormat
from mnemosyne_hpc.serving.loop import REFUSED, Event, ServingLoop
from mnemosyne_hpc.serving.protocol import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    Sampling,
    TokenizeRequest,
    conversation,
    problems,
)

SAMPLING_FAILED = "sampling failed for this request (see the server log); other requests are unaffected"
REQUEST_MODELS = (CompletionRequest, ChatRequest, TokenizeRequest, DetokenizeRequest)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}


@dataclass
class Shape:
    """How a request's answer is written: as a chat message or a completion; with log-probabilities; after
    the prompt's text (`echo`); without the completion (`score_only`: max_tokens 0 scores the prompt)."""

    chat: bool
    logprobs: bool
    echo: str | None = None
    score_only: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, kind: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status)


def failure(event: Event) -> tuple[int, str] | None:
    """(status, message) of an event that ends its request with an error: refused or ended by the loop,
    or its sampling failed."""
    if event.kind == "error":
        return event.status, event.text
    if event.finish_reason == "error":
        return 500, SAMPLING_FAILED
    return None


class PrefixCacheCounters:
    """The prefix cache's hit rate, in tokens: hits / queries."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        yield CounterMetricFamily(
            "mnemosyne_prefix_cache_queries_tokens",
            "prompt tokens admitted (looked up in the prefix cache)",
            value=self.scheduler.prefix_queried_tokens,
        )
        yield CounterMetricFamily(
            "mnemosyne_prefix_cache_hits_tokens",
            "admitted prompt tokens found in the prefix cache (not prefilled)",
            value=self.scheduler.prefix_hit_tokens,
        )


class Metrics:
    def __init__(self, loop: ServingLoop):
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("mnemosyne_ttft_seconds", "time to first token", buckets=buckets, registry=self.registry)
        self.tbt = Histogram("mnemosyne_tbt_seconds", "time between tokens", buckets=buckets, registry=self.registry)
        self.requests = Counter(
            "mnemosyne_requests", "finished requests by reason", ["finish_reason"], registry=self.registry
        )
        scheduler = loop.engine.scheduler
        Gauge("mnemosyne_waiting_requests", "requests waiting for admission", registry=self.registry).set_function(
            lambda: len(scheduler.waiting)
        )
        Gauge("mnemosyne_running_requests", "requests holding KV blocks", registry=self.registry).set_function(
            lambda: len(scheduler.running)
        )
        placement = scheduler.placement
        Gauge(
            "mnemosyne_kv_blocks_used_ratio", "share of KV blocks in use, all KVP groups", registry=self.registry
        ).set_function(lambda: placement.blocks_in_use / placement.total_blocks)
        self.registry.register(PrefixCacheCounters(scheduler))
        loop.observers.append(self.observe)

    def observe(self, request) -> None:
        if request.ttft_s is not None:
            self.ttft.observe(request.ttft_s)
        for gap in request.tbt_s:
            self.tbt.observe(gap)
        self.requests.labels(request.finish_reason).inc()


def create_app(loop: ServingLoop, model: str, server: ServerConfig) -> FastAPI:
    """The API of `loop`'s engine serving `model`, as the `server.*` knobs say."""
    app = FastAPI(title="mnemosyne-hpc", docs_url=None, redoc_url=None)
    metrics = Metrics(loop)
    inputs = InputProcessor(loop.engine.tokenizer)
    formats = LogprobFormat(loop.engine.tokenizer)
    tokenizing = tokenizing_threads(server.tokenizer_nice)
    api_key = server.api_key
    max_body = server.max_request_bytes or max(1 << 20, 32 * loop.engine.max_model_len)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        authorized = request.headers.get("authorization") == f"Bearer {api_key}"
        if api_key and request.url.path.startswith("/v1") and not authorized:
            return error_response(401, "missing or wrong API key", "authentication_error")
        if loop.stopping and request.method == "POST":
            return error_response(503, REFUSED)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e.status, e.message, e.kind)

    @app.get("/health", responses={503: {"description": "stopping, or no progress while requests are pending"}})
    async def health():
        if loop.stopping:
            return JSONResponse({"status": "stopping", "message": REFUSED}, status_code=503)
        stalled = loop.stalled_s()
        if stalled > server.health_stall_s:
            message = f"no engine step has completed for {stalled:.1f} s while requests are pending"
            return JSONResponse({"status": "stalled", "message": message}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # no such path (404), or method (405)
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", "not_found_error")

    card = {"id": model, "object": "model", "created": 0, "owned_by": "mnemosyne-hpc"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def model_card(model_id: str = FastApiPath(examples=[model])):
        if model_id != model:
            raise ApiError(404, f"model {model_id!r} not found; this server serves {model!r}", "not_found_error")
        return card

    @app.get("/version")
    async def server_version():
        return {"version": version("mnemosyne-hpc")}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest), responses=_answers(Completion))
    async def completions(request: Request):
        body = await _body(request, CompletionRequest)
        prompt = body.prompt_text_or_ids()
        token_ids = prompt if isinstance(prompt, list) else await _off_the_loop(inputs.prompt_tokens, prompt)
        echo = None
        if body.echo:
            echo = prompt if isinstance(prompt, str) else await _off_the_loop(inputs.text, token_ids)
        shape = Shape(chat=False, logprobs=body.logprobs is not None, echo=echo, score_only=body.max_tokens == 0)
        return await _respond(request, body, token_ids, shape)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest), responses=_answers(ChatCompletion))
    async def chat_completions(request: Request):
        body = await _body(request, ChatRequest)
        token_ids = await _off_the_loop(inputs.chat_tokens, conversation(body.messages))
        return await _respond(request, body, token_ids, Shape(chat=True, logprobs=bool(body.logprobs)))

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest), responses=ERRORS)
    async def tokenize(request: Request):
        body = await _body(request, TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages")
        if body.messages is None:
            token_ids = await _off_the_loop(inputs.prompt_tokens, body.prompt)
        else:
            token_ids = await _off_the_loop(inputs.chat_tokens, conversation(body.messages))
        return {"count": len(token_ids), "max_model_len": loop.engine.max_model_len, "tokens": token_ids}

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest), responses=ERRORS)
    async def detokenize(request: Request):
        body = await _body(request, DetokenizeRequest)
        return {"prompt": await _off_the_loop(inputs.text, body.tokens)}

    async def _off_the_loop(function, *args):
        """Tokenising on a worker thread: the event loop keeps streaming, the engine keeps stepping."""
        try:
            return await asyncio.get_running_loop().run_in_executor(tokenizing, function, *args)
        except RequestError as e:
            raise ApiError(400, str(e)) from None

    async def _body(request: Request, schema: type[BaseModel]):
        body = _parse_json(await _read(request, max_body))
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            checked = schema.model_validate(body)
        except ValidationError as e:
            raise ApiError(400, problems(e, schema)) from None
        if checked.model not in (None, model):
            raise ApiError(404, f"model {checked.model!r} not found; this server serves {model!r}", "not_found_error")
        return checked

    async def _respond(request: Request, body: Sampling, token_ids: list[int], shape: Shape):
        sampling, chat = body.sampling(), shape.chat
        _check_room(sampling.get("max_tokens"), len(token_ids), loop.engine.max_model_len)
        events = _submit({"prompt_token_ids": token_ids, "sampling": sampling})
        # the first event tells a rejected request apart; a client that leaves before it (its request
        # queued or prefilling), or before a whole answer, has its request aborted (a stream watches itself)
        first = await _unless_disconnected(request, events.__anext__())
        if first.kind == "error":
            await events.aclose()
            raise ApiError(*failure(first))
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            chunks = _stream(first, events, completion_id, created, shape, body.include_usage, body.continuous_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, done = await _unless_disconnected(request, _collect(first, events))
        if failure(done):
            raise ApiError(*failure(done))
        # formatting a long prompt's log-probabilities is work for a worker thread; anything else is not
        choice = (
            await _off_the_loop(_choice, shape, text, done.request)
            if shape.logprobs
            else _choice(shape, text, done.request)
        )
        return _full_response(completion_id, created, chat, choice, done, shape.score_only)

    async def _unless_disconnected(request: Request, awaitable):
        """Await `awaitable`; if the client disconnects first, cancel it (an events generator it
        awaits aborts its request) and answer 499, which nobody reads."""
        work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            raise ApiError(499, "the client closed the connection")
        return work.result()

    async def _collect(first: Event, events) -> tuple[str, Event]:
        text, done = "", first
        async for event in _chain(first, events):
            text += event.text
            done = event
        return text, done

    def _submit(engine_request: dict):
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        async def events():
            ticket = loop.submit(lambda event: aio.call_soon_threadsafe(queue.put_nowait, event), **engine_request)
            finished = False
            try:
                while True:
                    event = await queue.get()
                    finished = event.kind in ("done", "error")
                    yield event
                    if finished:
                        return
            finally:
                if not finished:  # the client went away: free the request's blocks
                    loop.cancel(ticket)

        return events()

    async def _chain(first: Event, events):
        yield first
        if first.kind != "done":
            async for event in events:
                yield event

    def _choice(shape: Shape, text: str, request) -> dict:
        """A whole answer's choice: its text (after the prompt, with echo) and the log-probabilities asked for."""
        outputs = [] if shape.score_only else request.output_logprobs
        if shape.chat:
            logprobs = formats.chat(outputs) if shape.logprobs else None
            return {"message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        entries = list(zip(request.prompt_token_ids, request.prompt_logprobs)) if shape.echo is not None else []
        logprobs = formats.completion(entries + [(e.token_id, e) for e in outputs])[0] if shape.logprobs else None
        return {"text": (shape.echo or "") + ("" if shape.score_only else text), "logprobs": logprobs}

    async def _stream(
        first: Event, events, completion_id: str, created: int, shape: Shape, include_usage: bool, continuous: bool
    ):
        chat = shape.chat
        head = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion"}
        head.update({"created": created, "model": model, **({"usage": None} if include_usage else {})})
        offset = 0  # of the next token's text, in the completion's text (log-probabilities)
        if chat:
            yield _sse(
                {
                    **head,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            )
        elif shape.echo is not None and first.kind != "error":
            echoed = {"index": 0, "text": shape.echo, "logprobs": None, "finish_reason": None}
            if shape.logprobs and first.request is not None:
                entries = list(zip(first.request.prompt_token_ids, first.request.prompt_logprobs))
                echoed["logprobs"], offset = await _off_the_loop(formats.completion, entries)
            yield _sse({**head, "choices": [echoed]})
        try:
            async for event in _chain(first, events):
                if failure(event):
                    yield _sse(error_body(*failure(event)))
                    break
                if shape.score_only:  # the one token computed is not part of the answer
                    event.text, event.logprobs = "", []
                if event.text or event.kind == "done":
                    choice = {"index": 0, "finish_reason": event.finish_reason}
                    if chat:
                        choice["delta"] = {"content": event.text} if event.text else {}
                        choice["logprobs"] = formats.chat(event.logprobs) if shape.logprobs else None
                    else:
                        choice.update({"text": event.text, "logprobs": None})
                        if shape.logprobs:
                            entries = [(e.token_id, e) for e in event.logprobs]
                            choice["logprobs"], offset = formats.completion(entries, offset)
                    usage = {"usage": _usage(event.request, shape.score_only)} if continuous and event.request else {}
                    yield _sse({**head, "choices": [choice], **usage})
                if event.kind == "done" and include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event.request, shape.score_only)})
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # a client that went away cancels its request

    def _full_response(completion_id, created, chat, choice: dict, done: Event, score_only: bool) -> dict:
        choice = {"index": 0, **choice, "finish_reason": done.finish_reason}
        return {
            "id": completion_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(done.request, score_only),
        }

    def openapi() -> dict:
        if app.openapi_schema is None:  # the request models join the schemas FastAPI collected
            schema = get_openapi(title=app.title, version=version("mnemosyne-hpc"), routes=app.routes)
            _, definitions = models_json_schema(
                [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _usage(request, score_only: bool = False) -> dict:
    prompt, output = len(request.prompt_token_ids), 0 if score_only else len(request.output_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": request.cached_tokens},
    }


def _body_schema(model: type[BaseModel]) -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {"requestBody": {"required": True, "content": content}}


def _answers(model: type[BaseModel]) -> dict:
    """A JSON answer, or with `stream: true` server-sent events; or an error."""
    return {200: {"model": model, "content": {"text/event-stream": {}}}, **ERRORS}


async def _read(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, _too_large(int(declared), limit))
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, _too_large(len(body), limit))
    return bytes(body)


def _too_large(size: int, limit: int) -> str:
    return (
        f"the request body has {size} bytes, over the {limit} allowed (server.max_request_bytes; by default "
        "32 bytes per token of cache.max_model_len)"
    )


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (its body was read before: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_room(max_tokens, prompt_tokens: int, max_model_len: int) -> None:
    """As vLLM's server: max_tokens that would run past cache.max_model_len is refused, not clipped
    (without it, the default sampling.max_tokens is clipped to the room left). A prompt with no room
    at all, or a max_tokens that is not a positive integer, is the engine's to refuse."""
    room = max_model_len - prompt_tokens
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 < room < max_tokens:
        raise ApiError(
            400,
            f"max_tokens is too large: {max_tokens}; cache.max_model_len = {max_model_len} and the "
            f"prompt has {prompt_tokens} tokens ({max_tokens} > {max_model_len} - {prompt_tokens})",
        )


def _parse_json(data: bytes):
    """A request body as JSON, or a 400: malformed, nested too deeply to parse, or NaN or Infinity
    (not JSON). Text that is not Unicode is the input processor's to refuse."""

    def not_json(constant: str):
        raise ValueError(f"{constant} is not a JSON value")

    try:
        body = json.loads(data, parse_constant=not_json)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ApiError(400, f"malformed JSON: {e}") from None
    return body


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
