"""The HTTP side (Starlette, served by uvicorn): routes, the API key, and the path of a request.

A POST is read and validated (openai_api / anthropic_api), rendered with the chat template and
tokenized, checked against the context window and, with `response_format`, given its grammar
(in a worker thread: compiling a schema can take a moment), then handed to the engine as a `Job`.
Its events come back on the event loop and are written as one JSON body or as server-sent events.
A client that goes away, streaming or not, cancels its job at once. Every refusal is a 4xx whose
body has the shape of the API the client speaks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import anthropic_api, openai_api
from .body import DEFAULT_MAX_BODY_BYTES, parse_json, read_body
from .protocol import APIError, DoneEvent, Job, TokenEvent, bad
from .tools import ToolCallSplitter

log = logging.getLogger("qwen2_mlx.serve")


def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, e: APIError) -> JSONResponse:
    body = anthropic_api.error_body(e) if _is_anthropic(path) else openai_api.error_body(e)
    # A refused body may not have been read to its end: the connection cannot carry another request.
    headers = {"Connection": "close"} if e.status == 413 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


class Contain:
    """ASGI middleware: an unexpected exception becomes a 500 in the API's shape, without its text.

    Starlette's own handler answers and then re-raises, and uvicorn drops the connection without
    `Connection: close`, so a keep-alive client's next request fails; here the exception stops.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error in %s", scope.get("path"))
            if scope["type"] == "http" and not started:
                e = APIError(500, "internal error while handling this request; the server goes on", "server_error")
                await error_response(scope["path"], e)(scope, receive, send)


class APIKeyCheck:
    """ASGI middleware: every route but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`."""

    def __init__(self, app, key: Optional[str]):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and scope["path"] != "/health":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            given = headers.get(b"x-api-key", b"").decode("latin-1") or bearer
            if not given or not hmac.compare_digest(given.encode(), self.key.encode()):
                msg = "missing API key" if not given else "invalid API key"
                e = APIError(
                    401, f"{msg}: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key"
                )
                await error_response(scope["path"], e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The routes over one engine (engine.py) and its model's tokenizer."""

    def __init__(self, engine, model_path: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.tokenizer = engine.tokenizer
        self.names = {engine.model_name, model_path, str(model_path).rstrip("/")} - {""}
        self.created = int(time.time())

    # --- plain routes ---------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        from qwen2_mlx.distributed import peak_rss_gb

        status = dict(self.engine.status(), peak_rss_gb=round(peak_rss_gb(), 3))  # this process (rank 0)
        ok = status["healthy"]
        return JSONResponse(
            dict(status="ok" if ok else "error", model=self.engine.model_name, **status), 200 if ok else 503
        )

    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "qwen2-mlx"}
        card["context_window"] = self.engine.window
        return JSONResponse({"object": "list", "data": [card]})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in self.names:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.engine.model_name}'",
                code="model_not_found",
            )
        return JSONResponse(
            {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "qwen2-mlx"}
        )

    # --- generation routes ------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        return await self._generate(request, openai_api.parse_chat, "chat")

    async def completions(self, request: Request):
        return await self._generate(request, openai_api.parse_completion, "text")

    async def messages(self, request: Request):
        return await self._generate(request, anthropic_api.parse_messages, "anthropic")

    async def _generate(self, request: Request, parse, kind: str):
        path = request.url.path
        try:
            body = await self._json(request)
            spec = parse(body)
            if spec.model and spec.model not in self.names:
                raise APIError(
                    404,
                    f"the model '{spec.model}' does not exist; this server serves '{self.engine.model_name}'",
                    "not_found_error" if kind == "anthropic" else "invalid_request_error",
                    "model",
                    "model_not_found",
                )
            job = await run_in_threadpool(self._job, spec)
            job.bind(asyncio.get_running_loop())
            self.engine.submit(job)
        except APIError as e:
            return error_response(path, e)
        model = spec.model or self.engine.model_name
        fmt: Any = (
            anthropic_api.AnthropicFormat(spec, model)
            if kind == "anthropic"
            else openai_api.OpenAIFormat(spec, model, kind == "chat")
        )
        splitter = ToolCallSplitter(t["function"]["name"] for t in spec.tools) if spec.tools else None
        if spec.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._stream(job, fmt, splitter), media_type="text/event-stream", headers=headers)
        return await self._collect(request, job, fmt, splitter)

    async def _json(self, request: Request) -> dict:
        raw = await read_body(request.stream(), request.headers.get("content-length"), self.max_body_bytes)
        return parse_json(raw)

    def _job(self, spec) -> Job:
        """Render, tokenize, check the window, compile the grammar (a worker thread)."""
        from jinja2 import TemplateError

        from qwen2_mlx.loading.tokenizer import TokenizerError

        tok = self.tokenizer
        if spec.messages is not None:
            final = spec.messages[-1]["role"] == "assistant"  # a final assistant message is continued
            try:
                text = tok.apply_chat_template(
                    spec.messages,
                    tools=spec.tools or None,
                    add_generation_prompt=not final,
                    continue_final_message=final,
                    tokenize=False,
                )
            except (TokenizerError, TypeError, ValueError, TemplateError) as e:
                raise bad(f"the chat template could not render these messages: {e}", "messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(spec.prompt, str):
            ids = tok.encode(spec.prompt, add_special_tokens=False)
        else:
            vocab = self.engine.model.args.vocab_size
            wrong = next((t for t in spec.prompt if not 0 <= t < vocab), None)
            if wrong is not None:
                raise bad(f"prompt: token id {wrong} is outside the vocabulary (0..{vocab - 1})", "prompt")
            ids = list(spec.prompt)
        max_tokens = self.engine.check_prompt(len(ids), spec.max_tokens)
        grammar = None
        if spec.schema is not None:
            if not self.engine.batching and (self.engine.lookup or self.engine.draft_model is not None):
                raise bad(
                    "response_format cannot be combined with the server's speculative decoding", "response_format"
                )
            from qwen2_mlx.generation.structured import StructuredOutputError, json_schema_processor

            try:
                schema = None if spec.schema is True else spec.schema
                grammar = json_schema_processor(tok, schema, self.engine.model.args.vocab_size)
            except StructuredOutputError as e:
                raise bad(f"response_format: {e}", "response_format") from None
        vocab = self.engine.model.args.vocab_size
        sampling = spec.sampling
        if sampling.top_k >= vocab:  # keeping the top `vocab` tokens keeps them all
            sampling = dataclasses.replace(sampling, top_k=0)
        return Job(
            prompt=ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=spec.stop,
            grammar=grammar,
            schema=spec.schema,
            logprobs=spec.logprobs,
            top_logprobs=spec.top_logprobs,
        )

    @staticmethod
    def _info(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "cached_tokens": job.cached_tokens, "completion_tokens": 0}

    async def _stream(self, job: Job, fmt, splitter):
        ended = False
        try:
            started = False
            while True:
                event = await job.events.get()
                if not started:
                    started = True
                    for s in fmt.start(self._info(job)):
                        yield s
                if isinstance(event, TokenEvent):
                    text = splitter.feed(event.text) if splitter else event.text
                    entries = [event.logprob] if event.logprob else []
                    for s in fmt.delta(text, entries) if (text or entries) else ():
                        yield s
                elif isinstance(event, DoneEvent):
                    rest, calls = splitter.finish() if splitter else ("", [])
                    ended = True
                    for s in fmt.end(rest, calls, event.reason, event.info):
                        yield s
                    return
                else:
                    ended = True
                    for s in fmt.error(event.error):
                        yield s
                    return
        finally:
            if not ended:  # the line a user (or a test) finds in the log when a client hangs up
                log.info("a streaming client went away after %d tokens: its generation is cancelled", job.generated)
            job.cancel.set()  # the client went away mid-stream (a no-op once the job is done)

    async def _collect(self, request: Request, job: Job, fmt, splitter):
        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancel.set()
                    return

        watcher = asyncio.create_task(watch())
        parts, entries = [], []
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, TokenEvent):
                    parts.append(splitter.feed(event.text) if splitter else event.text)
                    if event.logprob:
                        entries.append(event.logprob)
                elif isinstance(event, DoneEvent):
                    rest, calls = splitter.finish() if splitter else ("", [])
                    body = fmt.response("".join(parts) + rest, calls, event.reason, event.info, entries)
                    return JSONResponse(body)
                else:
                    return error_response(request.url.path, event.error)
        finally:
            watcher.cancel()
            job.cancel.set()


def create_app(
    engine, *, api_key: Optional[str] = None, model_path: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Any:
    """The ASGI app: Starlette routes behind the API-key check."""
    server = Server(engine, model_path, max_body_bytes)

    async def api_error(request: Request, e: APIError):
        return error_response(request.url.path, e)

    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(request.url.path, APIError(e.status_code, msg, kind))

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/messages", server.messages, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: api_error, HTTPException: http_error},
        middleware=[Middleware(Contain)],
    )
    app.state.server = server
    return APIKeyCheck(app, api_key)
